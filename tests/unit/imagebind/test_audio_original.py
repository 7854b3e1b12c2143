"""ImageBind audio preprocessing against the original's own output on every case of
../shared/reference/imagebind_audio_resample_fixture.safetensors (7 synthetic wavs: 8 to 48 kHz, mono and stereo,
one shorter than a clip). Each case's PCM is written as the 16-bit wav the fixture was made from, then read back
through the real `load_audio`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nextgpt.imagebind import preprocess_audio

FIXTURE = (Path(__file__).resolve().parents[3].parent / "shared").resolve() / "reference" / \
    "imagebind_audio_resample_fixture.safetensors"


@pytest.fixture(scope="module")
def fixture():
    if not FIXTURE.exists():
        pytest.skip(f"{FIXTURE} absent (the shared reference is not checked out beside the repo)")
    from safetensors import safe_open

    with safe_open(str(FIXTURE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["cases"])


def test_every_fixture_case_matches_the_original(fixture, tmp_path):
    import soundfile

    tensors, cases = fixture
    assert len(cases) == 7
    for name, case in cases.items():
        path = tmp_path / f"{name}.wav"
        pcm = tensors[f"pcm.{name}"].numpy()                                   # (samples, channels) int16
        assert pcm.shape[1] == case["channels"]
        soundfile.write(path, pcm, case["sample_rate"], subtype="PCM_16")
        audio = preprocess_audio.load_audio(path)
        assert audio.shape == (3, 1, 128, 204)
        # measured 0.0 on every case (torchaudio's float32 kernel, every channel, in-place clip means)
        assert (audio - tensors[f"output.{name}"]).abs().max().item() <= 1e-5, name


def test_resampler_keeps_channels_and_length():
    waveform = torch.randn(2, 44100)
    out = preprocess_audio.resample(waveform, 44100)
    assert out.shape == (2, 16000) and out.dtype == torch.float32
    # channels are resampled independently: channel 1 alone gives the same row
    assert torch.equal(preprocess_audio.resample(waveform[1:], 44100)[0], out[1])
    assert preprocess_audio.resample(np.zeros(22050, np.float32), 22050).shape == (16000,)


def test_clip_means_are_removed_in_place_over_all_channels():
    # 5 s at 16 kHz: clips start at 0, 1, 2 s and overlap, so clip 2 sees clip 1's shift (the original's quirk)
    waveform = torch.linspace(0, 1, 5 * 16000).repeat(2, 1)
    waveform[1] += 0.5                                                          # channel 1 moves the shared mean
    in_place = preprocess_audio.audio_transform(waveform)
    # a copy-per-clip, channel-0-mean pipeline (what the code did before) gives different numbers
    separate = torch.stack([preprocess_audio.waveform_to_melspec(waveform[0, s * 16000:(s + 2) * 16000])
                            for s in range(3)]).sub(-4.268).div(9.138)
    assert (in_place - separate).abs().max().item() > 1e-3
    assert torch.equal(waveform[1, 0], torch.tensor(0.5))                      # the caller's tensor is untouched
