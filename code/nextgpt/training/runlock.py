"""One run per output folder: `<folder>/.run.lock` names the process that owns the folder.

    with RunLock.acquire(output_dir, what="training"):   # RunLockedError (a ValueError: one line) when taken
        ...

The lock file is created with O_CREAT | O_EXCL, so of two runs started at the same moment exactly one wins. It
holds {"pid", "host", "start_time", "run_id", "argv", "started"}: `start_time` is the process's start in clock
ticks since boot (/proc/<pid>/stat field 22), so a PID reused by an unrelated process after a crash does not keep
a stale lock alive. A lock whose owner is on this host and no longer running (or is another process under the same
PID) is stale: it is taken over (rename to a unique name, then unlink, so two runs taking over together cannot both
win) and the takeover is reported. A lock held from another host cannot be checked from here: the error says how
to remove it by hand. `run_id` is unique per run; temporary names a run writes include it, and start-up cleanup
runs only while the lock is held, so it never touches another live run's files.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from nextgpt.training.stop import pid_alive, process_start_time  # noqa: F401  (the one /proc reader)

LOCK_NAME = ".run.lock"


class RunLockedError(ValueError):
    """Another live run owns the folder (a ValueError: entry points print it as one `error:` line, exit 2)."""




@dataclass
class RunLock:
    path: Path
    run_id: str
    notes: list[str] = field(default_factory=list)  # e.g. "took over a stale lock of pid 123 (not running)"

    @classmethod
    def acquire(cls, folder: str | os.PathLike, what: str = "run") -> "RunLock":
        """Create `<folder>/.run.lock` for this process or raise RunLockedError naming the owner."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{folder}: output path is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_NAME
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        record = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": process_start_time(os.getpid()),
                  "run_id": run_id, "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        notes: list[str] = []
        for _ in range(3):  # a stale lock taken over by someone else between our checks: look again
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = read(path)
                if owner == {}:  # maybe being written this instant by a run that just won O_EXCL: look again
                    time.sleep(0.2)
                    owner = read(path)
                stale = stale_reason(owner)
                if stale is None:
                    raise RunLockedError(describe(path, owner, what)) from None
                aside = path.with_name(f"{LOCK_NAME}.stale.{run_id}")
                try:
                    os.rename(path, aside)  # only one of several runs taking over wins this rename
                except FileNotFoundError:
                    continue
                aside.unlink(missing_ok=True)
                notes.append(f"took over the stale lock {path} ({stale})")
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())
            return cls(path, run_id, notes)
        raise RunLockedError(f"{path}: could not take the lock (other runs are starting in {folder} at the same time)")

    def release(self) -> None:
        """Remove the lock if it is still ours (never another run's)."""
        owner = read(self.path)
        if owner is not None and owner.get("run_id") == self.run_id:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read(path: Path) -> dict | None:
    """The lock record, {} for an unreadable one (a run killed between create and write), None when absent."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def stale_reason(owner: dict | None) -> str | None:
    """Why a lock can be taken over, or None while its owner may be running."""
    if owner is None:
        return "gone"
    if not owner:
        # Empty / half-written after a second look: its writer was killed between O_EXCL create and write.
        return "unreadable lock file"
    if owner.get("host") != socket.gethostname():
        return None  # cannot check a process on another host
    pid = int(owner.get("pid", -1))
    if not pid_alive(pid, owner.get("start_time")):
        return f"pid {pid} on {owner.get('host')} is not running"
    return None


def describe(path: Path, owner: dict, what: str) -> str:
    host, pid = owner.get("host", "?"), owner.get("pid", "?")
    here = host == socket.gethostname()
    how = (f"stop it first or use another output folder" if here else
           f"if that run is gone, delete {path}")
    return (f"{path.parent}: another {what} is using this folder (pid {pid} on {host}, started "
            f"{owner.get('started', '?')}); {how}")


def acquire_collective(folder: str | os.PathLike, is_main: bool, what: str = "training") -> tuple[RunLock | None, str]:
    """Rank 0 takes the lock; every rank learns the outcome (collective when torch.distributed is up).
    -> (the lock on rank 0 else None, the run id every rank shares). A refusal raises on every rank."""
    import torch.distributed as dist

    lock, error = None, None
    if is_main:
        try:
            lock = RunLock.acquire(folder, what)
        except (ValueError, OSError) as e:
            error = e
    box = [lock.run_id if lock else None, str(error) if error else None]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise RunLockedError(f"rank 0: {box[1]}")
    return lock, box[0]
