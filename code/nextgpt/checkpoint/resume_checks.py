"""Which checkpoint a starting run resumes from, and whether it may (the checkpoint layout is in resume.py).

`--resume auto` takes `<output_dir>/latest` if it verifies (every file state/sha256.json and meta.json list is
present with its sha256), else the newest other checkpoint-<N> that does, saying which one was skipped and why.
Resuming checks that the run continues the same training: a changed setting that changes what the steps compute
(learning rate, schedule, steps, batch, data, what trains; see config_changes) is refused in one line naming it and
`--allow-config-change`; allowed, the change is recorded in every later checkpoint's meta.json ("config_changes":
the step and the old -> new values). A checkpoint written by another number of processes is refused in one line
(its ZeRO optimizer partitions are per process); start a new run from its weights with train.init_from instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from nextgpt.io import sha256_file
from nextgpt.checkpoint.resume import CHECKPOINT_RE, DS_TAG, STATE_HASHES


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
             "train.max_bad_steps", "train.dist_timeout", "train.output_dir", "train.init_from", "data.num_workers",
             "data.validate", "data.root", "data.catalog", "data.embed_dir", "data.feature_dir", "model.llm",
             "model.imagebind", "model.decoders", "model.gradient_checkpointing", "inference")


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
