"""Converting a store folder between layouts, in place, and the `python -m nextgpt.store` command line:
    python -m nextgpt.store convert data/embed --to shards      # or --to files
    python -m nextgpt.store info data/embed
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from nextgpt.store.files import compact_file_hashes, read_file_hashes
from nextgpt.store.manifest import (LAYOUTS, MANIFEST, SHARD_DIR, Manifest, Section, StoreError, read_manifest,
                                    write_manifest)
from nextgpt.store.reader import StoreReader, forget_reader
from nextgpt.store.share import count
from nextgpt.store.shards import remove_orphans, shard_indexes, shard_table
from nextgpt.store.writer import StoreWriter

def convert(folder: str | Path, to: str, log=print) -> Manifest:
    """Rewrite a store folder in the other layout, in place. The new layout is complete (manifest says so)
    before the old one's files are removed, so a kill midway leaves a readable store (rerun to finish)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise StoreError(f"{folder}: no {MANIFEST} (not a store folder)")
    if to not in LAYOUTS:
        raise StoreError(f"--to {to!r}; allowed: files, shards")
    source = StoreReader(folder)
    new = Manifest(kind=manifest.kind, store=to, modalities={})
    for modality, section in manifest.modalities.items():
        if manifest.store == "shards":
            table = shard_table(folder, modality)
            names = sorted(table)
            digests = {n: table[n][2] for n in names}
        else:
            from nextgpt.modalities import MODALITIES

            exts = MODALITIES[modality].extensions
            names = sorted(p.name[:-4] for p in folder.glob("*.npy")
                           if not p.name.startswith(".") and Path(p.name[:-4]).suffix.lower() in exts)
            digests = read_file_hashes(folder, modality)
        if to == manifest.store:
            new.modalities[modality] = section
            continue
        out_section = Section(**{**asdict(section), "count": 0})
        if to == "shards":
            for stale in shard_indexes(folder, modality):        # a killed earlier conversion's shards
                stale.unlink()
            remove_orphans(folder, modality, "convert")
        writer = StoreWriter(folder, manifest.kind, modality, out_section, layout=to, tag="convert")
        for start in range(0, len(names), 1024):
            chunk = names[start:start + 1024]
            writer.put(chunk, np.stack([source.get(n) for n in chunk]).astype(section.dtype),
                       [digests.get(n, "") for n in chunk])
        writer.close()
        if to == "files" and section.hashed:
            compact_file_hashes(folder, modality)
        out_section.count = count(folder, modality, to)
        new.modalities[modality] = out_section
        log(f"{modality}: {out_section.count} items -> {to}")
    write_manifest(folder, new)
    forget_reader(folder)
    # The new layout is now what the manifest names: remove the old one.
    if manifest.store != to:
        if manifest.store == "shards":
            for path in (folder / SHARD_DIR).glob("*"):
                path.unlink()
            (folder / SHARD_DIR).rmdir()
        else:
            for path in folder.glob("*.npy"):
                if not path.name.startswith("."):
                    path.unlink()
            for path in [*folder.glob("captions-*.tsv"), *folder.glob(".captions-*.log")]:
                path.unlink()
    return new


def info(folder: str | Path) -> str:
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise StoreError(f"{folder}: no {MANIFEST} (not a store folder)")
    files = [p for p in folder.rglob("*") if p.is_file()]
    lines = [f"{folder}: {manifest.kind}, store {manifest.store}, {len(files)} files, "
             f"{sum(p.stat().st_size for p in files) / 2**20:.1f} MiB"]
    for m, s in manifest.modalities.items():
        lines.append(f"  {m}: {count(folder, m, manifest.store)} items, shape {tuple(s.shape)}, {s.dtype}, "
                     f"from {s.encoder}"
                     + (", caption hashes" if s.hashed else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from nextgpt import store          # the package docstring describes the format (imported here: no cycle)

    p = argparse.ArgumentParser(prog="python -m nextgpt.store", description=store.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="rewrite a store folder as files or shards, in place")
    c.add_argument("folder")
    c.add_argument("--to", required=True, choices=LAYOUTS)
    i = sub.add_parser("info", help="what a store folder holds")
    i.add_argument("folder")
    args = p.parse_args(argv)
    try:
        if args.command == "convert":
            convert(args.folder, args.to)
        print(info(args.folder))
    except (StoreError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
