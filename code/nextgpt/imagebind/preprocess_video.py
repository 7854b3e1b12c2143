"""ImageBind's video preprocessing (the original's load_and_transform_video_data), decoded with PyAV.

    load_video(path) -> (15, 3, 2, 224, 224)   5 clips of 2 s x 2 frames, short side 224, 3 spatial crops each

pytorchvideo / decord do not import beside torch 2.13, so the clip sampler, ShortSideScale and SpatialCrop are
written here with the same arithmetic. Bad files raise preprocess.MediaError naming the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .preprocess import CLIP_MEAN, CLIP_STD, IMAGE_SIZE, MediaError, _check_file, _first_line, clip_spans, opened

VIDEO_CLIP_SECONDS = 2
VIDEO_CLIPS = 5
VIDEO_FRAMES_PER_CLIP = 2
VIDEO_SPATIAL_CROPS = 3


def _video_index(path):
    """Open a video; return (container, stream, number of frames, frames per second)."""
    import av

    try:
        container = av.open(opened(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"{path}: not a readable video (truncated, or not a video file: {_first_line(e)})") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{path}: no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    count = stream.frames
    if not count:
        # No frame count in the header: count packets like decord's index does, then rewind.
        try:
            count = sum(1 for packet in container.demux(stream) if packet.size)
            container.seek(0)
        except (av.FFmpegError, OSError) as e:
            container.close()
            raise MediaError(f"{path}: unreadable video ({_first_line(e)})") from None
    if not rate or not count:
        container.close()
        raise MediaError(f"{path}: video without frames or frame rate")
    return container, stream, int(count), float(rate)


def video_frame_indices(num_frames: int, fps: float) -> list[list[int]]:
    """Frame indices of each clip, as pytorchvideo's decord reader + UniformTemporalSubsample(2) pick them:
    clip frames range(ceil(fps * start), min(ceil(fps * end), n)), then the first and the last of those."""
    duration = num_frames / fps
    picked = []
    for start, end in clip_spans(duration, VIDEO_CLIP_SECONDS, VIDEO_CLIPS):
        clip = list(range(math.ceil(fps * start), min(math.ceil(fps * end), num_frames)))
        positions = torch.linspace(0, len(clip) - 1, VIDEO_FRAMES_PER_CLIP).clamp(0, len(clip) - 1).long()
        picked.append([clip[p] for p in positions.tolist()])
    return picked


def short_side_scale(clip: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(C, T, H, W) -> short side `size`, bilinear without antialiasing (pytorchvideo's ShortSideScale)."""
    _, _, height, width = clip.shape
    if width < height:
        new_height, new_width = int(math.floor(height / width * size)), size
    else:
        new_height, new_width = size, int(math.floor(width / height * size))
    return F.interpolate(clip, size=(new_height, new_width), mode="bilinear", align_corners=False)


def spatial_crops(clip: torch.Tensor, size: int = IMAGE_SIZE) -> list[torch.Tensor]:
    """(C, T, H, W) -> 3 crops of size x size along the long side: start, centre, end (ImageBind's SpatialCrop)."""
    height, width = clip.shape[2], clip.shape[3]
    crops = []
    for index in range(VIDEO_SPATIAL_CROPS):
        top = int(math.ceil((height - size) / 2))
        left = int(math.ceil((width - size) / 2))
        if height > width:
            top = {0: 0, 1: top, 2: height - size}[index]
        else:
            left = {0: 0, 1: left, 2: width - size}[index]
        crops.append(clip[:, :, top:top + size, left:left + size])
    return crops


def video_transform(clips: list[torch.Tensor]) -> torch.Tensor:
    """Clips of uint8 frames (T, H, W, 3) -> (clips * 3, 3, T, 224, 224) normalised crops, clip-major."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1, 1)
    views = []
    for frames in clips:
        clip = frames.permute(3, 0, 1, 2).to(torch.float32) / 255.0             # (3, T, H, W) in [0, 1]
        clip = (short_side_scale(clip) - mean) / std
        views += spatial_crops(clip)
    return torch.stack(views)


def load_video(path) -> torch.Tensor:
    """Video file (a path, or a shard member's Blob) -> (15, 3, 2, 224, 224) float32: 5 clips x 3 spatial crops, 2 frames each."""
    import av

    path = _check_file(path)
    container, stream, num_frames, fps = _video_index(path)
    picked = video_frame_indices(num_frames, fps)
    wanted = {index for clip in picked for index in clip}
    frames: dict[int, np.ndarray] = {}
    decoded = 0
    try:
        with container:
            for decoded, frame in enumerate(container.decode(stream), start=1):
                if decoded - 1 in wanted:
                    frames[decoded - 1] = frame.to_ndarray(format="rgb24")      # (H, W, 3) uint8
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"{path}: unreadable or truncated video ({_first_line(e)})") from None
    if decoded < num_frames:
        raise MediaError(f"{path}: truncated video (decoded {decoded} of {num_frames} frames)")
    clips = [torch.from_numpy(np.stack([frames[index] for index in clip])) for clip in picked]
    return video_transform(clips)
