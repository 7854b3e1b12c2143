"""The toy judge reads the toy renderers' own media right (>= 0.98 per attribute), at the toy data's sizes and at the
tiny decoders' output sizes, through the files the data and the decoders write (jpg / png, mp4, wav)."""

import random

import numpy as np
import pytest

from tiny import judge
from tiny import toyworld as toy

FLOOR = 0.98


def _accuracy(pairs):
    keys = pairs[0][0]
    return {k: float(np.mean([got[k] == want[k] for want, got in pairs])) for k in keys}


@pytest.mark.parametrize("size,fmt", [(toy.IMAGE_SIZE, "JPEG"), (32, "PNG")])
def test_judge_reads_rendered_images(tmp_path, size, fmt):
    rng = random.Random(size)
    pairs = []
    for n, (caption, color, shape, background) in enumerate(toy.image_captions()):
        for k in range(2):
            path = tmp_path / f"{n}_{k}.{fmt.lower()}"
            toy.render_image(color, shape, background, (rng.random(), rng.random(), rng.random()), size).save(path, fmt)
            pairs.append((dict(color=color, shape=shape, background=background), judge.judge_file(path)))
    accuracy = _accuracy(pairs)
    assert min(accuracy.values()) >= FLOOR, accuracy


@pytest.mark.parametrize("size,fps,seconds", [(toy.VIDEO_SIZE, toy.VIDEO_FPS, toy.VIDEO_SECONDS), (32, 8, 0.5)])
def test_judge_reads_rendered_videos(tmp_path, size, fps, seconds):
    from nextgpt.model.media_files import mp4_bytes

    rng = random.Random(size)
    pairs = []
    for n, (caption, color, shape, direction) in enumerate(toy.video_captions()):
        path = tmp_path / f"{n}.mp4"
        frames = toy.render_video(color, shape, direction, rng.random(), size=size, fps=fps, seconds=seconds)
        path.write_bytes(mp4_bytes(frames, fps))
        pairs.append((dict(color=color, shape=shape, direction=direction), judge.judge_file(path)))
    accuracy = _accuracy(pairs)
    assert min(accuracy.values()) >= FLOOR, accuracy


@pytest.mark.parametrize("rate,seconds", [(toy.AUDIO_RATE, toy.AUDIO_SECONDS), (16000, 1.0)])
def test_judge_reads_rendered_tones(tmp_path, rate, seconds):
    import soundfile

    rng = random.Random(rate)
    pairs = []
    for n, (caption, pitch, pattern) in enumerate(toy.audio_captions()):
        for k in range(3):
            path = tmp_path / f"{n}_{k}.wav"
            soundfile.write(str(path), toy.render_tone(pitch, pattern, rate, seconds, phase=rng.random()), rate,
                            subtype="PCM_16")
            pairs.append((dict(pitch=pitch, pattern=pattern), judge.judge_file(path)))
    accuracy = _accuracy(pairs)
    assert min(accuracy.values()) >= FLOOR, accuracy


def test_judge_reads_the_tiny_vocoder():
    """The tiny AudioLDM's vocoder (toy_audio) turns the spectrogram of every toy tone back into a tone the judge
    reads as the caption says."""
    import torch

    from tiny import toy_audio

    vocoder = toy_audio.build_vocoder()
    pairs = []
    for caption, pitch, pattern in toy.audio_captions():
        wave = toy.render_tone(pitch, pattern, rate=toy_audio.RATE, seconds=1.0, channels=1)[:, 0]
        mel = torch.from_numpy(toy_audio.to_mel(toy_audio.spectrogram(wave)))[None]      # (1, frames, bins)
        with torch.no_grad():
            out = vocoder(mel)[0].numpy()
        pairs.append((dict(pitch=pitch, pattern=pattern), judge.judge_audio((out, toy_audio.RATE))))
    assert _accuracy(pairs) == {"pitch": 1.0, "pattern": 1.0}


def test_expected_reads_toy_captions():
    assert judge.expected("Can you show me a picture of a red circle on a black background") == (
        "image", {"color": "red", "shape": "circle", "background": "black"})
    assert judge.expected("a blue square moving left")[1]["direction"] == "left"
    assert judge.expected("I hear a high beeping tone.") == ("audio", {"pitch": "high", "pattern": "beeping"})
    assert judge.expected("Hello, how are you?") is None
