"""Train the tiny decoders on the toy world, in place: ckpt/tiny/{stable-diffusion,zeroscope,audioldm}/{vae,unet}.

    image  VAE (32x32 RGB <-> 16x16x4) + UNet2DCondition on the pipeline's CLIP text embeddings of the toy captions
    video  the image VAE (frames) + UNet3DCondition on its own CLIP text embeddings
    audio  VAE on the toy tones' band spectrogram (toy_audio) + AudioLDM's UNet on the pooled CLAP embeddings;
           the vocoder is toy_audio's exact inverse of that spectrogram (written by make_tiny_ckpt, not trained)

The recipe (arXiv 2305.08891, 2303.09556): v-prediction on a cosine schedule rescaled to zero terminal SNR (so the
first sampling step already predicts the medium from the caption alone), loss weight min(SNR + 1, 5) / (SNR + 1),
10% of captions replaced by the empty prompt (classifier-free guidance), DDIM with trailing timesteps to sample.
The VAEs are plain autoencoders (the posterior mean, L1 + L2) and their scaling_factor makes latents unit-variance.
Colour x shape combinations in toyworld.HELD_OUT are never trained on. The media are rendered where the shape sits
(jitter 0), so one caption means one picture and a few hundred steps on two CPU cores learn it.

Seeded and deterministic on one machine; a pipeline whose folder holds toy_training.json with this recipe is skipped.
Each pipeline's vae/ and unet/ are replaced atomically, so an interrupted run leaves the random weights and runs
again.

    python scripts/tiny/train_toy_decoders.py --ckpt ckpt/tiny [--only image video audio]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

from tiny import toy_audio
from tiny import toyworld as toy
from nextgpt import cli
from nextgpt.io import atomic_write_text

FOLDERS = {"image": "stable-diffusion", "video": "zeroscope", "audio": "audioldm"}
PIPELINES = {"image": "StableDiffusionPipeline", "video": "TextToVideoSDPipeline", "audio": "AudioLDMPipeline"}
RECIPE = {"version": 2, "seed": 0, "vae_steps": 500, "audio_vae_steps": 300, "image_steps": 800,
          "video_steps": 600, "audio_steps": 500, "batch": 16, "lr": 3e-3, "vae_lr": 3e-3, "drop": 0.1,
          "gamma": 5.0, "held_out": [list(c) for c in toy.HELD_OUT]}
STAMP = "toy_training.json"


def _cosine(opt, base: float, step: int, steps: int, warmup: int = 20) -> None:
    for group in opt.param_groups:
        group["lr"] = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def train_vae(vae, pool, steps: int, batch: int, lr: float, generator, log):
    """Autoencode `pool` (N, C, H, W) in [-1, 1]; set scaling_factor; -> latents (N, 4, H/2, W/2), scaled."""
    import torch

    opt = torch.optim.AdamW(vae.parameters(), lr, weight_decay=0.0)
    vae.train().requires_grad_(True)
    for step in range(steps):
        _cosine(opt, lr, step, steps)
        x = pool[torch.randint(0, len(pool), (batch,), generator=generator)]
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pool[i:i + 256]).latent_dist.mode() for i in range(0, len(pool), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return latents * vae.config.scaling_factor, loss.item()


def train_unet(unet, latents, conditions, uncond, steps: int, call, generator, log, recipe: dict) -> float:
    """Diffusion training: latents (N, ...) with their conditioning (N, ...); `call(unet, noisy, t, cond)` -> v."""
    import torch
    from diffusers import DDPMScheduler

    from tiny import make_tiny_ckpt

    config = make_tiny_ckpt.toy_scheduler_config()
    schedule = DDPMScheduler(num_train_timesteps=config["num_train_timesteps"], beta_schedule=config["beta_schedule"],
                             prediction_type=config["prediction_type"],
                             rescale_betas_zero_snr=config["rescale_betas_zero_snr"])
    alphas = schedule.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), recipe["lr"], weight_decay=0.0)
    unet.train().requires_grad_(True)
    batch = recipe["batch"]
    for step in range(steps):
        _cosine(opt, recipe["lr"], step, steps)
        index = torch.randint(0, len(latents), (batch,), generator=generator)
        z, c = latents[index], conditions[index]
        dropped = torch.rand(batch, generator=generator) < recipe["drop"]
        c = torch.where(dropped.view(-1, *[1] * (c.dim() - 1)), uncond.expand_as(c), c)
        t = torch.randint(0, config["num_train_timesteps"], (batch,), generator=generator)
        noise = torch.randn(z.shape, generator=generator)
        v = schedule.get_velocity(z, noise, t)
        prediction = call(unet, schedule.add_noise(z, noise, t), t, c)
        snr = alphas[t] / (1 - alphas[t]).clamp(min=1e-8)
        weight = torch.clamp(snr + 1, max=recipe["gamma"]) / (snr + 1)
        loss = (weight * ((prediction - v) ** 2).flatten(1).mean(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f}")
    unet.eval().requires_grad_(False)
    return loss.item()


# ---------------------------------------------------------------------------------------------------- toy media
def image_pool(height: int):
    """(N, 3, H, H) in [-1, 1] and the captions: every trained-on image caption, the shape where it sits."""
    import numpy as np
    import torch

    rows = [(c, col, sh, bg) for c, col, sh, bg in toy.image_captions() if not toy.held_out(col, sh)]
    pixels = np.stack([np.asarray(toy.render_image(col, sh, bg, size=height)) for _, col, sh, bg in rows])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1, [r[0] for r in rows]


def video_pool(height: int, frames: int):
    """(N, 3, F, H, H) in [-1, 1] and the captions: the shape crossing the frame in `frames` frames."""
    import numpy as np
    import torch

    rows = [(c, col, sh, d) for c, col, sh, d in toy.video_captions() if not toy.held_out(col, sh)]
    clips = np.stack([toy.render_video(col, sh, d, size=height, fps=frames, seconds=1.0) for _, col, sh, d in rows])
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1, [r[0] for r in rows]


def audio_pool(seconds: float, copies: int, seed: int):
    """(N, 1, frames, bins) toy_audio spectrograms of every toy tone (`copies` phases each) and the captions."""
    import random

    import numpy as np
    import torch

    rng = random.Random(seed)
    rows = [(c, p, pat) for c, p, pat in toy.audio_captions() for _ in range(copies)]
    mels = [toy_audio.to_mel(toy_audio.spectrogram(toy.render_tone(p, pat, rate=toy_audio.RATE, seconds=seconds,
                                                                    channels=1, phase=rng.random())[:, 0]))
            for _, p, pat in rows]
    return torch.from_numpy(np.stack(mels))[:, None], [r[0] for r in rows]


def embeddings(pipeline, modality: str, captions: list[str]):
    """(N, ...) caption embeddings through the pipeline's own text encoder (the stage-2 targets), and the empty
    prompt's (the unconditional input, as nextgpt.model.decoders gives for guidance)."""
    import torch

    with torch.no_grad():
        if modality == "audio":
            table = {c: pipeline._encode_prompt(c, "cpu", 1, False) for c in dict.fromkeys(captions + [""])}
        else:
            table = {c: pipeline.encode_prompt(c, "cpu", 1, False)[0] for c in dict.fromkeys(captions + [""])}
    return torch.cat([table[c] for c in captions]), table[""]


def _save(module, folder: Path) -> None:
    """Replace folder (a pipeline's vae/ or unet/) by module.save_pretrained, atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    module.save_pretrained(str(tmp), safe_serialization=True)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _load(ckpt: Path, modality: str):
    import diffusers

    folder = ckpt / FOLDERS[modality]
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder}: no tiny {modality} pipeline (run scripts/tiny/make_tiny_ckpt.py first)")
    pipeline = getattr(diffusers, PIPELINES[modality]).from_pretrained(str(folder), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, folder


def done(folder: Path) -> bool:
    stamp = folder / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()).get("recipe") == RECIPE


def train(ckpt: Path, modalities: list[str], log=print) -> dict:
    import torch

    from tiny import make_tiny_ckpt

    todo = [m for m in modalities if not done(ckpt / FOLDERS[m])]
    for m in modalities:
        if m not in todo:
            log(f"[toy decoders] {m}: trained already ({ckpt / FOLDERS[m] / STAMP})")
    results = {}
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    sizes = make_tiny_ckpt.TINY_INFERENCE
    rgb = {}
    if "image" in todo or "video" in todo:
        started = time.time()
        pipeline, _ = _load(ckpt, "image")
        images, image_captions = image_pool(sizes["image"]["height"])
        clips, video_captions = video_pool(sizes["video"]["height"], sizes["video"]["frames"])
        frames = clips.permute(0, 2, 1, 3, 4).reshape(-1, *clips.shape[1:2], *clips.shape[3:])
        vae = pipeline.vae
        torch.manual_seed(RECIPE["seed"])
        _, vae_loss = train_vae(vae, torch.cat([images, frames]), RECIPE["vae_steps"], RECIPE["batch"],
                                RECIPE["vae_lr"], generator, lambda m: log(f"[toy decoders] rgb {m}"))
        with torch.no_grad():
            scale = vae.config.scaling_factor
            image_latents = vae.encode(images).latent_dist.mode() * scale
            frame_latents = vae.encode(frames).latent_dist.mode() * scale
        video_latents = frame_latents.reshape(len(clips), -1, *frame_latents.shape[1:]).permute(0, 2, 1, 3, 4)
        rgb = dict(vae=vae, seconds=time.time() - started, loss=vae_loss)
        log(f"[toy decoders] rgb VAE: {rgb['seconds']:.0f} s")
    for modality in todo:
        started = time.time()
        pipeline, folder = _load(ckpt, modality)
        log_m = lambda m: log(f"[toy decoders] {modality} {m}")
        if modality == "audio":
            mels, captions = audio_pool(sizes["audio"]["seconds"], 4, RECIPE["seed"])
            latents, vae_loss = train_vae(pipeline.vae, mels, RECIPE["audio_vae_steps"], RECIPE["batch"],
                                          RECIPE["vae_lr"], generator, log_m)
            conditions, uncond = embeddings(pipeline, modality, captions)
            unet_loss = train_unet(pipeline.unet, latents, conditions, uncond, RECIPE["audio_steps"],
                                   lambda u, z, t, c: u(z, t, encoder_hidden_states=None, class_labels=c).sample,
                                   generator, log_m, RECIPE)
            vae = pipeline.vae
        else:
            latents, captions = (image_latents, image_captions) if modality == "image" else (video_latents, video_captions)
            conditions, uncond = embeddings(pipeline, modality, captions)
            unet_loss = train_unet(pipeline.unet, latents, conditions, uncond, RECIPE[f"{modality}_steps"],
                                   lambda u, z, t, c: u(z, t, encoder_hidden_states=c).sample, generator, log_m, RECIPE)
            vae, vae_loss = rgb["vae"], rgb["loss"]
        _save(vae, folder / "vae")
        _save(pipeline.unet, folder / "unet")
        seconds = time.time() - started + (rgb.get("seconds", 0.0) if modality != "audio" else 0.0) / 2
        results[modality] = {"recipe": RECIPE, "vae_loss": vae_loss, "unet_loss": unet_loss,
                             "seconds": round(seconds, 1), "threads": torch.get_num_threads()}
        atomic_write_text(folder / STAMP, json.dumps(results[modality], indent=2) + "\n")
        log(f"[toy decoders] {modality}: {seconds:.0f} s -> {folder}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="ckpt/tiny", help="the tiny checkpoint folder (default ckpt/tiny)")
    parser.add_argument("--only", nargs="*", choices=list(FOLDERS), default=list(FOLDERS))
    args = parser.parse_args(argv)
    return cli.run(lambda: train(Path(args.ckpt), args.only) and 0, "train_toy_decoders")


if __name__ == "__main__":
    raise SystemExit(main())
