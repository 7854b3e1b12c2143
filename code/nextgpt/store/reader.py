"""Reading a store of either layout: StoreReader, one cached reader per folder and process, check_item."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from nextgpt.store.files import check_npy, load_item, read_file_hashes
from nextgpt.store.manifest import (MANIFEST, SHARD_DIR, Section, StoreError, caption_hash, item_path,
                                    modality_of_name, read_manifest)
from nextgpt.store.shards import ShardIndex, check_shard, read_index

class StoreReader:
    """Reads a store folder of either layout: `get(name, caption=None)` -> float32 array of the item.

    Shards are opened once per process as memory maps (no open() per item). With `caption` given and caption
    hashes recorded, an item made from another caption raises StoreError naming the item and its file / shard
    ("stale"). `check(modality, shape, fingerprint)` refuses a store made for another shape or by another encoder
    in one line naming the manifest and the modality.
    """

    def __init__(self, folder: str | Path, kind: str | None = None):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, kind)
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
        """(*shape) float32 copy of the item, checked as it is read: a stale item (with `caption`), a value that
        is not a real floating number (complex, string, integer: what put() never writes), another dtype or shape
        than the manifest's section, or a non-finite value (a file changed after it was written) raise StoreError
        naming the item's file / shard row."""
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
                data = read_index(path.with_name(path.name[:-4] + ".index.json"))
                check_shard(path, len(data["names"]), data["shape"])
                self._maps[path] = np.load(path, mmap_mode="r")       # (rows, *shape), no copy until indexed
            return self._checked(self._maps[path][row], name, f"{path} row {row}")

        path = item_path(self.folder, name)
        return self._checked(load_item(path), name, str(path))

    def _checked(self, array: np.ndarray, name: str, where: str) -> np.ndarray:
        """The write side's rules (StoreWriter.put) applied at read time: (*shape) float32 or StoreError.
        np.isfinite over one item is ~10 us for (77, 768); the read itself costs more."""
        section = self.section(modality_of_name(name) or "")
        if array.dtype.kind != "f":                                  # complex64 would lose its imaginary part
            raise StoreError(f"{where}: {name} has dtype {array.dtype}, not a real floating type")
        if section is not None:
            if array.dtype != np.dtype(section.dtype):
                raise StoreError(f"{where}: {name} has dtype {array.dtype}, the manifest says {section.dtype}")
            if tuple(array.shape) != tuple(section.shape):
                raise StoreError(f"{where}: {name} has shape {tuple(array.shape)}, the manifest says "
                                 f"{tuple(section.shape)}")
        out = np.asarray(array, dtype=np.float32)
        if not np.isfinite(out).all():
            bad = int(out.size - np.isfinite(out).sum())
            raise StoreError(f"{where}: {name} holds {bad} non-finite value(s) (changed after it was written?)")
        return out


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
