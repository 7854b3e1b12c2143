"""The `files` layout of a store (nextgpt/store/): `<dir>/<media file name>.npy` per item, written atomically.

Used for caption embeddings (process_embeddings.py; stage 2/3 targets) and ImageBind features (--features;
stage-1 cache) through nextgpt.store.StoreWriter. Items already present and valid are skipped, so a rerun after a
kill finishes the job; every file is written atomically, so a kill never leaves a truncated `.npy` behind that a
later run would accept.

Writing: `ItemWriter` writes each computed batch on a background thread (nextgpt.io.atomic_write_files: temp
files, one fsync pass, renames, one folder fsync per batch), so file I/O overlaps the next batch's compute.
A kill leaves at most some `.<name>.npy.<random>.tmp` files; `remove_stale_temps` (run by both writers at start,
for the items of the run) deletes them.

Caption hashes of the files layout: `captions-<modality>.tsv` (name TAB hash, compacted by the merge step) plus
the append-only logs `.captions-<modality>.<writer>.log` that writers add to after each batch is in place.
`check_npy` is the cheap header check of one item (every store part and data validation use it).
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nextgpt.io import atomic_write_files, atomic_write_text, npy_bytes
from nextgpt.store.manifest import MANIFEST, item_path


def check_npy(path: str | Path, shape: tuple[int, ...] | None = None) -> str | None:
    """None when `path` is a complete .npy (of `shape`), else the reason. Reads only the header and compares the
    file size with what the header promises, so a truncated file (a killed non-atomic writer) is caught without
    loading the array: cheap enough to check millions of files before training."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                found, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                found, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return f"unsupported .npy version {version}"
            offset = f.tell()
    except FileNotFoundError:
        return "missing"
    except (ValueError, OSError, EOFError) as e:
        return f"unreadable .npy ({e})"
    if dtype.hasobject:
        return "object array (not a plain .npy)"
    expected = offset + int(np.prod(found, dtype=np.int64)) * dtype.itemsize
    if size != expected:
        return f"truncated or padded .npy ({size} bytes, header promises {expected})"
    if shape is not None and tuple(found) != tuple(shape):
        return f"shape {tuple(found)}, expected {tuple(shape)}"
    return None


def remove_stale_temps(cache_dir: str | Path, names: Iterable[str]) -> int:
    """Delete the temporary files a killed atomic write left for the items `names` (and for the manifest):
    `.<name>.npy.<random>.tmp`, the names nextgpt.io gives them. Temps of other items are left alone, so a
    concurrent run writing other items into the same folder is not disturbed. -> number removed."""
    targets = {item_path(cache_dir, n).name for n in names} | {MANIFEST}
    removed = 0
    for path in Path(cache_dir).glob(".*.tmp"):
        target = path.name[1:-len(".tmp")].rpartition(".")[0]        # ".<target>.<random>.tmp" -> "<target>"
        if target in targets and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


class ItemWriter:
    """Writes batches of items `<dir>/<name>.npy` on one background thread, a batch at a time.

        with ItemWriter(cache_dir, "float32") as writer:
            for names, arrays in batches:          # arrays: (B, *shape)
                writer.put(names, arrays)           # returns at once unless `depth` batches are still queued

    A write error (e.g. a full disk) is raised by the next put() or by leaving the block, as OSError naming the
    file. Leaving the block, even by an exception (Ctrl-C), first finishes the batches already handed over, so a
    killed run loses only the batch being computed.
    """

    def __init__(self, cache_dir: str | Path, dtype: str, depth: int = 2):
        self.dir, self.dtype = Path(cache_dir), dtype
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: str | None = None           # the first write error, raised in the caller's thread
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="embed-cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, on_written = item
            if self._error is not None:          # drop what follows a failed batch; put/close raise the error
                continue
            try:
                atomic_write_files([(item_path(self.dir, name), npy_bytes(array)) for name, array in batch])
                self.written += len(batch)
                if on_written is not None:
                    on_written()
            except OSError as e:
                self._error = f"{e.filename}: write failed ({e.strerror or e})"
            except BaseException as e:          # noqa: BLE001 - reported to the caller's thread
                self._error = f"{self.dir}: write failed ({type(e).__name__}: {e})"

    def _raise(self) -> None:
        if self._error is not None:
            raise OSError(self._error)

    def put(self, names: Sequence[str], arrays, on_written=None) -> None:
        """Queue one batch; `arrays[i]` is stored as `<dir>/<names[i]>.npy` in this writer's dtype (copied now,
        so the caller may reuse its buffers). `on_written()` runs on the writer's thread once the whole batch is
        on disk (the store logs the batch's caption hashes there)."""
        self._raise()
        batch = [(name, np.array(array, dtype=self.dtype)) for name, array in zip(names, arrays, strict=True)]
        if batch:
            self._queue.put((batch, on_written))

    def close(self) -> None:
        """Wait until every queued batch is on disk; raise the first write error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def __enter__(self) -> "ItemWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except OSError:
                pass                             # the exception already leaving the block wins


def load_item(path: str | Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Load one `.npy`; a missing, truncated or wrong-shaped file raises ValueError naming the file."""
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable or truncated .npy ({e})") from None
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise ValueError(f"{path}: shape {tuple(array.shape)}, expected {tuple(shape)}")
    return array


def is_valid(path: Path, shape: tuple[int, ...]) -> bool:
    try:
        load_item(path, shape)
        return True
    except (FileNotFoundError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------------------------
# Caption hashes

def _hash_files(folder: Path, modality: str) -> list[Path]:
    """The compacted table first, then the writers' logs oldest first (later lines win)."""
    logs = sorted(folder.glob(f".captions-{modality}.*.log"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    table = folder / f"captions-{modality}.tsv"
    return ([table] if table.exists() else []) + logs


def _read_hashes(paths: Iterable[Path]) -> dict[str, str]:
    """name -> caption hash from tables / logs in order (later lines win). A torn last line of a killed writer's
    log is ignored (its item then has no hash and is recomputed)."""
    out: dict[str, str] = {}
    for path in paths:
        for line in path.read_text().split("\n"):
            name, sep, digest = line.partition("\t")
            if sep and len(digest) == 16:
                out[name] = digest
    return out


def read_file_hashes(folder: str | Path, modality: str) -> dict[str, str]:
    """name -> caption hash for the files layout."""
    return _read_hashes(_hash_files(Path(folder), modality))


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


def fold_file_hashes(folder: str | Path, modality: str, log: Path) -> None:
    """Fold one writer's log into captions-<modality>.tsv (atomically) and remove it (an interrupted writer:
    the other writers' logs are theirs to keep appending to)."""
    folder = Path(folder)
    if not log.exists():
        return
    table = folder / f"captions-{modality}.tsv"
    merged = _read_hashes(([table] if table.exists() else []) + [log])
    atomic_write_text(table, "".join(f"{n}\t{h}\n" for n, h in sorted(merged.items())))
    log.unlink(missing_ok=True)
