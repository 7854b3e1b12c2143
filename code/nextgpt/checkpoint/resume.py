"""Training checkpoints (ARCHITECTURE §4) and resuming from them.

    <output_dir>/checkpoint-<step>/   delta.safetensors (+ adapter/, tokenizer files, config.yaml, meta.json) from
                                      nextgpt.checkpoint.delta.save_delta: what the next stage's init_from loads
        state/deepspeed/              engine.save_checkpoint(exclude_frozen_parameters=True): optimizer, scheduler
        state/latest                  "deepspeed": DeepSpeed's own tag file, so its zero_to_fp32.py needs no -t
        state/rank_<r>.pt             step, sampler position, every RNG (python, numpy, torch) of rank r and a
                                      sha256 of its trainable weights (all ranks must agree; checked at save)
    <output_dir>/latest               text: the name of the newest complete checkpoint
    <output_dir>/done.json            written once the run has finished (the Makefile's prerequisite)

A checkpoint is written under `.checkpoint-<step>.<run id>.tmp` and renamed when complete, so `latest` only ever
names a complete one. engine.save_checkpoint is collective: every rank writes its ZeRO partition into the same
temporary folder (named from the run id rank 0 broadcast, so all ranks agree on it and no two runs share it); rank 0
renames after a barrier. Before the rename rank 0 writes state/sha256.json (the sha256 of every state file; meta.json
holds those of the delta files), so a truncated optimizer or rank state is found before DeepSpeed reads it:
`--resume auto` falls back to the newest checkpoint that verifies (resume_checks.py: choosing the checkpoint,
verifying it, refusing a changed config or world size).
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

from nextgpt.cli import storage_errno
from nextgpt.io import atomic_write_text, newest_file, publish_dir, sha256_file, storage_cause
from nextgpt.runtime import barrier

DS_TAG = "deepspeed"
STATE_HASHES = "sha256.json"  # state/sha256.json: {"files": {path under state/: sha256}, "meta.json": sha256}
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def _state_files(state: Path) -> list[Path]:
    return sorted(p for p in state.rglob("*") if p.is_file() and p.name != STATE_HASHES)


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


class CheckpointIncomplete(OSError):
    """A rank's part of a checkpoint is not where rank 0 sees it; `latest` stays on the previous checkpoint."""

    every_rank = True


def own_files(engine: Any, state: Path, rank: int) -> list[Path]:
    """The files this rank wrote into `state` at this save: its rank state, and what DeepSpeed's engine says it
    saved (its ZeRO partition; the module states on the rank that writes them). The names are DeepSpeed's own
    (engine._get_*_ckpt_name, the methods save_checkpoint names its files with), not a pattern of ours."""
    files = [state / f"rank_{rank}.pt"]
    if getattr(engine, "save_zero_checkpoint", False) and engine.zero_optimization_stage() > 0:
        files.append(Path(engine._get_zero_ckpt_name(str(state), DS_TAG)))
    if getattr(engine, "save_non_zero_checkpoint", False):
        files.append(Path(engine._get_ckpt_name(str(state), DS_TAG)))
    return files


def missing_parts(seen: dict[str, str], written: list[dict[str, str]]) -> list[tuple[int, str, str]]:
    """[(rank, file under state/, what is wrong)] for every file a rank wrote (`written[rank]`: {name: sha256})
    that rank 0's view (`seen`: {name: sha256}) lacks or holds with other bytes."""
    return [(r, name, "missing" if name not in seen else "sha256 differs")
            for r, files in enumerate(written) for name, digest in sorted(files.items())
            if seen.get(name) != digest]


def _gather_problem(seen: dict[str, str], written: dict[str, str], rank: int, final: Path) -> str | None:
    """Collective: every rank's own {file: sha256} to rank 0, checked against what rank 0 sees (missing_parts);
    the one-line problem (the same on every rank) or None."""
    gathered: list[Any] = [written]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        gathered = [None] * torch.distributed.get_world_size() if rank == 0 else None
        torch.distributed.gather_object(written, gathered, dst=0)
    box = [None]
    if rank == 0 and (parts := missing_parts(seen, gathered)):
        r, name, what = parts[0]
        more = f" (+{len(parts) - 1} more)" if len(parts) > 1 else ""
        pointer = final.parent / "latest"
        stays = f"latest stays {pointer.read_text().strip()}" if pointer.is_file() else "no checkpoint is latest yet"
        box[0] = (f"{final.name} not completed: rank {r}'s state/{name} is {what} in the folder rank 0 sees{more} "
                  f"(not one shared folder?); {stays}")
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def save(engine: Any, output_dir: str | os.PathLike, step: int, rank: int, train_state: dict[str, Any],
         write_delta: Callable[[Path], None], keep_last: int, run_id: str = "") -> Path:
    """Write checkpoint-<step> atomically (collective: every rank calls it). `write_delta(folder)` runs on rank 0
    first; `train_state` (step, sampler position, ...) is saved per rank together with the RNG states. `run_id`
    (the same on every rank) makes the temporary folder's name this run's own."""
    output_dir = Path(output_dir)
    final = checkpoint_path(output_dir, step)
    tmp = output_dir / (f".{final.name}.{run_id}.tmp" if run_id else f".{final.name}.tmp")
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed while saving
            tmp.mkdir(parents=True)
            write_delta(tmp)  # before the state: save_delta may replace its target folder as a whole
        barrier()
        # save_latest writes state/latest (the tag), which DeepSpeed's zero_to_fp32.py reads when run without -t
        engine.save_checkpoint(str(tmp / "state"), tag=DS_TAG, client_state={"step": step}, save_latest=True,
                               exclude_frozen_parameters=True)
        digest = check_ranks_agree(engine.module, step)
        state = tmp / "state"
        torch.save({**train_state, "step": step, "weights_sha256": digest, "rng": rng_state()},
                   state / f"rank_{rank}.pt")
        written = {str(p.relative_to(state)): sha256_file(p) for p in own_files(engine, state, rank)}
        barrier()
        # Rank 0 hashes the files it sees; `latest` moves only when every rank's own files are among them with
        # the same sha256 (a node writing to its own disk, a file lost on the way: never a silent hole).
        seen = {str(p.relative_to(state)): sha256_file(p) for p in _state_files(state)} if rank == 0 else {}
        record = {"files": seen}
        problem = _gather_problem(seen, written, rank, final)
        if problem:
            raise CheckpointIncomplete(problem)
        if rank == 0:
            if (tmp / "meta.json").is_file():  # meta.json holds the delta files' hashes: vouch for it in turn
                record["meta.json"] = sha256_file(tmp / "meta.json")
            atomic_write_text(state / STATE_HASHES, json.dumps(record, indent=1) + "\n")
    except BaseException as e:
        # Disk full / read-only / quota / a second Ctrl-C mid-save: drop the partial copy (frees its space); the
        # previous checkpoint and `latest` were never touched. A library's own error (safetensors' text; torch's
        # zip writer, which loses the errno: asked of the file system before the partial copy goes) becomes the
        # OSError behind it, naming the file being written.
        code = storage_errno(e)
        if code is None and isinstance(e, (RuntimeError, OSError)):
            code = storage_cause(tmp)
        partial = newest_file(tmp) if code is not None else None
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if code is not None and not (isinstance(e, OSError) and e.filename):
            where = f"{final} ({partial.relative_to(tmp)})" if partial else str(final)  # its name once published
            raise OSError(code, os.strerror(code), where) from e
        raise
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
    patterns = (".checkpoint-*.tmp", ".checkpoint-*.old", ".latest.*.tmp", ".done.json.*.tmp", ".run.lock.stale.*")
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
