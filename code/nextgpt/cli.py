"""The one way every entry point ends a failure: one line `error: <what>, <where>` on stderr, an exit code, and
the full traceback in a log file the line names.

    def main(argv=None) -> int:
        return cli.run(lambda: _main(argv), "train")     # _main may call cli.set_log(<output_dir>/train.log)

Exit codes: 0 ok; 2 any failure (bad input, config, I/O, a library's RuntimeError, out of memory); an exception
may carry its own `exit_code` (1 = "data problems found" / "training aborted" where documented);
128 + signal number when interrupted (130 Ctrl-C, 143 SIGTERM), as shells report a signal.

OSErrors are named by what happened to which path ("no space left on device writing <file>", "read-only file
system: cannot write <file>", "<path>: output path is a file, not a folder"), because the same errno text from a
library rarely says which of a run's files it was. Exceptions we raise ourselves (ValueError, FileNotFoundError
with a message) are the whole story; anything else also names the log holding its traceback.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

_log_path: Path | None = None


class Interrupted(Exception):
    """A signal stopped the run; the message says where and how to resume. Exit code 128 + signum."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def set_log(path: str | os.PathLike | None) -> None:
    """Where run() writes the traceback of a failure (the run's own log; else a file in the temp folder)."""
    global _log_path
    _log_path = Path(path) if path is not None else None


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: SIGINT / SIGTERM are for the training process, which stops its workers
    (here, not in training/stop.py, because data/ builds the loaders and sits below training/)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] + (f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else "")


# How libraries that do their own I/O (safetensors' Rust writer, DeepSpeed) word a storage failure.
_STORAGE_TEXT = ((errno.ENOSPC, ("no space left on device", "os error 28", "code: 28", "storagefull")),
                 (errno.EROFS, ("read-only file system", "os error 30", "code: 30", "readonlyfilesystem")),
                 (errno.EDQUOT, ("disk quota exceeded", "os error 122", "code: 122")))


def storage_errno(e: BaseException) -> int | None:
    """ENOSPC / EROFS / EDQUOT when `e` (or what it wraps) is a storage failure, else None."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            return e.errno
        text = str(e).lower()
        for code, words in _STORAGE_TEXT:
            if any(w in text for w in words):
                return code
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _os_error(e: OSError) -> str | None:
    """A one-line description of an OSError naming its path, or None when it carries no errno."""
    path = e.filename if e.filename is not None else ""
    path2 = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
    code = e.errno
    if code is None:
        return None
    if code == errno.ENOSPC:
        return f"no space left on device writing {path}{path2}" if path else "no space left on device"
    if code == errno.EDQUOT:
        return f"disk quota exceeded writing {path}{path2}"
    if code == errno.EROFS:
        return f"read-only file system: cannot write {path}{path2}"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied: {path}{path2}"
    if code == errno.ENOTDIR or (code == errno.EEXIST and path and Path(path).is_file()):
        return f"{path}: output path (or a folder above it) is a file, not a folder"
    if code == errno.EISDIR:
        return f"{path}: is a folder, expected a file"
    if code == errno.ENOENT:
        return f"{path}: no such file or folder"
    if code == errno.ENOMEM:
        return f"out of memory ({e.strerror})"
    return f"{e.strerror or os.strerror(code)}: {path}{path2}" if path else (e.strerror or os.strerror(code))


def describe(e: BaseException) -> tuple[str, int, bool]:
    """(one-line message, exit code, whether it is unexpected, i.e. the log's traceback is worth naming)."""
    code = getattr(e, "exit_code", None)
    if isinstance(e, Interrupted):
        return str(e), e.exit_code, False
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C)", 130, False
    if not isinstance(e, OSError) and (storage := storage_errno(e)) is not None:  # e.g. SafetensorError(ENOSPC)
        return f"{os.strerror(storage).lower()} ({type(e).__name__}: {_first_line(str(e))[:160]})", code or 2, True
    if isinstance(e, OSError):
        own = e.errno is None or (e.filename is None and e.args and len(e.args) == 1)
        message = _first_line(str(e)) if own else _os_error(e)
        return message or _first_line(str(e)) or type(e).__name__, code or 2, not own
    if isinstance(e, ValueError):  # ours (ConfigError, validation, checkpoint format): the message is the story
        return _first_line(str(e)), code or 2, False
    if isinstance(e, MemoryError):
        return "out of memory (host RAM)", code or 2, True
    message = _first_line(str(e))
    if code is not None:  # an exception of ours with a documented exit code (e.g. TrainingAborted -> 1)
        return message, code, False
    return f"{type(e).__name__}: {message}" if message else type(e).__name__, 2, True


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process in a launcher-started run (RANK / WORLD_SIZE), (0, 1) otherwise."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def write_traceback(e: BaseException, name: str, message: str = "") -> Path | None:
    """Append the error line and the traceback to the run's log (or a temp-folder file when that cannot be
    written); its path."""
    rank, world = process_rank()
    who = f"pid {os.getpid()}" + (f", rank {rank} of {world}" if world > 1 else "")
    text = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} {name} failed ({who}):\n"
            + (f"error: {message}\n" if message else "")
            + "".join(traceback.format_exception(type(e), e, e.__traceback__)))
    candidates = [_log_path] if _log_path is not None else []
    candidates.append(Path(tempfile.gettempdir()) / f"nextgpt-{name}-{os.getpid()}.log")
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(text)
            return path
        except OSError:  # disk full / read-only: the very failure being reported; try the next place
            continue
    return None


def report(e: BaseException, name: str) -> int:
    """Print the one `error:` line for `e` (line and traceback to the log) and return the exit code.

    In a multi-rank run every rank usually fails the same way at once (a config, data or checkpoint error), so
    only rank 0 prints; every rank's line and traceback go to the run's log (train.log), tagged with its rank."""
    message, code, unexpected = describe(e)
    # A run's own log always gets the traceback; without one, only an unexpected failure leaves a temp-folder log.
    log = write_traceback(e, name, message) if (unexpected or _log_path is not None) else None
    if process_rank()[0] != 0 and not getattr(e, "every_rank", False):  # e.g. a dead peer (rank 0 may be it)
        return code
    if unexpected and log is not None:
        message += f" (traceback in {log})"
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def run(body: Callable[[], int | None], name: str) -> int:
    """Call body(); any exception (including KeyboardInterrupt) becomes one `error:` line and an exit code."""
    try:
        return int(body() or 0)
    except SystemExit:
        raise  # argparse's own usage errors (exit 2) and explicit exits
    except BaseException as e:  # noqa: BLE001 - the top of an entry point: every failure ends in one line
        return report(e, name)
    finally:
        set_log(None)
