"""What each decoder pipeline is asked for and how its output becomes a file: the pipeline-specific cells of the
modality table (`nextgpt.modalities`), as plain functions so the table stays data.

    pipeline_arguments(settings)             -> keyword arguments beside prompt_embeds (sizes, output_type)
    read_output(output, pipeline, settings)  -> (data, rate)   data: PIL image | (F, H, W, 3) uint8 | (N,) float32
    encode_file(data, rate)                  -> bytes of the .png / .mp4 / .wav

`settings` is the modality's mapping in `cfg.inference` (nextgpt.config.ImageDecoding / VideoDecoding /
AudioDecoding). Heavy imports (numpy, PyAV, soundfile) happen inside the functions.
"""

from __future__ import annotations

import io
from typing import Any


# -- image: StableDiffusionPipeline -> PIL image -> png ------------------------------------------------------------
def image_arguments(settings) -> dict[str, Any]:
    return dict(height=settings.height, width=settings.width, output_type="pil")


def image_output(output, pipeline, settings) -> tuple[Any, float]:
    return output.images[0], 0.0


def png_bytes(image, rate: float = 0.0) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- video: TextToVideoSDPipeline -> (F, H, W, 3) uint8 -> mp4 -----------------------------------------------------
def video_arguments(settings) -> dict[str, Any]:
    return dict(height=settings.height, width=settings.width, num_frames=settings.frames, output_type="np")


def video_output(output, pipeline, settings) -> tuple[Any, float]:
    import numpy as np

    frames = np.asarray(output.frames[0], dtype=np.float32)             # (F, H, W, 3) in [0, 1]
    return (frames.clip(0, 1) * 255).round().astype(np.uint8), float(settings.fps)


def mp4_bytes(frames, rate: float) -> bytes:
    """(F, H, W, 3) uint8 -> H.264 mp4 (MPEG-4 part 2 where this FFmpeg has no libx264), yuv420p."""
    try:
        import av
    except ImportError as e:
        raise ImportError(f"writing mp4 needs PyAV ({e}); run `make env`") from None
    import numpy as np

    # yuv420p stores chroma at half resolution: odd sizes are padded by one edge row / column.
    pad = ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0))
    frames = np.pad(frames, pad, mode="edge") if any(p[1] for p in pad) else frames
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=max(1, round(rate)))
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))                     # flush the encoder's delayed frames
    return buffer.getvalue()


# -- audio: AudioLDMPipeline -> (N,) float waveform at the vocoder's rate -> 16-bit wav -------------------------------
def audio_arguments(settings) -> dict[str, Any]:
    return dict(audio_length_in_s=settings.seconds, output_type="np")


def audio_output(output, pipeline, settings) -> tuple[Any, float]:
    import numpy as np

    return np.asarray(output.audios[0], dtype=np.float32), float(pipeline.vocoder.config.sampling_rate)


def wav_bytes(waveform, rate: float) -> bytes:
    import numpy as np
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(waveform, -1.0, 1.0), int(rate), format="WAV", subtype="PCM_16")
    return buffer.getvalue()
