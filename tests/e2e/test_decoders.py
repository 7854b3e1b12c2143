"""nextgpt.model.decoders on the tiny diffusers pipelines: conditioning -> decodable png / mp4 / wav files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nextgpt.modalities import MODALITIES


@pytest.fixture(scope="module")
def decoder_cfg(tiny_env):
    return tiny_env.config("stage_3")


@pytest.fixture(scope="module")
def decoders(decoder_cfg):
    from nextgpt.model.decoders import Decoders

    return Decoders(decoder_cfg, seed=7)


def conditioning(decoders, modality, seed=0):
    tokens, dim = decoders.conditioning_shape(modality)
    return torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(seed))


def read_back(path: Path):
    """Decode a written file with an independent reader: PIL / PyAV / soundfile."""
    if path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))                       # (H, W, 3)
    if path.suffix == ".mp4":
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            return np.stack(frames), float(stream.average_rate)            # (F, H, W, 3), fps
    import soundfile

    return soundfile.read(str(path))                                        # (N,), rate


def test_nothing_loads_until_first_use(decoder_cfg):
    from nextgpt.model.decoders import Decoders

    fresh = Decoders(decoder_cfg)
    assert fresh.loaded() == []
    assert fresh.conditioning_shape("audio")[0] == 1          # reads JSON only
    assert fresh.loaded() == []


@pytest.mark.parametrize("modality", list(MODALITIES))
def test_decode_writes_file_of_configured_size(decoders, decoder_cfg, tmp_path, modality):
    settings = decoder_cfg.inference.decoding(modality)
    decoded = decoders.decode(modality, conditioning(decoders, modality))
    path = decoders.write(decoded, tmp_path, 3)
    assert path == tmp_path / f"{modality}_3.{MODALITIES[modality].file_ext}"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]          # no temp file left behind
    if modality == "image":
        assert read_back(path).shape == (settings.height, settings.width, 3)
    elif modality == "video":
        frames, fps = read_back(path)
        assert frames.shape == (settings.frames, settings.height, settings.width, 3)
        assert fps == settings.fps
    else:
        waveform, rate = read_back(path)
        assert rate == 16000
        assert len(waveform) == int(settings.seconds * 16000)
        assert np.abs(waveform).max() > 0


def test_each_pipeline_loaded_once(decoders):
    decoders.decode("image", conditioning(decoders, "image"))
    first = decoders.pipeline("image")
    decoders.decode("image", conditioning(decoders, "image", seed=1))
    assert decoders.pipeline("image") is first


def test_seeded_and_driven_by_the_conditioning(decoders):
    a = np.asarray(decoders.decode("image", conditioning(decoders, "image", 0)).data)
    b = np.asarray(decoders.decode("image", conditioning(decoders, "image", 0)).data)
    c = np.asarray(decoders.decode("image", conditioning(decoders, "image", 1)).data)
    d = np.asarray(decoders.decode("image", conditioning(decoders, "image", 0), seed=8).data)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, d)


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_negative_embeds_match_the_pipelines_own_empty_prompt(decoders, decoder_cfg, modality):
    """Our cached unconditional embeddings give exactly what the pipeline computes itself from ""."""
    settings = decoder_cfg.inference.decoding(modality)
    embeds = conditioning(decoders, modality, 2)
    ours = decoders.decode(modality, embeds, seed=5).data
    pipeline = decoders.pipeline(modality)
    sizes = (dict(height=settings.height, width=settings.width, output_type="np")
             if modality == "image" else dict(audio_length_in_s=settings.seconds))
    theirs = pipeline(prompt_embeds=embeds if modality == "image" else embeds.reshape(1, -1),
                      num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                      generator=torch.Generator().manual_seed(5), **sizes)
    if modality == "image":
        ours_array = np.asarray(ours).astype(np.float32) / 255
        assert np.abs(ours_array - theirs.images[0]).max() <= 1 / 255 + 1e-6
    else:
        np.testing.assert_allclose(ours, theirs.audios[0], atol=1e-6)
    negative = decoders.negative_embeds(modality)
    if MODALITIES[modality].pooled:
        assert negative.shape == (1, decoders.conditioning_shape(modality)[1])
        assert torch.allclose(negative.norm(dim=-1), torch.ones(1), atol=1e-5)    # CLAP embeds are unit-norm


def test_wrong_conditioning_shape_is_a_clear_error(decoders):
    tokens, dim = decoders.conditioning_shape("video")
    with pytest.raises(ValueError, match=r"video conditioning has shape \(1, 77, 5\)"):
        decoders.decode("video", torch.zeros(1, tokens, 5))


def test_missing_decoder_folder(tiny_env, tmp_path):
    from nextgpt.model.decoders import Decoders

    cfg = tiny_env.config("stage_3", f"model.decoders.image={tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Decoders(cfg).pipeline("image")


def test_odd_video_size_is_padded_for_yuv420(tmp_path):
    from nextgpt.model.decoders import Decoded, write

    frames = np.random.default_rng(0).integers(0, 255, (3, 9, 11, 3), dtype=np.uint8)
    path = write(Decoded("video", frames, rate=5), tmp_path, 0)
    decoded, fps = read_back(path)
    assert decoded.shape == (3, 10, 12, 3) and fps == 5
