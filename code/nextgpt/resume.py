"""Training checkpoints (ARCHITECTURE §4) and resuming from them.

    <output_dir>/checkpoint-<step>/   delta.safetensors (+ adapter/, tokenizer files, config.yaml, meta.json) from
                                      nextgpt.checkpoint.save_delta: what the next stage's init_from loads
        state/deepspeed/              engine.save_checkpoint(exclude_frozen_parameters=True): optimizer, scheduler
        state/rank_<r>.pt             step, sampler position, every RNG (python, numpy, torch) of rank r and a
                                      sha256 of its trainable weights (all ranks must agree; checked at save)
    <output_dir>/latest               text: the name of the newest complete checkpoint
    <output_dir>/done.json            written once the run has finished (the Makefile's prerequisite)

A checkpoint is written under `.checkpoint-<step>.tmp` and renamed when complete, so `latest` only ever names a
complete one. engine.save_checkpoint is collective: every rank writes its ZeRO partition into the same temporary
folder (a fixed name, not mkdtemp, so all ranks agree on it); rank 0 renames after a barrier.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from nextgpt.io import atomic_write_text, publish_dir
from nextgpt.runtime import barrier

DS_TAG = "deepspeed"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def latest(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `<output_dir>/latest` names, or None when there is none yet."""
    pointer = Path(output_dir) / "latest"
    if not pointer.is_file():
        return None
    path = Path(output_dir) / pointer.read_text().strip()
    if not (path / "state").is_dir():
        raise FileNotFoundError(f"{pointer}: names {path.name}, which has no state/ folder")
    return path


def find_resume(output_dir: str | os.PathLike, resume: str) -> Path | None:
    """--resume auto (the latest checkpoint if any) | none | <checkpoint dir or output dir>."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest(output_dir)
    path = Path(resume)
    if (path / "latest").is_file() and not (path / "state").is_dir():
        path = latest(path)
    if path is None or not (path / "state" / DS_TAG).is_dir():
        raise FileNotFoundError(f"--resume {resume}: not a training checkpoint (no state/{DS_TAG} folder)")
    return path


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over the names and bytes of the trainable parameters (ZeRO-2 keeps full copies on every rank)."""
    digest = hashlib.sha256()
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_ranks_agree(module: torch.nn.Module, step: int) -> str:
    """Every rank must hold the same trainable weights; a divergence is a bug worth stopping for."""
    digest = weights_digest(module)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        digests: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            raise RuntimeError(f"step {step}: ranks hold different trainable weights "
                               f"({', '.join(f'rank {r} {d[:12]}' for r, d in enumerate(digests))})")
    return digest


def save(engine: Any, output_dir: str | os.PathLike, step: int, rank: int, train_state: dict[str, Any],
         write_delta: Callable[[Path], None], keep_last: int) -> Path:
    """Write checkpoint-<step> atomically (collective: every rank calls it). `write_delta(folder)` runs on rank 0
    first; `train_state` (step, sampler position, ...) is saved per rank together with the RNG states."""
    output_dir = Path(output_dir)
    final = checkpoint_path(output_dir, step)
    tmp = output_dir / f".{final.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed while saving
        tmp.mkdir(parents=True)
        write_delta(tmp)  # before the state: save_delta may replace its target folder as a whole
    barrier()
    engine.save_checkpoint(str(tmp / "state"), tag=DS_TAG, client_state={"step": step}, save_latest=False,
                           exclude_frozen_parameters=True)
    digest = check_ranks_agree(engine.module, step)
    torch.save({**train_state, "step": step, "weights_sha256": digest, "rng": rng_state()},
               tmp / "state" / f"rank_{rank}.pt")
    barrier()
    if rank == 0:
        publish_dir(tmp, final)  # an earlier run that reached the same step is replaced
        atomic_write_text(output_dir / "latest", final.name + "\n")
        rotate(output_dir, keep_last, final)
    barrier()
    return final


def remove_partial(output_dir: str | os.PathLike) -> list[Path]:
    """Delete what a run killed while saving left behind (temporary checkpoint folders and pointer files)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    patterns = (".checkpoint-*.tmp", ".checkpoint-*.old", ".latest.*.tmp", ".done.json.*.tmp")
    found = [p for pattern in patterns for p in output_dir.glob(pattern)]
    for p in found:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return found


def rotate(output_dir: Path, keep_last: int, current: Path) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (never `current`); keep_last <= 0 keeps all."""
    if keep_last <= 0:
        return []
    found = sorted((int(m.group(1)), p) for p in output_dir.iterdir()
                   if p.is_dir() and (m := CHECKPOINT_RE.match(p.name)))
    removed = [p for _, p in found[:-keep_last] if p != current]
    for p in removed:
        shutil.rmtree(p)
    return removed


def _load_trainable(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """DeepSpeed's module state holds only the trainable tensors (exclude_frozen_parameters=True): load those
    strictly, i.e. every trainable parameter must be there and nothing unknown may be."""
    result = dst.load_state_dict(src, strict=False)
    trainable = {n for n, p in dst.named_parameters() if p.requires_grad}
    missing = sorted(set(result.missing_keys) & trainable)
    if missing or result.unexpected_keys:
        raise ValueError(f"training state does not match the model: missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {result.unexpected_keys[:8]}")


def load(engine: Any, path: str | os.PathLike, rank: int) -> dict[str, Any]:
    """Restore engine (trainable weights, optimizer, scheduler), RNGs; return this rank's train state."""
    path = Path(path)
    rank_file = path / "state" / f"rank_{rank}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file}: missing; was the checkpoint written with a different world size?")
    load_path, _ = engine.load_checkpoint(str(path / "state"), tag=DS_TAG, custom_load_fn=_load_trainable)
    if load_path is None:
        raise FileNotFoundError(f"{path / 'state'}: DeepSpeed could not load the checkpoint")
    state = torch.load(rank_file, map_location="cpu", weights_only=False)  # our own file: python RNG tuples
    set_rng_state(state.pop("rng"))
    return state


def write_done(output_dir: str | os.PathLike, step: int, checkpoint: Path, extra: dict[str, Any]) -> None:
    record = {"step": step, "checkpoint": Path(checkpoint).name, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
              **extra}
    atomic_write_text(Path(output_dir) / "done.json", json.dumps(record, indent=2) + "\n")
