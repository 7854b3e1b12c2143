"""Writing a store: StoreWriter puts items of one modality in either layout, each checked where it is made."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from nextgpt.io import atomic_write_bytes, atomic_write_text, npy_bytes
from nextgpt.store.files import fold_file_hashes
from nextgpt.store.manifest import LAYOUTS, SHARD_BYTES, SHARD_DIR, Section, StoreError
from nextgpt.store.files import ItemWriter

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
        """On an exception (Ctrl-C, SIGTERM, a bad item): keep what was already computed (a later run skips it),
        fold this writer's caption-hash log into captions-<modality>.tsv so no dot-file is left, raise nothing new.
        Two writers aborting at once may drop each other's folded lines: those items then have no hash and are
        recomputed by the next run, never trusted."""
        try:
            self.close()
            if self.layout == "files":
                fold_file_hashes(self.folder, self.modality, self.folder / f".captions-{self.modality}.{self.tag}.log")
        except (OSError, ValueError):
            pass
