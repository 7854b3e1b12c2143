"""The denoising loss through the frozen decoder (model/denoising.py, train.loss_weights gen_<modality>) on the
tiny decoders: gradients reach the projector only, the diffusers recipe per prediction type, noise keyed by
(step, target), suffix backward exact. The training runs (off = bit-identical, resume, refusals) are in
tests/e2e/test_denoising_train.py (both under tests/e2e: they run the tiny models)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nextgpt.data.dataset import build_loader
from nextgpt.model import denoising
from nextgpt.model.nextgpt import build_model
from nextgpt.model.trainable import set_trainable

ALL_ON = "{lm: 1.0, image: 1.0, video: 1.0, audio: 1.0, gen_image: 1.0, gen_video: 1.0, gen_audio: 1.0}"
ONLY_DENOISING = "{lm: 1.0, gen_image: 1.0, gen_video: 1.0, gen_audio: 1.0}"


@pytest.fixture(scope="module")
def env(tiny_env):
    tiny_env.embeddings()
    return tiny_env


def mixed_batch(model, cfg, size=6):
    """One collated micro-batch holding all three modalities' blocks (stage 2 data, mixed datasets)."""
    loader, _ = build_loader(cfg, model.tokenizer, model.token_ids)
    for batch in loader:
        if len(batch["signal_blocks"]) == 3:
            return batch
    raise AssertionError("no micro-batch with image, video and audio blocks")


def with_scheduler(env, tmp_path, modality_folder, **changes):
    """A copy of a tiny decoder folder with its scheduler config changed."""
    folder = tmp_path / modality_folder
    shutil.copytree(env.ckpt / modality_folder, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return folder


def test_gradient_reaches_the_projector_not_the_decoder(env):
    """Denoising only (no l2 term): every modality's term is there, finite, and its gradient reaches that
    modality's output projector; the frozen UNet / VAE are no part of the model and get no gradient. The global
    torch RNG is not touched (the noise comes from per-target generators)."""
    torch.manual_seed(0)
    cfg = env.config(2, f"train.loss_weights={ONLY_DENOISING}", "data.mixture=mixed", "train.micro_batch_size=6")
    model = build_model(cfg)
    set_trainable(model, cfg)
    model.denoising = denoising.build(cfg, "cpu")
    batch = mixed_batch(model, cfg)
    state = torch.get_rng_state()
    out = model(batch)
    assert torch.equal(state, torch.get_rng_state())
    assert {"gen_image", "gen_video", "gen_audio"} <= set(out) and not {"image", "video", "audio"} & set(out)
    assert all(torch.isfinite(out[k]) and out[k] > 0 for k in ("gen_image", "gen_video", "gen_audio"))
    out["loss"].backward()
    for modality, projector in model.output_proj.items():
        assert sum(float(p.grad.abs().sum()) for p in projector.parameters()) > 0, modality
    own = {id(p) for p in model.parameters()}
    for loss in model.denoising.losses.values():
        for module in (loss.unet, loss.vae):
            assert all(not p.requires_grad and p.grad is None and id(p) not in own for p in module.parameters())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_is_the_diffusers_recipe_for_the_schedulers_prediction_type(env, tmp_path, prediction_type):
    """Read from the scheduler config, not assumed: the target is the noise (epsilon) or get_velocity (v), the
    weight min(SNR, gamma) / SNR or / (SNR + 1) (diffusers' train_text_to_image); computed here by hand."""
    from diffusers.training_utils import compute_snr

    cfg = env.config(2, "inference.image.height=32")
    folder = with_scheduler(env, tmp_path, "stable-diffusion", prediction_type=prediction_type)
    loss = denoising.DecoderLoss("image", folder, cfg.inference.image, "cpu")
    assert loss.prediction_type == prediction_type
    images = sorted((env.data / "T_X_pair_data" / "cc3m" / "images").iterdir())[:2]
    conditioning = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    value = loss.loss(conditioning, [str(p) for p in images], [denoising.generator_for(13, 5, k) for k in (1, 2)], 5.0)

    expected = []
    for image, key, condition in zip(images, (1, 2), conditioning):
        generator = denoising.generator_for(13, 5, key)
        x0 = loss.latents(loss.pixels(str(image)), generator)[None]
        t = torch.randint(0, loss.scheduler.config.num_train_timesteps, (1,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = loss.scheduler.add_noise(x0, noise, t)
        target = noise if prediction_type == "epsilon" else loss.scheduler.get_velocity(x0, noise, t)
        prediction = loss.unet(noisy, t, encoder_hidden_states=condition[None]).sample
        snr = compute_snr(loss.scheduler, t)
        weight = snr.clamp(max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
        expected.append(weight * (prediction - target).pow(2).mean())
    torch.testing.assert_close(value, torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)
    value.backward()
    assert conditioning.grad.abs().sum() > 0


def test_noise_is_keyed_by_step_and_target_not_by_batch(env):
    """A target's term is the same alone or beside others (so ranks and micro-batch splits do not matter), and
    another step draws other noise."""
    cfg = env.config(2, "train.loss_weights={lm: 1.0, gen_audio: 1.0}")
    losses = denoising.build(cfg, "cpu")
    audio = sorted((env.data / "T_X_pair_data" / "audiocap" / "audios").iterdir())[:2]
    conditioning = torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(0))

    def term(rows, step):
        batch = {"target_paths": {"audio": [str(audio[r]) for r in rows]},
                 "target_keys": {"audio": [100 + r for r in rows]}, "step": step}
        return losses("audio", conditioning[list(rows)], batch)

    together = term([0, 1], 7)
    torch.testing.assert_close(together, (term([0], 7) + term([1], 7)) / 2)
    torch.testing.assert_close(term([1, 0], 7), together)
    assert not torch.equal(term([0, 1], 8), together)


def test_suffix_backward_stays_exact_with_the_denoising_terms(env):
    from unit.model.test_suffix_backward import both_paths, perturb_token_rows

    torch.manual_seed(2)
    cfg = env.config(2, f"train.loss_weights={ALL_ON}", "data.mixture=mixed", "train.micro_batch_size=6",
                     "train.suffix_backward=true")
    model = build_model(cfg)
    set_trainable(model, cfg)
    perturb_token_rows(model, 2)
    model.denoising = denoising.build(cfg, "cpu")
    batch = mixed_batch(model, cfg)
    blocks = {m: [tuple(b) for b in v.tolist()] for m, v in batch["signal_blocks"].items()}
    assert model._split(batch["input_ids"], batch["attention_mask"], batch["media_positions"], blocks) is not None
    (fast, fast_grads), (full, full_grads) = both_paths(model, batch)
    assert {"gen_image", "gen_video", "gen_audio"} <= set(fast) == set(full)
    for name in full:
        torch.testing.assert_close(fast[name], full[name], atol=1e-5, rtol=1e-5, msg=name)
    for name, grad in full_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
