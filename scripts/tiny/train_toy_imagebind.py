"""Train the tiny ImageBind on the toy world, in place: ckpt/tiny/imagebind/imagebind_tiny.pth.

Image, video and audio towers against the text tower, ImageBind's InfoNCE (media unit vectors against caption unit
vectors times the text tower's learnable logit scale, both directions), on toy media preprocessed exactly as
nextgpt.imagebind's loaders do, at the toy data's sizes and at the tiny decoders' output sizes (so generated media
are scored in the same space). Captions through ImageBind's tokenizer framing over the image decoder's CLIP BPE
(the vocabulary evaluate.py scores with). So the features carry colour, shape, background, motion, pitch and
pattern: stage 1 can learn to caption them and the ImageBind score means something.

Seeded; skipped when imagebind/toy_training.json holds this recipe; the file is replaced atomically.

    python scripts/tiny/train_toy_imagebind.py --ckpt ckpt/tiny
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import time
from pathlib import Path

from tiny import toyworld as toy
from nextgpt import cli
from nextgpt.io import atomic_write_bytes, atomic_write_text, sha256_file

RECIPE = {"version": 1, "seed": 0, "steps": 250, "batch": 16, "lr": 3e-3, "weight_decay": 0.01}
STAMP = "toy_training.json"
TOWER = {"image": "vision", "video": "vision", "audio": "audio"}


def media_pool(rng: random.Random, copies: int = 1):
    """Preprocessed toy media as nextgpt.imagebind's loaders make them, at the data's and the decoders' sizes.
    -> {"image": ((N, 3, 224, 224), captions), "video": ((N, 1, 3, 2, 224, 224), ...), "audio": ((N, 1, 128, 204), ...)}"""
    import torch

    from nextgpt.imagebind import preprocess, preprocess_audio, preprocess_video

    out = {}
    items = []
    for caption, color, shape, background in toy.image_captions():
        for size in (toy.IMAGE_SIZE, 32):
            for _ in range(copies):
                image = toy.render_image(color, shape, background, (rng.random(), rng.random(), rng.random()), size)
                items.append((preprocess.image_transform(image), caption))
    out["image"] = (torch.stack([x for x, _ in items]), [c for _, c in items])
    items = []
    for caption, color, shape, direction in toy.video_captions():
        for size, fps, seconds in ((toy.VIDEO_SIZE, toy.VIDEO_FPS, toy.VIDEO_SECONDS), (32, 8, 0.5)):
            frames = toy.render_video(color, shape, direction, rng.random(), size=size, fps=fps, seconds=seconds)
            clip = preprocess_video.video_frame_indices(len(frames), fps)[0]
            view = preprocess_video.video_transform([torch.from_numpy(frames[clip])])[1]   # the centre crop
            items.append((view[None], caption))
    out["video"] = (torch.stack([x for x, _ in items]), [c for _, c in items])
    items = []
    for caption, pitch, pattern in toy.audio_captions():
        for seconds in (toy.AUDIO_SECONDS, 1.0):
            for _ in range(2 * copies):
                wave = toy.render_tone(pitch, pattern, rate=16000, seconds=seconds, channels=1, phase=rng.random())
                items.append((preprocess_audio.audio_transform(torch.from_numpy(wave[:, 0]))[0], caption))
    out["audio"] = (torch.stack([x for x, _ in items]), [c for _, c in items])
    return out


def contrastive_loss(model, modality, x, captions, tokenizer):
    """ImageBind's InfoNCE: media (unit) . text (unit x learnable logit scale); captions repeat, so the positives
    of a caption are all its media in the batch."""
    import torch
    import torch.nn.functional as F

    media = model.encode(TOWER[modality], x)                                   # (B, D), unit
    unique = sorted(set(captions))
    text = model.encode("text", tokenizer(unique))                             # (U, D) * logit scale
    logits = media @ text.T                                                    # (B, U)
    target = torch.tensor([unique.index(c) for c in captions])
    positives = (target[None, :] == torch.arange(len(unique))[:, None]).float()       # (U, B)
    media_to_text = F.cross_entropy(logits, target)
    text_to_media = -(F.log_softmax(logits.T, dim=1) * positives).sum(1).div(positives.sum(1)).mean()
    return (media_to_text + text_to_media) / 2, (logits.argmax(1) == target).float().mean().item()


def done(path: Path) -> bool:
    """The stamp beside the .pth names this recipe and the file as it is (make_tiny_ckpt rewrites it random)."""
    stamp = path.with_name(STAMP)
    if not (stamp.is_file() and path.is_file()):
        return False
    made = json.loads(stamp.read_text())
    return made.get("recipe") == RECIPE and made.get("sha256") == sha256_file(path)


def train(ckpt: Path, log=print) -> dict:
    import torch

    from nextgpt.eval.embedders import ImageBindTokenizer
    from nextgpt.imagebind.model import ImageBindModel, preset

    path = ckpt / "imagebind" / "imagebind_tiny.pth"
    stamp = path.with_name(STAMP)
    if done(path):
        log(f"[toy imagebind] trained already ({stamp})")
        return json.loads(stamp.read_text())
    tokenizer_folder = ckpt / "stable-diffusion" / "tokenizer"
    tokenizer = ImageBindTokenizer(tokenizer_folder)
    started = time.time()
    rng = random.Random(RECIPE["seed"])
    pool = media_pool(rng)
    log(f"[toy imagebind] media: " + ", ".join(f"{len(v[1])} {k}" for k, v in pool.items())
        + f" ({time.time() - started:.0f} s)")
    torch.manual_seed(RECIPE["seed"])
    model = ImageBindModel(**preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    model.train()
    steps, accuracy = RECIPE["steps"], {}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = RECIPE["lr"] * min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
        total = 0.0
        for modality, (x, captions) in pool.items():
            index = rng.sample(range(len(captions)), RECIPE["batch"])
            loss, accuracy[modality] = contrastive_loss(model, modality, x[index], [captions[i] for i in index],
                                                        tokenizer)
            total = total + loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"[toy imagebind] step {step}: loss {total.item():.3f}, batch retrieval "
                + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))
    model.eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)              # as make_tiny_ckpt / the released imagebind_huge.pth
    atomic_write_bytes(path, buffer.getvalue())
    result = {"recipe": RECIPE, "sha256": sha256_file(path), "loss": total.item(), "batch_retrieval": accuracy,
              "seconds": round(time.time() - started, 1), "threads": torch.get_num_threads()}
    atomic_write_text(stamp, json.dumps(result, indent=2) + "\n")
    log(f"[toy imagebind] {result['seconds']:.0f} s -> {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="ckpt/tiny", help="the tiny checkpoint folder (default ckpt/tiny)")
    args = parser.parse_args(argv)
    return cli.run(lambda: train(Path(args.ckpt)) and 0, "train_toy_imagebind")


if __name__ == "__main__":
    raise SystemExit(main())
