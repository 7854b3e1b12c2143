"""Dataset-scale precompute over a store: what is already done, the one manifest a finished run merges, and which
batches each rank of a sharded run computes."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from nextgpt.io import atomic_write_text
from nextgpt.store.files import check_npy, compact_file_hashes, read_file_hashes
from nextgpt.store.manifest import Manifest, Section, StoreError, item_path, read_manifest, write_manifest
from nextgpt.store.reader import forget_reader
from nextgpt.store.shards import read_index, shard_table

def done_names(folder: str | Path, modality: str, layout: str, names: Sequence[str], shape: Sequence[int],
               hashes: dict[str, str] | None = None, dtype: str | None = None) -> set[str]:
    """Of `names`, those already stored complete, of `shape`, and (when `hashes` is given) made from the same
    caption. The files layout checks each .npy header against its size (no array load). A shard of another
    `dtype` holding one of them is an error (a store has one dtype per modality)."""
    folder = Path(folder)
    if layout == "shards":
        table = shard_table(folder, modality)
        done = set()
        shapes_ok: dict[Path, bool] = {}
        for name in names:
            entry = table.get(name)
            if entry is None or (hashes is not None and entry[2] != hashes.get(name)):
                continue
            if entry[0] not in shapes_ok:
                index = read_index(entry[0].with_name(entry[0].name[:-4] + ".index.json"))
                if dtype is not None and index.get("dtype") != dtype:
                    raise StoreError(f"{entry[0]}: {index.get('dtype')} shard, this run writes {dtype} (pass the "
                                     "same --fp16 / --fp32, or use another folder)")
                shapes_ok[entry[0]] = list(index.get("shape", [])) == list(shape) and entry[0].is_file()
            if shapes_ok[entry[0]]:
                done.add(name)
        return done
    stored = read_file_hashes(folder, modality) if hashes is not None else {}
    return {n for n in names if (hashes is None or stored.get(n) == hashes.get(n))
            and check_npy(item_path(folder, n), tuple(shape)) is None}


def count(folder: str | Path, modality: str, layout: str) -> int:
    from nextgpt.modalities import MODALITIES

    folder = Path(folder)
    if layout == "shards":
        return len(shard_table(folder, modality))
    exts = MODALITIES[modality].extensions
    return sum(1 for p in folder.glob("*.npy")
               if not p.name.startswith(".") and Path(p.name[:-len(".npy")]).suffix.lower() in exts)


def merge(folder: str | Path, kind: str, modality: str, section: Section, layout: str) -> Manifest:
    """After every share of a run is written: this modality's section (count) in the one manifest, the files
    layout's hash logs folded into captions-<modality>.tsv. Idempotent (two finishing ranks may both run it)."""
    folder = Path(folder)
    old = read_manifest(folder)
    if old is not None and old.kind != kind:
        raise StoreError(f"{folder}: holds {old.kind}; refusing to add {kind} (use another folder)")
    if old is not None and old.store != layout and old.modalities:
        others = [m for m in old.modalities if m != modality]
        if others:
            raise StoreError(f"{folder}: is a {old.store} store ({', '.join(others)}); convert it first "
                             f"(python -m nextgpt.store convert {folder} --to {layout}) or set data.store={old.store}")
    manifest = Manifest(kind=kind, store=layout, modalities=dict(old.modalities) if old else {})
    if layout == "files" and section.hashed:
        compact_file_hashes(folder, modality)
    section = Section(**{**asdict(section), "count": count(folder, modality, layout)})
    manifest.modalities[modality] = section
    write_manifest(folder, manifest)
    forget_reader(folder)
    return manifest



def parse_share(text: str | None, env=os.environ) -> tuple[int, int]:
    """(rank, world): `--shard K/N`, else the launcher's RANK / WORLD_SIZE (deepspeed, torchrun), else (0, 1)."""
    if text:
        k, sep, n = text.partition("/")
        if not (sep and k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
            raise StoreError(f"--shard {text!r}: expected K/N with 0 <= K < N, e.g. 0/4")
        return int(k), int(n)
    if "WORLD_SIZE" in env:
        try:
            rank, world = int(env.get("RANK", "0")), int(env["WORLD_SIZE"])
        except ValueError:
            raise StoreError(f"RANK={env.get('RANK')!r} / WORLD_SIZE={env.get('WORLD_SIZE')!r}: not integers") from None
        if not 0 <= rank < world:
            raise StoreError(f"RANK={rank} outside WORLD_SIZE={world}")
        return rank, world
    return 0, 1


def share_batches(names: Sequence[str], batch_size: int, rank: int, world: int) -> list[list[str]]:
    """This rank's batches: the names in their given order cut into batches of `batch_size`, batch j going to
    rank j % world. Disjoint and deterministic, and every item is computed in the same batch whatever the number
    of ranks, so N processes write exactly the bytes one process writes."""
    batches = [list(names[i:i + batch_size]) for i in range(0, len(names), batch_size)]
    return batches[rank::world]


def finish_share(folder: str | Path, kind: str, modality: str, section: Section, layout: str, rank: int,
                 world: int) -> Manifest | None:
    """Record that share rank/world of `modality` is complete; the share that completes the set merges the
    manifest (and removes the part records). -> the merged Manifest, or None while other shares are running
    (or were killed: their rerun completes the set)."""
    folder = Path(folder)
    if world == 1:
        return merge(folder, kind, modality, section, layout)
    part = folder / f".part-{kind}-{modality}-{rank}of{world}.json"
    atomic_write_text(part, json.dumps(asdict(section)) + "\n")
    parts = [folder / f".part-{kind}-{modality}-{k}of{world}.json" for k in range(world)]
    if not all(p.exists() for p in parts):
        return None
    manifest = merge(folder, kind, modality, section, layout)
    for p in parts:
        p.unlink(missing_ok=True)
    return manifest
