"""ImageBind's input preprocessing (the original's ImageBind/data.py): what the three loaders share (MediaError,
file checks, clip spans) and the image loader; audio is in preprocess_audio.py, video in preprocess_video.py.

    load_image(path) -> (3, 224, 224)          RGB, bicubic short side 224, centre crop, CLIP mean/std
    preprocess_audio.load_audio(path) -> (3, 1, 128, 204)
    preprocess_video.load_video(path) -> (15, 3, 2, 224, 224)

torchvision / torchaudio / pytorchvideo / decord are not usable beside torch 2.13 (their imports fail), so the
few transforms ImageBind takes from them are written here with the same arithmetic. A file that is missing,
empty, truncated or not media raises MediaError (a ValueError) whose one-line message names the file.

A loader takes a path or the bytes of a webdataset shard member (nextgpt.store.tars.Blob, named
`<shard>:<member>`); a path with no file behind it whose folder is tar-backed is read from its shard by offset,
so every caller (precompute, validation, live encoding, the app) reads shards the way it reads files.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from nextgpt.store.tars import Blob, missing_reason, read_media

IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MediaError(ValueError):
    """A media file that cannot be used; the message starts with the file's path."""


def _check_file(path: str | Path | Blob) -> Path | Blob:
    """The file, or the shard member's bytes when no file is there and the folder's shard index holds it."""
    if isinstance(path, Blob):
        if not path.size:
            raise MediaError(f"{path}: empty member")
        return path
    path = Path(path)
    if not path.exists():
        blob = read_media(path)
        if blob is None:
            raise MediaError(missing_reason(path))
        return _check_file(blob)
    if not path.is_file():
        raise MediaError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: empty file")
    return path


def opened(source: Path | Blob) -> str | BinaryIO:
    """What PIL / PyAV / soundfile open: a path string, or a file object over a member's bytes."""
    return source.open() if isinstance(source, Blob) else str(source)


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


def load_image(path: str | Path | Blob) -> torch.Tensor:
    """Image file (or shard member) -> (3, 224, 224) float32 (to_rgb, then ImageBind's transform)."""
    from PIL import Image, UnidentifiedImageError

    path = _check_file(path)
    try:
        with Image.open(opened(path)) as image:                    # reads the header only
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
