"""What a training run reports: rank-0 log lines (train.log), scalars (metrics.jsonl + TensorBoard), and the
running means of the loss terms that both the training loop and evaluation accumulate.

Nothing happens at import; tqdm and TensorBoard are imported when first used.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from nextgpt import runtime
from nextgpt.io import atomic_write_text
from nextgpt.model.losses import TERMS


class TermMeans:
    """Sums and counts of the loss terms over micro-batches; `means()` averages them over every rank. Made at the
    start of a window (a training step, an evaluation); `rates()` gives its samples and tokens per second.

    A term may be missing from a micro-batch (no such modality in it), so each term keeps its own count."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.start, self.samples, self.tokens = time.time(), 0, 0

    def add(self, out: dict[str, torch.Tensor], batch: dict | None = None, world_size: int = 1) -> None:
        for name, value in out.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value.detach())
            self.counts[name] = self.counts.get(name, 0.0) + 1.0
        if batch is not None:  # estimate: this rank's batch x world size
            self.samples += batch["input_ids"].shape[0] * world_size
            self.tokens += int(batch["attention_mask"].sum()) * world_size

    def rates(self) -> dict[str, float]:
        elapsed = max(time.time() - self.start, 1e-9)
        return {"samples_per_s": self.samples / elapsed, "tokens_per_s": self.tokens / elapsed}

    def means(self, device: torch.device) -> dict[str, float]:
        """{term: mean} of the global batch (every rank calls this), not rank 0's share. (The held-out
        evaluation does not average micro-batches: nextgpt.eval.run.heldout_loss weights by tokens.)"""
        return runtime.mean_over_ranks(self.sums, self.counts, TERMS, device)


class RunLog:
    """Rank-0 logging: tqdm-safe prints, <output_dir>/train.log, metrics.jsonl, and the trackers train.report_to
    names: TensorBoard scalars (<output_dir>/tensorboard) and Weights & Biases (the resolved config + scalars;
    files under <output_dir>/wandb; WANDB_MODE=offline runs without an account, `wandb sync` uploads later)."""

    def __init__(self, output_dir: Path, enabled: bool, report_to: "list[str] | tuple[str, ...]" = ("tensorboard",),
                 config: dict | None = None):
        self.enabled, self.output_dir = enabled, output_dir
        self.tensorboard = "tensorboard" in report_to
        self.text = self.metrics = self.writer = self.wandb = None
        self.purge_step: int | None = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.text = open(output_dir / "train.log", "a", buffering=1)
        self.metrics = open(output_dir / "metrics.jsonl", "a", buffering=1)
        if "wandb" in report_to:
            self.wandb = self._start_wandb(config or {})

    def _start_wandb(self, config: dict):
        """A W&B run whose id is derived from the output folder, so a resumed run continues the same W&B run."""
        import hashlib
        import os

        try:
            import wandb
        except ImportError:
            self("warning: train.report_to lists wandb but it is not installed (pip install wandb); not tracked")
            return None
        run_id = hashlib.sha1(str(self.output_dir.resolve()).encode()).hexdigest()[:16]
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "nextgpt-train"), name=self.output_dir.name,
                          id=run_id, resume="allow", dir=str(self.output_dir), config=config)

    def resume_at(self, step: int) -> None:
        """Forget the scalars an interrupted run logged after the checkpoint it resumes from (they are redone)."""
        if not self.enabled:
            return
        self.metrics.close()
        path = self.output_dir / "metrics.jsonl"
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.metrics = open(path, "a", buffering=1)
        self.purge_step = step + 1  # TensorBoard drops events at or after this step

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm
        tqdm.write(message)
        self.text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def scalars(self, prefix: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"split": prefix, "step": step, **values}) + "\n")
        if self.tensorboard and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self.purge_step)
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{name}": value for name, value in values.items()}, step=step)

    def media(self, step: int, items) -> None:
        """Generated media to W&B: items of (tag, Decoded, caption text or ImageBind score or None), e.g.
        eval.training.GenerationChecks.pending (its write_media sends the same media to TensorBoard). Image: PIL; video: (F, H, W, 3) uint8 frames, logged
        as an animated GIF (raw frames would need moviepy); audio: float samples at Decoded.rate."""
        if self.wandb is None or not items:
            return
        import tempfile

        import numpy as np
        import wandb
        from PIL import Image

        logged = {}
        with tempfile.TemporaryDirectory() as tmp:     # W&B copies the GIFs into the run when log() is called
            for n, (tag, decoded, caption) in enumerate(items):
                if isinstance(caption, float):
                    caption = f"ImageBind score {caption:.3f}"
                if decoded.modality == "image":
                    logged[tag] = wandb.Image(decoded.data, caption=caption)
                elif decoded.modality == "video":
                    frames = [Image.fromarray(frame) for frame in np.asarray(decoded.data)]
                    gif = Path(tmp) / f"video_{n}.gif"
                    frames[0].save(gif, save_all=True, append_images=frames[1:], loop=0,
                                   duration=int(1000 / max(decoded.rate, 1)))
                    logged[tag] = wandb.Video(str(gif), caption=caption, format="gif")
                else:
                    logged[tag] = wandb.Audio(np.clip(np.asarray(decoded.data, dtype=np.float32), -1, 1),
                                              sample_rate=int(decoded.rate), caption=caption)
            self.wandb.log(logged, step=step)

    def close(self) -> None:
        for f in (self.text, self.metrics, self.writer):
            if f is not None:
                f.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
