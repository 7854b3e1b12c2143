"""Atomic writes: a reader (or a resumed run) never sees a half-written file or folder."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

# mkstemp/mkdtemp create owner-only files; give finished files the permissions a plain open() would.
_UMASK = os.umask(0)
os.umask(_UMASK)

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike, missing: str = "missing", kind: type | None = None):
    """Parse a JSON file; a missing, unreadable or malformed file (or, with `kind`, a top level of another type)
    raises one line naming it ("<path>: <missing>")."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {missing}") from None
    except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not text
        raise ValueError(f"{path}: not valid JSON ({first_line(e)})") from None
    except OSError as e:  # a folder, no permission
        raise ValueError(f"{path}: unreadable ({first_line(e)})") from None
    if kind is not None and not isinstance(data, kind):
        raise ValueError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, got "
                         f"{type(data).__name__}")
    return data


def first_line(error: BaseException) -> str:
    """The first line of a library's message, for a one-line error (torch's unpickling errors run to a dozen)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_yaml(path: str | os.PathLike, missing: str = "missing") -> dict:
    """Parse a YAML file whose top level is a mapping (an empty file is {}); any failure is one line naming it."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {missing}") from None
    except (OSError, ValueError, yaml.YAMLError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{path}: not valid YAML ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_files(files: Sequence[tuple[str | os.PathLike, bytes]]) -> None:
    """Write several files atomically with one durability pass (a batch of cache items).

    Every file goes to a temporary sibling `.<name>.<random>.tmp` (the names atomic_write_bytes uses, so the same
    stale-temp cleanup applies), then all are fsynced, renamed over their targets, and each folder is fsynced
    once. After a kill each target is absent, old or complete, never partial; per item this saves the folder
    fsync and lets the kernel flush the batch's data together. A failure removes the temporary files not yet
    renamed and raises OSError whose `filename` is the target being written.
    """
    pending: list[tuple[str, Path]] = []          # (temporary file, target) not yet renamed
    folders: dict[Path, None] = {}
    current: Path | None = None
    try:
        for current, data in ((Path(t), d) for t, d in files):
            if current.parent not in folders:
                current.parent.mkdir(parents=True, exist_ok=True)
                folders[current.parent] = None
            fd, tmp = tempfile.mkstemp(dir=current.parent, prefix=f".{current.name}.", suffix=".tmp")
            pending.append((tmp, current))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        for tmp, current in pending:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(tmp, 0o666 & ~_UMASK)
        while pending:
            current = pending[0][1]
            os.replace(*pending[0])
            pending.pop(0)
    except OSError as e:
        e.filename = str(current) if current is not None else e.filename    # name the target, not the temp
        raise
    finally:
        for tmp, _ in pending:
            Path(tmp).unlink(missing_ok=True)
    for folder in folders:
        _fsync_dir(folder)


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as the bytes of a .npy file (no pickled objects)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    atomic_write_bytes(path, npy_bytes(array))


def publish_dir(tmp: Path, path: Path) -> None:
    """Make a finished temporary folder `tmp` appear as `path` in one rename (an older `path` is replaced).

    Every file is fsynced first, so after a crash `path` is either the old folder or the complete new one.
    """
    os.chmod(tmp, 0o777 & ~_UMASK)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to `path` (replacing an old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


PROBE_BYTES = 1 << 20  # a write this size fails on a file system that a failed save just filled


def storage_cause(folder: str | os.PathLike) -> int | None:
    """ENOSPC / EROFS / EDQUOT when the file system holding `folder` refuses writes now, else None.

    For a write that failed without saying why: torch.save's zip writer (torch.save, DeepSpeed's checkpoint
    writer) reports a full disk as "RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...", the
    errno lost in C++. Asked right after the failure, before the partial file is removed (it holds the space):
    statvfs for read-only, then a fsynced probe write (which is what sees a quota, too)."""
    import errno

    folder = Path(folder)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return errno.EROFS
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".storage-probe.", suffix=".tmp")
    except OSError as e:
        return e.errno if e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT) else None
    try:
        os.write(fd, b"\0" * PROBE_BYTES)
        os.fsync(fd)
    except OSError as e:
        return e.errno if e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT) else None
    finally:
        os.close(fd)
        os.unlink(probe)
    return None


def newest_file(folder: str | os.PathLike) -> Path | None:
    """The most recently modified file under `folder` (the one a failed save was writing), None if none."""
    try:
        files = [p for p in Path(folder).rglob("*") if p.is_file()]
        return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None
    except OSError:
        return None
