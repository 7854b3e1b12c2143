"""The toy judge: reads a generated png / mp4 / wav and says what it shows, in the toy world's words.

    judge_image(image)  -> {"color", "shape", "background"}      image: path | PIL image | (H, W, 3) uint8
    judge_video(video)  -> {"color", "shape", "direction"}        video: path | (F, H, W, 3) uint8
    judge_audio(audio)  -> {"pitch", "pattern"}                   audio: path | ((N,) or (N, C) float, rate)
    judge_file(path)    -> the reading of the file's modality (by extension)
    expected(caption)   -> what a toy caption asks for (the same keys), or None if it is no toy caption

No learned weights: colours are the nearest toy palette entry, shapes the best-overlapping template in the shape's
bounding box, motion the centroid's path, pitch and pattern the spectrogram's peak frequency and loudness over time.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from tiny import toyworld as toy

IMAGE_KEYS = ("color", "shape", "background")
VIDEO_KEYS = ("color", "shape", "direction")
AUDIO_KEYS = ("pitch", "pattern")
KEYS = {"image": IMAGE_KEYS, "video": VIDEO_KEYS, "audio": AUDIO_KEYS}


def _nearest(rgb, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = [float(np.sum((np.asarray(rgb, dtype=np.float64) - np.asarray(palette[n])) ** 2)) for n in names]
    return names[int(np.argmin(distances))]


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Boolean masks (h, w) of each toy shape filling an h x w box, drawn as toyworld draws them."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = (x + 0.5) / w, (y + 0.5) / h                      # in (0, 1)
    return {"circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
            "square": np.ones((h, w), dtype=bool),
            "triangle": np.abs(u - 0.5) <= 0.5 * v}            # apex at the top centre, base at the bottom


def _foreground(frame: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask, distance) of pixels that differ from the background colour (frame float (H, W, 3))."""
    distance = np.sqrt(np.sum((frame - background) ** 2, axis=-1))
    return distance > max(40.0, 0.35 * float(distance.max())), distance


def _shape_of(mask: np.ndarray) -> tuple[str, float]:
    """(shape, overlap) of the mask's main blob: rows / columns with little foreground are trimmed first."""
    if mask.sum() < 3:
        return "none", 0.0
    rows, cols = mask.sum(axis=1), mask.sum(axis=0)
    keep_r = np.nonzero(rows >= max(1, 0.1 * rows.max()))[0]
    keep_c = np.nonzero(cols >= max(1, 0.1 * cols.max()))[0]
    top, bottom, left, right = keep_r[0], keep_r[-1] + 1, keep_c[0], keep_c[-1] + 1
    box = mask[top:bottom, left:right]
    best, score = "none", -1.0
    for name, template in _templates(*box.shape).items():
        iou = float((box & template).sum()) / float((box | template).sum())
        if iou > score:
            best, score = name, iou
    return best, score


def _border(frame: np.ndarray) -> np.ndarray:
    return np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]])


def _load_image(image) -> np.ndarray:
    from PIL import Image

    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.float64)


def judge_image(image) -> dict[str, str]:
    frame = _load_image(image)                                        # (H, W, 3)
    background = np.median(_border(frame), axis=0)
    mask, distance = _foreground(frame, background)
    out = {"background": _nearest(background, toy.BACKGROUNDS)}
    if mask.sum() < 3:
        return {**out, "color": "none", "shape": "none"}
    # the colour of the shape's core: the half of its pixels furthest from the background (edges are blends)
    core = mask & (distance >= np.median(distance[mask]))
    out["color"] = _nearest(np.median(frame[core], axis=0), toy.COLORS)
    out["shape"] = _shape_of(mask)[0]
    return out


def _load_video(video) -> np.ndarray:
    if isinstance(video, (str, Path)):
        import av

        with av.open(str(video)) as container:
            video = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return np.asarray(video, dtype=np.float64)


def judge_video(video) -> dict[str, str]:
    frames = _load_video(video)                                       # (F, H, W, 3)
    background = np.median(np.concatenate([_border(f) for f in frames]), axis=0)
    centres, shapes, colours = [], [], []
    for frame in frames:
        mask, distance = _foreground(frame, background)
        if mask.sum() < 3:
            continue
        y, x = np.nonzero(mask)
        centres.append((x.mean(), y.mean()))
        core = mask & (distance >= np.median(distance[mask]))
        colours.append(np.median(frame[core], axis=0))
        shapes.append(_shape_of(mask))
    if len(centres) < 2:
        return {"color": "none", "shape": "none", "direction": "none"}
    # the path's overall slope (least squares over the frames), not just first-to-last
    t = np.arange(len(centres), dtype=np.float64)
    dx, dy = (np.polyfit(t, np.asarray(centres)[:, k], 1)[0] for k in (0, 1))
    direction = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    votes: dict[str, float] = {}
    for shape, score in shapes:
        votes[shape] = votes.get(shape, 0.0) + score
    return {"color": _nearest(np.median(np.stack(colours), axis=0), toy.COLORS),
            "shape": max(votes, key=votes.get), "direction": direction}


def _load_audio(audio) -> tuple[np.ndarray, int]:
    if isinstance(audio, (str, Path)):
        import soundfile

        wave, rate = soundfile.read(str(audio), dtype="float32", always_2d=True)
        return wave.mean(axis=1), int(rate)
    wave, rate = audio
    wave = np.asarray(wave, dtype=np.float64)
    return (wave.mean(axis=1) if wave.ndim == 2 else wave), int(rate)


def judge_audio(audio) -> dict[str, str]:
    wave, rate = _load_audio(audio)
    hop, window = int(0.01 * rate), int(0.04 * rate)                  # 10 ms hops, 40 ms windows
    if len(wave) < window + hop:
        return {"pitch": "none", "pattern": "none"}
    n_fft = 1 << int(np.ceil(np.log2(window * 4)))                    # zero-padded: fine frequency bins
    starts = np.arange(0, len(wave) - window, hop)
    frames = np.stack([wave[s:s + window] for s in starts]) * np.hanning(window)
    spectrum = np.abs(np.fft.rfft(frames, n=n_fft, axis=1))
    freqs = np.fft.rfftfreq(n_fft, 1.0 / rate)
    band = (freqs >= 100) & (freqs <= 4000)                           # the toy tones: 220 .. 1760 Hz
    energy = spectrum[:, band].max(axis=1)
    if energy.max() <= 1e-4:
        return {"pitch": "none", "pattern": "none"}
    active = energy > 0.3 * energy.max()
    peak = freqs[band][spectrum[:, band].argmax(axis=1)]
    times = starts / rate
    # beeping: the loudness switches on and off several times a second (steady tones switch only at the ends)
    edges = np.count_nonzero(np.diff(active.astype(int)))
    duration = len(wave) / rate
    on = times[active]
    logf = np.log2(peak[active])
    slope = np.polyfit(on, logf, 1)[0] if len(on) >= 3 and np.ptp(on) > 0 else 0.0     # octaves per second
    if edges / duration >= 3.0 and 0.2 <= active.mean() <= 0.8:
        pattern = "beeping"
    elif slope > 0.3:
        pattern = "rising"
    elif slope < -0.3:
        pattern = "falling"
    else:
        pattern = "steady"
    # the base pitch: where a sweep starts (rising from it, falling from it), the tone itself otherwise
    if pattern in ("rising", "falling"):
        base = float(np.polyval(np.polyfit(on, logf, 1), on.min()))
    else:
        base = float(np.median(logf))
    pitch = min(toy.PITCHES, key=lambda p: abs(np.log2(toy.PITCHES[p]) - base))
    return {"pitch": pitch, "pattern": pattern}


JUDGES = {"image": judge_image, "video": judge_video, "audio": judge_audio}
EXTENSIONS = {".png": "image", ".jpg": "image", ".jpeg": "image", ".mp4": "video", ".wav": "audio"}


def judge_file(path: str | Path) -> dict[str, str]:
    modality = EXTENSIONS.get(Path(path).suffix.lower())
    if modality is None:
        raise ValueError(f"{path}: the toy judge reads {', '.join(EXTENSIONS)} files")
    return JUDGES[modality](path)


_CAPTIONS = None


def expected(caption: str) -> tuple[str, dict[str, str]] | None:
    """(modality, attributes) a toy caption asks for; None when the text holds no toy caption."""
    global _CAPTIONS
    if _CAPTIONS is None:
        _CAPTIONS = ([("image", c, dict(zip(IMAGE_KEYS, a))) for c, *a in toy.image_captions()]
                     + [("video", c, dict(zip(VIDEO_KEYS, a))) for c, *a in toy.video_captions()]
                     + [("audio", c, dict(zip(AUDIO_KEYS, a))) for c, *a in toy.audio_captions()])
    text = re.sub(r"\s+", " ", caption.lower())
    hits = [(m, c, a) for m, c, a in _CAPTIONS if c in text]
    if not hits:
        return None
    modality, _, attrs = max(hits, key=lambda h: len(h[1]))
    return modality, attrs


def attributes_in(modality: str, text: str) -> dict[str, str]:
    """The toy attributes a free-text reply names (for captioning accuracy): the colour / shape / background
    (the word before "background") / direction (after "moving") / pitch / pattern words it holds; "none" if absent."""
    words = re.findall(r"[a-z]+", text.lower())

    def first(vocabulary, among=None):
        return next((w for w in (among if among is not None else words) if w in vocabulary), "none")

    if modality == "image":
        cut = words.index("background") if "background" in words else len(words)
        before = words[:cut - 1] if cut < len(words) else words
        return {"color": first(toy.COLORS, before), "shape": first(toy.SHAPES),
                "background": words[cut - 1] if 0 < cut < len(words) and words[cut - 1] in toy.BACKGROUNDS else "none"}
    if modality == "video":
        after = words[words.index("moving") + 1:] if "moving" in words else []
        return {"color": first(toy.COLORS), "shape": first(toy.SHAPES), "direction": first(toy.DIRECTIONS, after)}
    return {"pitch": first(toy.PITCHES), "pattern": first(toy.PATTERNS)}
