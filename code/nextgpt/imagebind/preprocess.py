"""ImageBind's input preprocessing (the original's ImageBind/data.py), decoded with PIL / soundfile / PyAV,
resampled and transformed in torch.

    load_image(path) -> (3, 224, 224)          RGB, bicubic short side 224, centre crop, CLIP mean/std
    load_audio(path) -> (3, 1, 128, 204)       16 kHz, 3 clips of 2 s, Kaldi fbank (128 mel), (x + 4.268) / 9.138
    load_video(path) -> (15, 3, 2, 224, 224)   5 clips of 2 s x 2 frames, short side 224, 3 spatial crops each

torchvision / torchaudio / pytorchvideo / decord are not usable beside torch 2.13 (their imports fail), so the
few transforms ImageBind takes from them are written here with the same arithmetic. A file that is missing,
empty, truncated or not media raises MediaError (a ValueError) whose one-line message names the file.
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

AUDIO_SAMPLE_RATE = 16000
AUDIO_CLIP_SECONDS = 2
AUDIO_CLIPS = 3
AUDIO_MEL_BINS = 128
AUDIO_FRAMES = 204             # a 2 s clip gives 198 fbank frames; right-padded with zeros to 204
AUDIO_MEAN = -4.268
AUDIO_STD = 9.138

VIDEO_CLIP_SECONDS = 2
VIDEO_CLIPS = 5
VIDEO_FRAMES_PER_CLIP = 2
VIDEO_SPATIAL_CROPS = 3


class MediaError(ValueError):
    """A media file that cannot be used; the message starts with the file's path."""


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise MediaError(f"{path}: missing")
    if not path.is_file():
        raise MediaError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: empty file")
    return path


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def clip_spans(duration: float, clip_seconds: float, clips: int) -> list[tuple[Fraction, Fraction]]:
    """Start/end seconds of `clips` clips of `clip_seconds`, starts evenly spaced over [0, duration - clip].

    The arithmetic of pytorchvideo's ConstantClipsPerVideoSampler (exact fractions of the float duration), so
    sample indices derived from the spans agree with the original. A short medium gives `clips` clips at 0.
    """
    max_start = Fraction(max(duration - clip_seconds, 0))
    step = max_start / clips
    return [(step * index, step * index + clip_seconds) for index in range(clips)]


# ----------------------------------------------------------------------------------------------------------- image


def image_transform(image) -> torch.Tensor:
    """PIL RGB image -> (3, 224, 224) float32, exactly torchvision Resize(224, bicubic) + CenterCrop + ToTensor +
    Normalize on a PIL image."""
    from PIL import Image

    width, height = image.size
    # torchvision: the short side becomes 224, the long side int(224 * long / short) (truncated).
    if width <= height:
        size = (IMAGE_SIZE, int(IMAGE_SIZE * height / width))
    else:
        size = (int(IMAGE_SIZE * width / height), IMAGE_SIZE)
    image = image.resize(size, Image.BICUBIC)
    top = int(round((size[1] - IMAGE_SIZE) / 2.0))
    left = int(round((size[0] - IMAGE_SIZE) / 2.0))
    image = image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)   # (3, 224, 224) uint8
    pixels = pixels.to(torch.float32).div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return pixels.sub(mean).div(std)


# Decoding a larger image is refused before any pixel is read (a decompression-bomb guard far below PIL's own
# 179 M): 50 M pixels are at most 200 MB as RGBA; real photo datasets are a few megapixels.
MAX_IMAGE_PIXELS = 50_000_000
_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(image):
    """A decoded PIL image of any mode -> RGB, the pixels a viewer shows.

    The original does image.convert("RGB"), which is right for RGB, L, P, CMYK, YCbCr and 1 and is what this does
    for them, but wrong for two kinds: high bit depth grayscale (I;16*, I, F: convert clips at 255, so a 16-bit PNG
    comes out nearly white) is scaled to 8 bits instead; transparency (RGBA, LA, PA, or a palette / L / RGB
    image with a transparency key: convert drops alpha and shows whatever colour is stored under transparent
    pixels, often black) is composited over white. EXIF orientation is not applied, as in the original
    (ImageBind's loader ignores it), so a file gives the same features as the original computes for it."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)                        # (H, W)
        # 16-bit data (PNG I;16, or "I" holding 16-bit values) spans 0..65535; 8-bit-range data stays as is.
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 1.0
        gray = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode in _TRANSPARENT_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path) -> torch.Tensor:
    """Image file -> (3, 224, 224) float32 (to_rgb, then ImageBind's transform)."""
    from PIL import Image, UnidentifiedImageError

    path = _check_file(path)
    try:
        with Image.open(path) as image:                    # reads the header only
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise MediaError(f"{path}: {image.width}x{image.height} pixels, more than the {MAX_IMAGE_PIXELS:,} "
                                 "this loader decodes (decompression-bomb guard)")
            image.load()        # decode now: a truncated file fails here, not half-way through a batch
            image = to_rgb(image)
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise MediaError(f"{path}: not a readable image (truncated, or not an image file)") from None
    except Image.DecompressionBombError as e:
        raise MediaError(f"{path}: {_first_line(e)} (decompression-bomb guard)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"{path}: unreadable or truncated image ({_first_line(e)})") from None
    return image_transform(image)


# ----------------------------------------------------------------------------------------------------------- audio


def _mel_scale(freq):
    return 1127.0 * (1.0 + freq / 700.0).log() if isinstance(freq, torch.Tensor) else 1127.0 * math.log(
        1.0 + freq / 700.0)


def mel_banks(num_bins: int, padded_window: int, sample_rate: float, low_freq: float = 20.0,
              high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi's triangular mel filters, (num_bins, padded_window // 2) in float32, on the HTK mel scale.

    high_freq <= 0 counts down from Nyquist (Kaldi's convention; 0 means Nyquist). No VTLN warping.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    fft_bin_width = sample_rate / padded_window
    mel_low, mel_high = _mel_scale(low_freq), _mel_scale(high_freq)
    mel_delta = (mel_high - mel_low) / (num_bins + 1)
    bin_index = torch.arange(num_bins).unsqueeze(1)                            # (num_bins, 1)
    left = mel_low + bin_index * mel_delta
    center = mel_low + (bin_index + 1.0) * mel_delta
    right = mel_low + (bin_index + 2.0) * mel_delta
    mel = _mel_scale(fft_bin_width * torch.arange(padded_window / 2)).unsqueeze(0)  # (1, padded_window / 2)
    up_slope = (mel - left) / (center - left)
    down_slope = (right - mel) / (right - center)
    return torch.clamp(torch.min(up_slope, down_slope), min=0.0)


def kaldi_fbank(waveform: torch.Tensor, sample_rate: int = AUDIO_SAMPLE_RATE, num_mel_bins: int = AUDIO_MEL_BINS,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, preemphasis: float = 0.97
                ) -> torch.Tensor:
    """Log mel filterbank energies, (frames, num_mel_bins), as Kaldi / torchaudio.compliance.kaldi.fbank computes
    them with ImageBind's options: hanning window, no dither, no energy term, power spectrum, DC offset removed per
    frame, pre-emphasis 0.97, window padded to a power of two, snip_edges (frames = 1 + (n - 400) // 160).

    `waveform`: (samples,) or (channels, samples); channel 0 is used.
    """
    if waveform.ndim == 2:
        waveform = waveform[0]
    window_shift = int(sample_rate * frame_shift_ms * 0.001)                   # 160 at 16 kHz
    window_size = int(sample_rate * frame_length_ms * 0.001)                   # 400
    padded_window = 1 << (window_size - 1).bit_length()                        # 512
    if waveform.shape[0] < window_size:
        return waveform.new_zeros(0, num_mel_bins)
    num_frames = 1 + (waveform.shape[0] - window_size) // window_shift
    frames = waveform.as_strided((num_frames, window_size), (window_shift * waveform.stride(0), waveform.stride(0)))
    frames = frames - frames.mean(dim=1, keepdim=True)                          # remove DC offset per frame
    # Pre-emphasis with the first sample repeated as its own predecessor.
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - preemphasis * previous
    window = torch.hann_window(window_size, periodic=False, dtype=waveform.dtype, device=waveform.device)
    frames = F.pad(frames * window, (0, padded_window - window_size))          # (frames, 512)
    power = torch.fft.rfft(frames).abs().pow(2.0)                               # (frames, 257)
    banks = mel_banks(num_mel_bins, padded_window, sample_rate).to(waveform)    # (128, 256)
    banks = F.pad(banks, (0, 1))                                                # Nyquist bin gets weight 0
    energies = power @ banks.T                                                  # (frames, 128)
    return energies.clamp(min=torch.finfo(torch.float32).eps).log()


def waveform_to_melspec(clip: torch.Tensor, target_frames: int = AUDIO_FRAMES, remove_mean: bool = True
                        ) -> torch.Tensor:
    """A 16 kHz clip (samples,) -> (1, 128, target_frames): mean removed (unless the caller did), fbank,
    transposed, zero-padded/cropped. Not yet normalised (this is the fixture's `audio_clip16k_melspec`)."""
    if remove_mean:
        clip = clip - clip.mean()
    spec = kaldi_fbank(clip).transpose(0, 1)                                    # (128, frames)
    missing = target_frames - spec.shape[1]
    spec = F.pad(spec, (0, missing)) if missing > 0 else spec[:, :target_frames]
    return spec.unsqueeze(0)


def _wav_declared_shortfall(path: Path) -> int | None:
    """Bytes that a RIFF/WAVE file's `data` chunk declares beyond the end of the file (None if not a WAV or the
    size is the streaming placeholder). libsndfile quietly reads what is there, so truncation is checked here."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                if chunk_size in (0, 0xFFFFFFFF):
                    return None
                return max(0, offset + 8 + chunk_size - size)
            offset += 8 + chunk_size + (chunk_size & 1)
    return None


def decode_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Audio file -> (samples, channels) float32 in [-1, 1] and its sample rate (soundfile, else PyAV)."""
    import soundfile

    path = _check_file(path)
    shortfall = _wav_declared_shortfall(path)
    if shortfall:
        raise MediaError(f"{path}: truncated WAV ({shortfall} bytes of audio data missing)")
    try:
        samples, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as sndfile_error:
        try:
            samples, sample_rate = _decode_audio_av(path)
        except MediaError:
            raise MediaError(f"{path}: not readable audio ({_first_line(sndfile_error)})") from None
    if samples.shape[0] == 0:
        raise MediaError(f"{path}: no audio samples")
    return samples, int(sample_rate)


def _decode_audio_av(path: Path) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path}: no audio stream")
            stream = container.streams.audio[0]
            # Planar float keeps every channel as its own row: (channels, n) per frame.
            to_planar = av.AudioResampler(format="fltp")
            chunks = [planar.to_ndarray() for frame in container.decode(stream)
                      for planar in to_planar.resample(frame)]
            chunks += [planar.to_ndarray() for planar in to_planar.resample(None)]
            sample_rate = stream.rate
    except (av.FFmpegError, OSError, ValueError) as e:
        if isinstance(e, MediaError):
            raise
        raise MediaError(f"{path}: unreadable audio ({_first_line(e)})") from None
    if not chunks:
        raise MediaError(f"{path}: no audio frames")
    return np.concatenate(chunks, axis=1).T.astype(np.float32), int(sample_rate)


def _sinc_resample_kernel(orig: int, new: int, dtype: torch.dtype, zero_crossings: int = 6,
                          rolloff: float = 0.99) -> tuple[torch.Tensor, int]:
    """torchaudio.functional.resample's default kernel (sinc_interp_hann), (new, 1, 2 * width + orig).

    `orig` / `new` are the rates divided by their gcd. Built in `dtype` as torchaudio builds it in the waveform's
    dtype (float32 for audio files): building it in float64 instead moves outputs by ~1e-7, which the log of
    near-silent mel bins magnifies past 1e-5.
    """
    cutoff = min(orig, new) * rolloff                                   # cycles per (1 / gcd) s
    width = math.ceil(zero_crossings * orig / cutoff)
    index = torch.arange(-width, width + orig, dtype=dtype)[None, None] / orig          # (1, 1, taps)
    phase = torch.arange(0, -new, -1, dtype=dtype)[:, None, None] / new + index      # (new, 1, taps)
    phase *= cutoff
    phase = phase.clamp_(-zero_crossings, zero_crossings)
    window = torch.cos(phase * math.pi / zero_crossings / 2) ** 2
    phase *= math.pi
    kernel = torch.where(phase == 0, torch.tensor(1.0).to(phase), phase.sin() / phase)
    kernel *= window * (cutoff / orig)
    return kernel, width


def resample(waveform, sample_rate: int, target_rate: int = AUDIO_SAMPLE_RATE):
    """(..., samples) -> (..., ceil(samples * target / rate)) in the input's dtype, every channel.

    The arithmetic of torchaudio.functional.resample with its defaults (the original's resampler: a sinc low-pass
    at 0.99 x the lower Nyquist frequency, Hann-windowed over 6 zero crossings, one polyphase conv1d). Written
    here in torch because torchaudio does not import beside torch 2.13 (libc10_cuda.so), and no generic
    resampler (soxr, scipy's filters) reproduces its numbers: with it the audio pipeline equals the original's on
    every case of a fixture made with the original (7 synthetic wavs, 8 to 48 kHz; measured max difference 0.0).
    A numpy array in gives a numpy array out.
    """
    if isinstance(waveform, np.ndarray):
        return resample(torch.from_numpy(waveform), sample_rate, target_rate).numpy()
    if sample_rate == target_rate:
        return waveform
    divisor = math.gcd(int(sample_rate), int(target_rate))
    orig, new = int(sample_rate) // divisor, int(target_rate) // divisor
    kernel, width = _sinc_resample_kernel(orig, new, waveform.dtype)
    shape = waveform.shape
    rows = waveform.reshape(-1, shape[-1])                                          # (channels, n)
    length = rows.shape[1]
    padded = F.pad(rows, (width, width + orig))
    # (channels, 1, n') * (new, 1, taps) with stride orig -> (channels, new, n / orig): phase-major, interleave
    out = F.conv1d(padded[:, None], kernel, stride=orig).transpose(1, 2).reshape(rows.shape[0], -1)
    target_length = math.ceil(new * length / orig)
    return out[:, :target_length].reshape(shape[:-1] + (target_length,))


def audio_transform(waveform: torch.Tensor) -> torch.Tensor:
    """16 kHz waveform (samples,) or (channels, samples) -> (3, 1, 128, 204) normalised clips.

    As the original's waveform2melspec: each clip is a VIEW of the whole waveform and its mean (over all
    channels) is removed IN PLACE, so the shift lands in the waveform and later, overlapping clips see it
    (the original's behaviour, kept for parity). The fbank then uses channel 0. The caller's tensor is not
    modified (we work on a copy).
    """
    waveform = waveform.clone() if waveform.ndim == 2 else waveform[None].clone()    # (channels, samples)
    duration = waveform.shape[1] / AUDIO_SAMPLE_RATE
    clips = []
    for start, end in clip_spans(duration, AUDIO_CLIP_SECONDS, AUDIO_CLIPS):
        clip = waveform[:, int(start * AUDIO_SAMPLE_RATE):int(end * AUDIO_SAMPLE_RATE)]   # a view
        clip -= clip.mean()
        spec = waveform_to_melspec(clip[0], remove_mean=False)
        clips.append(spec.sub(torch.tensor(AUDIO_MEAN)).div(torch.tensor(AUDIO_STD)))
    return torch.stack(clips)


def load_audio(path: str | Path) -> torch.Tensor:
    """Audio file -> (3, 1, 128, 204) float32: every channel resampled to 16 kHz, clip means over all channels,
    fbank of channel 0 (the original's load_and_transform_audio_data)."""
    samples, sample_rate = decode_audio(path)
    waveform = resample(torch.from_numpy(np.ascontiguousarray(samples.T)), sample_rate)      # (channels, n)
    if waveform.shape[1] < int(AUDIO_SAMPLE_RATE * 0.025):
        raise MediaError(f"{path}: audio too short ({samples.shape[0] / sample_rate * 1000:.1f} ms, need >= 25 ms)")
    return audio_transform(waveform)


# ----------------------------------------------------------------------------------------------------------- video


def _video_index(path: Path):
    """Open a video; return (container, stream, number of frames, frames per second)."""
    import av

    try:
        container = av.open(str(path))
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


def load_video(path: str | Path) -> torch.Tensor:
    """Video file -> (15, 3, 2, 224, 224) float32: 5 clips x 3 spatial crops, 2 frames each."""
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
