"""Training checkpoints (ARCHITECTURE §4) and resuming from them.

    <output_dir>/checkpoint-<step>/   delta.safetensors (+ adapter/, tokenizer files, config.yaml, meta.json) from
                                      nextgpt.checkpoint.save_delta: what the next stage's init_from loads
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
`--resume auto` falls back to the newest checkpoint that verifies, saying which one was skipped and why.

Resuming checks that the run continues the same training: a changed setting that changes what the steps compute
(learning rate, schedule, steps, batch, data, what trains; see config_changes) is refused in one line naming it and
`--allow-config-change`; allowed, the change is recorded in every later checkpoint's meta.json ("config_changes":
the step and the old -> new values). A checkpoint written by another number of processes is refused in one line
(its ZeRO optimizer partitions are per process); start a new run from its weights with train.init_from instead.
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
from nextgpt.io import atomic_write_text, publish_dir, sha256_file
from nextgpt.runtime import barrier

DS_TAG = "deepspeed"
STATE_HASHES = "sha256.json"  # state/sha256.json: {"files": {path under state/: sha256}, "meta.json": sha256}
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
    """--resume auto (the latest checkpoint if any) | none | <checkpoint dir or output dir>; see choose()."""
    return choose(output_dir, resume)[0]


def choose(output_dir: str | os.PathLike, resume: str, verify_files: bool = True) -> tuple[Path | None, list[str]]:
    """(the checkpoint to resume from or None, notes on checkpoints passed over).

    auto: `latest` if it verifies, else the newest other checkpoint-<N> that does (each one skipped is named in
    the notes with its problem); nothing verifies -> FileNotFoundError naming the newest problem. An explicit
    folder must verify itself (ValueError naming the corrupt file)."""
    if resume == "none":
        return None, []
    if resume != "auto":
        path = Path(resume)
        if (path / "latest").is_file() and not (path / "state").is_dir():
            path = latest(path)
        if path is None or not (path / "state" / DS_TAG).is_dir():
            raise FileNotFoundError(f"--resume {resume}: not a training checkpoint (no state/{DS_TAG} folder)")
        if verify_files and (problems := verify(path)):
            raise ValueError(f"--resume {resume}: {problems[0]}" + (f" (+{len(problems) - 1} more)"
                                                                    if len(problems) > 1 else ""))
        return path, []
    output_dir = Path(output_dir)
    pointer = output_dir / "latest"
    named = output_dir / pointer.read_text().strip() if pointer.is_file() else None
    found = sorted((int(m.group(1)), p) for p in output_dir.iterdir()
                   if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))) if output_dir.is_dir() else []
    candidates = ([named] if named is not None else []) + [p for _, p in reversed(found) if p != named]
    notes: list[str] = []
    for path in candidates:
        missing = (f"{pointer}: names {path.name}, which has no state/{DS_TAG} folder" if path == named else
                   f"{path}: has no state/{DS_TAG} folder")
        problems = ([missing] if not (path / "state" / DS_TAG).is_dir() else
                    verify(path) if verify_files else [])
        if not problems:
            if notes:
                notes.append(f"resuming from {path.name} instead (the newest checkpoint that verifies)")
            return path, notes
        notes.append(f"skipping {path.name}: {problems[0]}" + (f" (+{len(problems) - 1} more)"
                                                                if len(problems) > 1 else ""))
    if notes:
        raise FileNotFoundError(f"{output_dir}: no checkpoint verifies ({notes[0]}); use --resume none to start "
                                "over")
    return None, []


def plan(output_dir: str | os.PathLike, resume: str, config: dict[str, Any], world_size: int, allow_change: bool,
         log: Callable[[str], None]) -> tuple[Path | None, list[str]]:
    """What a starting run resumes from, checked before anything is loaded or written: choose() (the newest
    checkpoint that verifies), check_world_size and check_config. -> (checkpoint or None, allowed config changes)."""
    start, notes = choose(output_dir, resume)
    for note in notes:
        log(note)
    if start is None:
        return None, []
    check_world_size(start, world_size)
    changes = check_config(start, config, allow_change)
    for change in changes:
        log(f"config changed on resume (--allow-config-change): {change}")
    return start, changes


def _state_files(state: Path) -> list[Path]:
    return sorted(p for p in state.rglob("*") if p.is_file() and p.name != STATE_HASHES)


def verify(checkpoint: str | os.PathLike) -> list[str]:
    """What is wrong with a training checkpoint folder (empty: every file state/sha256.json lists, meta.json
    included, and every file meta.json lists is present with its sha256). A checkpoint from before state hashes
    existed verifies its delta files only."""
    checkpoint = Path(checkpoint)
    problems = []
    for listing, folder in ((checkpoint / "state" / STATE_HASHES, checkpoint / "state"),
                            (checkpoint / "meta.json", checkpoint)):
        if not listing.is_file():
            if listing.name == STATE_HASHES and not (checkpoint / "meta.json").is_file():
                problems.append(f"{checkpoint}: neither state/{STATE_HASHES} nor meta.json (nothing to verify)")
            continue
        try:
            record = json.loads(listing.read_text())
            files = dict(record["files"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
            problems.append(f"{listing}: unreadable ({type(e).__name__})")
            continue
        if listing.name == STATE_HASHES and "meta.json" in record:
            files["../meta.json"] = record["meta.json"]
        for name, digest in files.items():
            path = Path(os.path.normpath(folder / name))
            if not path.is_file():
                problems.append(f"{path}: listed in {listing.name}, missing")
            elif sha256_file(path) != digest:
                problems.append(f"{path}: sha256 differs from {listing.name} (truncated or corrupt)")
    return problems


def world_size_of(checkpoint: str | os.PathLike) -> int:
    """How many processes wrote the checkpoint (one state/rank_<r>.pt each)."""
    return len(list((Path(checkpoint) / "state").glob("rank_*.pt")))


def check_world_size(checkpoint: str | os.PathLike, world_size: int) -> None:
    """Refuse, in one line, to resume on another number of processes than wrote the checkpoint."""
    saved = world_size_of(checkpoint)
    if saved != world_size:
        raise ValueError(f"{checkpoint}: written by {saved} process(es), this run has {world_size}; resuming on "
                         f"another number of processes is not supported (ZeRO optimizer state is partitioned per "
                         f"process): rerun with {saved}, or start a new run from its weights with "
                         f"train.init_from={checkpoint} --resume none")


# Settings that do not change what a training step computes: a resumed run may change them freely.
FREE_KEYS = ("train.log_every", "train.eval_every", "train.save_every", "train.keep_last", "train.report_to",
             "train.max_bad_steps", "train.output_dir", "train.init_from", "data.num_workers", "data.validate",
             "data.root", "data.catalog", "data.embed_dir", "data.feature_dir", "model.llm", "model.imagebind",
             "model.decoders", "model.gradient_checkpointing", "inference")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every setting that differs between two resolved configs (as dicts) and changes
    what training computes (FREE_KEYS and keys only one side knows are left out)."""
    old, new = _flatten(saved), _flatten(current)
    changes = []
    for key in sorted(set(old) & set(new)):
        if any(key == free or key.startswith(free + ".") for free in FREE_KEYS):
            continue
        if old[key] != new[key]:
            changes.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return changes


def check_config(checkpoint: str | os.PathLike, current: dict[str, Any], allow: bool) -> list[str]:
    """The changes against the config the checkpoint was trained with; refused (ValueError) unless `allow`."""
    from nextgpt.io import read_yaml

    path = Path(checkpoint) / "config.yaml"
    if not path.is_file():
        return []
    saved = read_yaml(path)
    changes = config_changes(saved, current)
    if changes and not allow:
        raise ValueError(f"resuming {checkpoint} with a changed config: {'; '.join(changes[:4])}"
                         f"{f' (+{len(changes) - 4} more)' if len(changes) > 4 else ''}; pass "
                         "--allow-config-change to continue with it (recorded in meta.json), or use another "
                         "train.output_dir / --resume none")
    return changes


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
        torch.save({**train_state, "step": step, "weights_sha256": digest, "rng": rng_state()},
                   tmp / "state" / f"rank_{rank}.pt")
        barrier()
        if rank == 0:
            state = tmp / "state"
            record = {"files": {str(p.relative_to(state)): sha256_file(p) for p in _state_files(state)}}
            if (tmp / "meta.json").is_file():  # meta.json holds the delta files' hashes: vouch for it in turn
                record["meta.json"] = sha256_file(tmp / "meta.json")
            atomic_write_text(state / STATE_HASHES, json.dumps(record, indent=1) + "\n")
    except BaseException as e:
        # Disk full / read-only / a second Ctrl-C mid-save: drop the partial copy (frees its space); the previous
        # checkpoint and `latest` were never touched. A library's own error type (safetensors, DeepSpeed) becomes the OSError it
        # wraps, naming the checkpoint being written.
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        code = storage_errno(e)
        if code is not None and not (isinstance(e, OSError) and e.filename):
            raise OSError(code, os.strerror(code), str(final)) from e
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
