"""One store format for per-item vectors: caption embeddings (stage 2/3 targets) and ImageBind features (stage 1).

A store is a folder keyed by media file name (`000000123.jpg`), holding any of the three modalities, with ONE
manifest format for both kinds:

    manifest.json  {"kind": "caption_embeddings" | "imagebind_features", "store": "files" | "shards",
                    "modalities": {"image": {"encoder", "fingerprint", "shape", "dtype", "count", "hashed"}, ...}}

Two layouts (`data.store`):
  files   `<dir>/<name>.npy` per item: the seed's layout (default). Caption hashes live beside the items in
          `captions-<modality>.tsv` (name TAB hash, compacted by the merge step) plus the append-only logs
          `.captions-<modality>.<writer>.log` that writers add to after each batch is renamed into place.
  shards  `<dir>/shards/<modality>-<writer>-<seq>.npy`, each (rows, *shape) (float16 by default) and read through
          a memory map, with `<same>.index.json` {"names": [...], "hashes": [...], "created": ns} naming the row of
          every item. A shard counts only once its index exists; both are written to a temporary name and renamed,
          the index after the array, so a half-written shard is never read. Later shards win for an item written
          twice (a caption edited and re-embedded).

Caption embeddings record the hash of the caption text they were made from (`caption_hash`), so an edited caption
is recomputed by process_embeddings and reported stale by training. Features record the ImageBind checkpoint's
fingerprint, so features of another checkpoint are refused by training as by process_embeddings.

Every value is checked where it is made: `StoreWriter.put` refuses (or, with skip_bad, counts and drops) an item
that is not finite after the cast to the store's dtype (float16 overflows to inf) or has the wrong shape.

Convert a folder between layouts (in place; the old layout's files are removed once the new one is complete):
    python -m nextgpt.store convert data/embed --to shards      # or --to files
    python -m nextgpt.store info data/embed
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nextgpt.io import atomic_write_bytes, atomic_write_text, npy_bytes

MANIFEST = "manifest.json"
KINDS = ("caption_embeddings", "imagebind_features")
LAYOUTS = ("files", "shards")
SHARD_DIR = "shards"
SHARD_BYTES = 256 << 20          # a shard is written once it holds this many bytes (a kill loses at most one)


class StoreError(ValueError):
    """A store that does not match what the caller needs (shape, encoder, dtype, caption hash) or is damaged."""


def caption_hash(text: str) -> str:
    """What a caption embedding was made from: sha256 of the (normalised) caption, 16 hex digits."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str:
    """Cheap identity of a (multi-GB) checkpoint file: its name, size and sha256 of the first and last MiB."""
    path = Path(path)
    try:
        size = path.stat().st_size
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                digest.update(f.read())
    except OSError:
        return f"{path.name}:absent"
    return f"{path.name}:{size}:{digest.hexdigest()[:16]}"


def item_path(folder: str | Path, name: str) -> Path:
    """Files layout: 001312382.jpg -> <folder>/001312382.jpg.npy."""
    return Path(folder) / f"{Path(name).name}.npy"


def modality_of_name(name: str) -> str | None:
    from nextgpt.modalities import MODALITIES

    ext = Path(name).suffix.lower()
    return next((m for m, spec in MODALITIES.items() if ext in spec.extensions), None)


# ----------------------------------------------------------------------------------------------------------------
# The manifest

@dataclass
class Section:
    encoder: str                  # decoder folder / ImageBind checkpoint#preset that produced the vectors
    shape: list[int]              # per item: [77, D], [D] (pooled captions) or [F] (features)
    dtype: str                    # float32 | float16 (what is stored; readers return float32)
    count: int = 0                # items of this modality when the manifest was written
    fingerprint: str = ""         # file_fingerprint of the encoder's weights ("" = not recorded, not checked)
    hashed: bool = False          # caption hashes recorded for every item written by this code


@dataclass
class Manifest:
    kind: str
    store: str = "files"
    modalities: dict[str, Section] = field(default_factory=dict)

    def to_json(self) -> str:
        data = {"kind": self.kind, "store": self.store,
                "modalities": {m: asdict(s) for m, s in sorted(self.modalities.items())}}
        return json.dumps(data, indent=2) + "\n"


def read_manifest(folder: str | Path) -> Manifest | None:
    """The folder's manifest (None when there is none). Reads the older forms too: a caption manifest without
    "store", and a feature manifest {kind, encoder, shape, dtype, count} (one section for every modality)."""
    from nextgpt.modalities import MODALITIES

    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        kind = data["kind"]
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}, expected one of {', '.join(KINDS)}")
        store = data.get("store", "files")
        if store not in LAYOUTS:
            raise ValueError(f"store {store!r}, expected files or shards")
        if "modalities" in data:
            sections = {m: Section(**s) for m, s in data["modalities"].items()}
        else:                       # the older single-section feature manifest
            section = {k: data[k] for k in ("encoder", "shape", "dtype")}
            sections = {m: Section(**section) for m in MODALITIES}
        return Manifest(kind=kind, store=store, modalities=sections)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise StoreError(f"{path}: not a store manifest ({e})") from None


def write_manifest(folder: str | Path, manifest: Manifest) -> None:
    """Atomically; not at all when the file already says exactly this (a rerun that did nothing writes nothing)."""
    path, text = Path(folder) / MANIFEST, manifest.to_json()
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    atomic_write_text(path, text)


# ----------------------------------------------------------------------------------------------------------------
# Caption hashes of the files layout

def _hash_files(folder: Path, modality: str) -> list[Path]:
    """The compacted table first, then the writers' logs oldest first (later lines win)."""
    logs = sorted(folder.glob(f".captions-{modality}.*.log"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    table = folder / f"captions-{modality}.tsv"
    return ([table] if table.exists() else []) + logs


def read_file_hashes(folder: str | Path, modality: str) -> dict[str, str]:
    """name -> caption hash for the files layout. A torn last line of a killed writer's log is ignored (its
    item then has no hash and is recomputed)."""
    out: dict[str, str] = {}
    for path in _hash_files(Path(folder), modality):
        for line in path.read_text().split("\n"):
            name, sep, digest = line.partition("\t")
            if sep and len(digest) == 16:
                out[name] = digest
    return out


def compact_file_hashes(folder: str | Path, modality: str, present: Iterable[str] | None = None) -> None:
    """Fold the logs into captions-<modality>.tsv (atomically), keeping only `present` names when given."""
    folder = Path(folder)
    sources = _hash_files(folder, modality)
    if not any(p.name.endswith(".log") for p in sources) and present is None:
        return                                          # nothing new since the last compaction
    table = read_file_hashes(folder, modality)
    if present is not None:
        keep = set(present)
        table = {n: h for n, h in table.items() if n in keep}
    atomic_write_text(folder / f"captions-{modality}.tsv", "".join(f"{n}\t{h}\n" for n, h in sorted(table.items())))
    for path in sources:
        if path.name.endswith(".log"):
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Shards

def _shard_indexes(folder: Path, modality: str | None = None) -> list[Path]:
    pattern = f"{modality}-*.index.json" if modality else "*.index.json"
    return sorted((folder / SHARD_DIR).glob(pattern))


def _read_index(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if len(data["names"]) != len(data["hashes"]):
            raise ValueError("names and hashes differ in length")
        return data
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{path}: unreadable shard index ({e})") from None


def shard_table(folder: str | Path, modality: str | None = None) -> dict[str, tuple[Path, int, str]]:
    """name -> (shard .npy, row, caption hash) over the complete shards (those with an index), later shards
    (by creation time) winning."""
    entries = []
    for index in _shard_indexes(Path(folder), modality):
        data = _read_index(index)
        entries.append((int(data.get("created", 0)), index.name, index, data))
    table: dict[str, tuple[Path, int, str]] = {}
    for _, _, index, data in sorted(entries, key=lambda e: e[:2]):
        array = index.with_name(index.name[: -len(".index.json")] + ".npy")
        for row, (name, digest) in enumerate(zip(data["names"], data["hashes"])):
            table[name] = (array, row, digest)
    return table


def _check_shard(path: Path, rows: int, shape: Sequence[int]) -> None:
    from nextgpt.data.embeddings import check_npy

    reason = check_npy(path, (rows, *shape))
    if reason is not None:
        raise StoreError(f"{path}: damaged shard ({reason})")


# ----------------------------------------------------------------------------------------------------------------
# Writing

class StoreWriter:
    """Writes items of ONE modality into a store folder, in either layout.

        writer = StoreWriter(folder, kind, modality, section, layout="shards", tag="0of2")
        bad = writer.put(names, arrays, hashes)      # arrays (B, *shape); hashes: caption hashes or None
        writer.close()                               # the last partial shard; waits for the file writer

    `put` casts to the section's dtype and checks every item is finite and of the section's shape: a bad item
    raises StoreError naming it, or with skip_bad=True is left out and returned in `bad` [(name, reason)].
    Files: batches go to embed_cache.ItemWriter's background thread, then their caption hashes are appended to
    this writer's log. Shards: rows are buffered and a shard is written (array, then index) every SHARD_BYTES.
    `tag` names the writer (e.g. the rank share "1of8"); concurrent writers need different tags.
    """

    def __init__(self, folder: str | Path, kind: str, modality: str, section: Section, layout: str = "files",
                 tag: str = "0of1", skip_bad: bool = False, shard_bytes: int = SHARD_BYTES):
        if layout not in LAYOUTS:
            raise StoreError(f"data.store: {layout!r}; allowed: files, shards")
        self.folder, self.kind, self.modality, self.section = Path(folder), kind, modality, section
        self.layout, self.tag, self.skip_bad = layout, tag, skip_bad
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shape, self.dtype = tuple(section.shape), np.dtype(section.dtype)
        item_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.rows_per_shard = max(1, shard_bytes // max(1, item_bytes))
        self.written = 0
        self._names: list[str] = []
        self._hashes: list[str] = []
        self._rows: list[np.ndarray] = []
        self._files = None                  # embed_cache.ItemWriter (files layout), started on the first put
        self._pool = None                   # the shard writer's thread (shards layout), started on the first shard
        self._pending = None                # the shard being written
        if layout == "shards":
            (self.folder / SHARD_DIR).mkdir(exist_ok=True)
            self._seq = self._next_seq()

    def _next_seq(self) -> int:
        prefix = f"{self.modality}-{self.tag}-"
        seqs = [int(p.name[len(prefix):].split(".")[0]) for p in (self.folder / SHARD_DIR).glob(f"{prefix}*")
                if p.name[len(prefix):].split(".")[0].isdigit()]
        return max(seqs, default=-1) + 1

    def put(self, names: Sequence[str], arrays, hashes: Sequence[str] | None = None) -> list[tuple[str, str]]:
        arrays = np.asarray(arrays)
        hashes = list(hashes) if hashes is not None else [""] * len(names)
        if not (len(names) == len(arrays) == len(hashes)):
            raise StoreError(f"{self.folder}: {len(names)} names, {len(arrays)} arrays, {len(hashes)} hashes")
        with np.errstate(over="ignore"):                       # an overflow to inf is reported below
            stored = arrays.astype(self.dtype)                 # (B, *shape) in the store's dtype
        if tuple(stored.shape[1:]) != self.shape:
            raise StoreError(f"{self.folder}: computed {self.modality} {self.kind} of shape "
                             f"{tuple(stored.shape[1:])}, the manifest says {self.shape} (first item {names[0]})")
        finite = np.isfinite(stored.reshape(len(stored), -1)).all(axis=1)
        bad = []
        if not finite.all():
            for i in np.flatnonzero(~finite):
                reason = (f"{names[i]}: non-finite values in the computed {self.kind} "
                          f"({self.section.dtype}; from {self.section.encoder})")
                if not self.skip_bad:
                    raise StoreError(f"{reason}; nothing written for it (data.skip_bad_records=true skips it)")
                bad.append((names[i], reason))
            keep = np.flatnonzero(finite)
            names, stored, hashes = [names[i] for i in keep], stored[keep], [hashes[i] for i in keep]
        if not names:
            return bad
        if self.layout == "files":
            self._put_files(list(names), stored, hashes)
        else:
            for name, row, digest in zip(names, stored, hashes):
                self._names.append(name)
                self._hashes.append(digest)
                self._rows.append(row)
                if len(self._rows) >= self.rows_per_shard:
                    self._write_shard()
        self.written += len(names)
        return bad

    # files: .npy per item on the background writer, whose thread then logs the batch's caption hashes (a hash
    # line never precedes its .npy; a kill between the two leaves an item without a hash: recomputed next run)
    def _put_files(self, names: list[str], stored: np.ndarray, hashes: list[str]) -> None:
        from nextgpt.embed_cache import ItemWriter

        if self._files is None:
            self._files = ItemWriter(self.folder, self.section.dtype)
        lines = "".join(f"{n}\t{h}\n" for n, h in zip(names, hashes) if h)
        self._files.put(names, stored, on_written=(lambda: self._log_hashes(lines)) if lines else None)

    def _log_hashes(self, lines: str) -> None:
        path = self.folder / f".captions-{self.modality}.{self.tag}.log"
        with open(path, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def _write_shard(self) -> None:
        """Hand the buffered rows to the background thread as one shard (the previous shard must be on disk
        first: at most two shards in memory), so the encoder never waits for a write."""
        if not self._rows:
            return
        from concurrent.futures import ThreadPoolExecutor

        self._wait_shard()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-shard-writer")
        stem = f"{self.modality}-{self.tag}-{self._seq:05d}"
        self._pending = self._pool.submit(self._flush_shard, stem, self._rows, self._names, self._hashes)
        self._seq += 1
        self._names, self._hashes, self._rows = [], [], []

    def _flush_shard(self, stem: str, rows: list, names: list[str], hashes: list[str]) -> None:
        folder = self.folder / SHARD_DIR
        array = np.stack(rows)                               # (rows, *shape)
        try:
            atomic_write_bytes(folder / f"{stem}.npy", npy_bytes(array))
            index = {"names": names, "hashes": hashes, "created": time.time_ns(), "shape": list(self.shape),
                     "dtype": self.section.dtype}
            atomic_write_text(folder / f"{stem}.index.json", json.dumps(index) + "\n")   # the shard now counts
        except OSError as e:
            raise OSError(f"{folder / stem}.npy: shard write failed ({e.strerror or e})") from None

    def _wait_shard(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()                                 # re-raises the writer's OSError here

    def close(self) -> None:
        """Write what is buffered (shards) / wait for the file writer and log the remaining hashes (files)."""
        if self.layout == "shards":
            self._write_shard()
            try:
                self._wait_shard()
            finally:
                if self._pool is not None:
                    self._pool.shutdown(wait=True)
                    self._pool = None
            return
        if self._files is not None:
            files, self._files = self._files, None
            files.close()

    def abort(self) -> None:
        """On an exception: keep what was already computed (a later run skips it), raise nothing new."""
        try:
            self.close()
        except (OSError, ValueError):
            pass


def remove_orphans(folder: str | Path, modality: str, tag: str) -> int:
    """Shard arrays of writer `tag` without an index (a kill between the two renames) and temp files: removed
    (only this writer's, so concurrent writers are not disturbed). -> number removed."""
    shard_dir = Path(folder) / SHARD_DIR
    removed = 0
    for path in list(shard_dir.glob(f"{modality}-{tag}-*.npy")) + list(shard_dir.glob(f".{modality}-{tag}-*.tmp")):
        if path.name.endswith(".tmp") or not path.with_name(path.name[:-4] + ".index.json").exists():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def done_names(folder: str | Path, modality: str, layout: str, names: Sequence[str], shape: Sequence[int],
               hashes: dict[str, str] | None = None, dtype: str | None = None) -> set[str]:
    """Of `names`, those already stored complete, of `shape`, and (when `hashes` is given) made from the same
    caption. The files layout checks each .npy header against its size (no array load). A shard of another
    `dtype` holding one of them is an error (a store has one dtype per modality)."""
    from nextgpt.data.embeddings import check_npy

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
                index = _read_index(entry[0].with_name(entry[0].name[:-4] + ".index.json"))
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


# ----------------------------------------------------------------------------------------------------------------
# Sharded precompute: which batches a rank computes, and the one manifest at the end

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


# ----------------------------------------------------------------------------------------------------------------
# Reading

class ShardIndex:
    """name -> (shard, row, caption hash) over a folder's complete shards, as sorted numpy arrays (binary search
    per lookup): ~45 bytes per item instead of a Python dict's ~200, and arrays a forked DataLoader worker shares
    without copying (no per-item reference counts). 3.3 M items: about 150 MB. Later shards win, as shard_table."""

    def __init__(self, folder: str | Path):
        entries = []
        for index in _shard_indexes(Path(folder)):
            data = _read_index(index)
            entries.append((int(data.get("created", 0)), index.name, index, data))
        entries.sort(key=lambda e: e[:2])
        self.paths = [index.with_name(index.name[: -len(".index.json")] + ".npy") for _, _, index, _ in entries]
        names = [n.encode() for *_, data in entries for n in data["names"]]
        if not names:
            self.names = np.zeros(0, dtype="S1")
            return
        hashes = np.array([h.encode() for *_, data in entries for h in data["hashes"]], dtype="S16")
        shard = np.concatenate([np.full(len(data["names"]), i, dtype=np.int32) for i, (*_, data) in enumerate(entries)])
        row = np.concatenate([np.arange(len(data["names"]), dtype=np.int64) for *_, data in entries])
        # The last occurrence of each name wins: unique over the reversed order keeps the first there.
        unique, first = np.unique(np.array(names)[::-1], return_index=True)
        keep = len(names) - 1 - first
        self.names, self.shard, self.row, self.hashes = unique, shard[keep], row[keep], hashes[keep]

    def __len__(self) -> int:
        return len(self.names)

    def get(self, name: str) -> tuple[Path, int, str] | None:
        key = name.encode()
        k = int(np.searchsorted(self.names, key))
        if k >= len(self.names) or self.names[k] != key:
            return None
        return self.paths[int(self.shard[k])], int(self.row[k]), self.hashes[k].decode()


class StoreReader:
    """Reads a store folder of either layout: `get(name, caption=None)` -> float32 array of the item.

    Shards are opened once per process as memory maps (no open() per item). With `caption` given and caption
    hashes recorded, an item made from another caption raises StoreError naming the item and its file / shard
    ("stale"). `check(modality, shape, fingerprint)` refuses a store made for another shape or by another encoder
    in one line naming the manifest and the modality.
    """

    def __init__(self, folder: str | Path, kind: str | None = None):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if kind is not None and self.manifest is not None and self.manifest.kind != kind:
            raise StoreError(f"{self.folder / MANIFEST}: holds {self.manifest.kind}, expected {kind}")
        self.layout = self.manifest.store if self.manifest else "files"
        self._table: ShardIndex | None = None          # shards layout, built on the first read
        self._maps: dict[Path, np.ndarray] = {}
        self._hashes: dict[str, dict[str, str]] = {}

    def section(self, modality: str) -> Section | None:
        return self.manifest.modalities.get(modality) if self.manifest else None

    def check(self, modality: str, shape: Sequence[int] | None = None, fingerprint: str | None = None) -> None:
        """Refuse a store whose `modality` section has another shape or encoder fingerprint than expected."""
        section = self.section(modality)
        if section is None:
            return
        where = self.folder / MANIFEST
        if shape is not None and tuple(section.shape) != tuple(shape):
            raise StoreError(f"{where}: {modality} items have shape {tuple(section.shape)} (from {section.encoder}), "
                             f"expected {tuple(shape)}")
        if fingerprint and section.fingerprint and section.fingerprint != fingerprint:
            raise StoreError(f"{where}: {modality} {self.manifest.kind} were made by {section.encoder} "
                             f"({section.fingerprint}), not by the configured {fingerprint}; recompute them")

    def _entry(self, name: str) -> tuple[Path, int, str] | None:
        if self._table is None:
            self._table = ShardIndex(self.folder)
        return self._table.get(name)

    def has(self, name: str) -> bool:
        if self.layout == "shards":
            return self._entry(name) is not None
        return item_path(self.folder, name).is_file()

    def _stored_hash(self, name: str, modality: str) -> str | None:
        if modality not in self._hashes:
            self._hashes[modality] = read_file_hashes(self.folder, modality)
        return self._hashes[modality].get(name)

    def stale(self, name: str, caption: str) -> str | None:
        """None when the item was made from `caption` (or the store records no caption hashes for its
        modality: an older folder), else the reason naming the item and its file / shard row."""
        modality = modality_of_name(name)
        section = self.section(modality) if modality else None
        if section is None or not section.hashed:
            return None
        if self.layout == "shards":
            entry = self._entry(name)
            if entry is None:
                return None
            digest, where = entry[2], f"{entry[0]} row {entry[1]}"
        else:
            digest, where = self._stored_hash(name, modality), str(item_path(self.folder, name))
        if digest == caption_hash(caption):
            return None
        state = "no caption hash recorded" if not digest else "made from another caption"
        return f"{where}: stale caption embedding of {name} ({state}; rerun process_embeddings.py)"

    def get(self, name: str, caption: str | None = None) -> np.ndarray:
        """(*shape) float32 copy of the item; with `caption`, a stale item raises StoreError."""
        if caption is not None:
            reason = self.stale(name, caption)
            if reason is not None:
                raise StoreError(reason)
        if self.layout == "shards":
            entry = self._entry(name)
            if entry is None:
                raise FileNotFoundError(f"{self.folder / SHARD_DIR}: no item {name} in any shard")
            path, row, _ = entry
            if path not in self._maps:
                data = _read_index(path.with_name(path.name[:-4] + ".index.json"))
                _check_shard(path, len(data["names"]), data["shape"])
                self._maps[path] = np.load(path, mmap_mode="r")       # (rows, *shape), no copy until indexed
            return np.asarray(self._maps[path][row], dtype=np.float32)
        from nextgpt.embed_cache import load_item

        return np.asarray(load_item(item_path(self.folder, name)), dtype=np.float32)


_READERS: dict[str, tuple[tuple, float, StoreReader]] = {}


def open_reader(folder: str | Path) -> StoreReader:
    """A StoreReader per folder and process, reopened when the folder changed (a rerun, a convert: the manifest,
    the folder or its shards/ folder has a new mtime); looked at no more than once a second, so reading items
    costs no extra system calls."""
    folder = Path(folder)
    key = os.path.abspath(folder)
    now = time.monotonic()
    cached = _READERS.get(key)
    if cached is not None and now - cached[1] < 1.0:
        return cached[2]
    stamp = []
    for path in (folder / MANIFEST, folder, folder / SHARD_DIR):
        try:
            stamp.append(path.stat().st_mtime_ns)
        except OSError:
            stamp.append(-1)
    if cached is None or cached[0] != tuple(stamp):
        cached = (tuple(stamp), now, StoreReader(folder))
    _READERS[key] = (cached[0], now, cached[2])
    return cached[2]


def forget_reader(folder: str | Path) -> None:
    """Drop the cached reader of a folder this process just wrote (merge, convert)."""
    _READERS.pop(os.path.abspath(folder), None)


def split_item_path(path: str | Path) -> tuple[Path, str]:
    """`<folder>/<name>.npy` (what readers put in Target.embed_path) -> (folder, name)."""
    path = Path(path)
    return path.parent, path.name[: -len(".npy")] if path.name.endswith(".npy") else path.name


def check_item(path: str | Path, shape: Sequence[int] | None = None, caption: str | None = None,
               values: bool = False) -> str | None:
    """None when the item `<folder>/<name>.npy` is stored complete (either layout), of `shape`, made from
    `caption` (when hashes are recorded) and, with values=True, finite; else the reason ("missing" when absent).
    The files layout reads only the .npy header unless values=True."""
    from nextgpt.data.embeddings import check_npy

    folder, name = split_item_path(path)
    try:
        reader = open_reader(folder)
        if reader.layout == "files":
            reason = check_npy(item_path(folder, name), tuple(shape) if shape is not None else None)
            if reason is not None:
                return reason
        else:
            if not reader.has(name):
                return "missing"
            section = reader.section(modality_of_name(name) or "")
            if shape is not None and section is not None and tuple(section.shape) != tuple(shape):
                return f"shape {tuple(section.shape)} ({reader.folder / MANIFEST}), expected {tuple(shape)}"
        if caption is not None and (reason := reader.stale(name, caption)) is not None:
            return reason
        if values:
            array = reader.get(name)
            if shape is not None and tuple(array.shape) != tuple(shape):
                return f"shape {tuple(array.shape)}, expected {tuple(shape)}"
            if not np.isfinite(array).all():
                return "non-finite values"
    except (StoreError, FileNotFoundError) as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Converting between layouts

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
            for stale in _shard_indexes(folder, modality):        # a killed earlier conversion's shards
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
    p = argparse.ArgumentParser(prog="python -m nextgpt.store", description=__doc__,
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


if __name__ == "__main__":
    raise SystemExit(main())
