"""Stopping a training run cleanly on SIGINT / SIGTERM, and never running on orphaned by a dead launcher.

    with StopRequest() as stop:                 # installs the handlers (main thread), restores them on exit
        ... set up ...                          # a signal here raises cli.Interrupted at once (nothing to save)
        stop.arm()                              # from now on a signal only sets stop.signum
        while step < max_steps:
            ... one optimizer step ...
            if runtime.any_rank(stop.requested, device):   # every rank stops at the same step
                save(step); raise stop.interrupted(step, ...)

Signals: the first SIGINT or SIGTERM asks the loop to stop at the end of the current optimizer step (a step is
never half-applied); a second SIGINT (Ctrl-C again) abandons at once by raising KeyboardInterrupt. SIGTERM never
abandons: `deepspeed`'s launch.py sends SIGTERM to every rank after a Ctrl-C or when it is terminated, and kills
them 30 s later, which is the window to finish the step and save.

Orphans: `python -m deepspeed.launcher.runner` -> `deepspeed.launcher.launch` -> ranks. When the runner is killed
(SIGKILL, or SIGTERM, which the single-node runner does not forward), launch.py and the ranks would go on and
finish the run unattended. So each rank records its launcher ancestors (the unbroken chain of python processes
above it, with their start times so a reused PID does not count) and a daemon thread checks them every second;
when one is gone the run stops as on SIGTERM. PR_SET_PDEATHSIG additionally delivers SIGTERM the moment the
direct parent dies (Linux).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from pathlib import Path

from nextgpt.cli import Interrupted, ignore_stop_signals, signal_name  # noqa: F401

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 1.0


def proc_stat(pid: int | str) -> tuple[str, list[str]] | None:
    """(command name, the fields after it) of /proc/<pid>/stat, None when the process is gone; fields[0] is the
    state (field 3 overall: "Z" for a zombie), fields[1] the parent pid, fields[2] the process group, fields[19] the
    start time. The one reader of that file (runlock, launch and the chaos harness use it)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may contain spaces and ')', so split after the last ')'.
    return text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux), None when unknown or the process is gone."""
    stat = proc_stat(pid)
    if stat is None:
        return None
    fields = stat[1]
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether `pid` runs on this host (and, when `start_time` is given, is the same process that recorded it)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    if start_time is not None:
        now = process_start_time(pid)
        if now is not None and now != start_time:
            return False  # the PID was reused by another process
    return True


def _stat(pid: int) -> tuple[str, int] | None:
    """(command name, parent pid) of `pid` from /proc, None when gone."""
    stat = proc_stat(pid)
    return None if stat is None else (stat[0], int(stat[1][1]))


def _is_python(pid: int) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return False
    return os.path.basename(argv0).startswith("python") or "deepspeed" in argv0 or "torchrun" in argv0


def launcher_ancestors(pid: int | None = None, limit: int = 4) -> list[tuple[int, int | None]]:
    """[(pid, start time)] of the python processes directly above `pid` (launch.py, the deepspeed runner,
    torchrun), nearest first; stops at the first non-python ancestor (a shell, make)."""
    found: list[tuple[int, int | None]] = []
    info = _stat(pid or os.getpid())
    while info is not None and len(found) < limit:
        parent = info[1]
        if parent <= 1 or not _is_python(parent):
            break
        found.append((parent, process_start_time(parent)))
        info = _stat(parent)
    return found


def _set_parent_death_signal(signum: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class StopRequest:
    def __init__(self, watch_launcher: bool | None = None):
        # Watch the launcher only when started by one (the deepspeed / torchrun environment), not in tests
        # that call train.main() in their own process.
        self.watch_launcher = ("LOCAL_RANK" in os.environ) if watch_launcher is None else watch_launcher
        self.signum: int | None = None
        self.reason = ""
        self.armed = False
        self.ancestors: list[tuple[int, int | None]] = []
        self._previous: dict[int, object] = {}
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._deathsig = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int, reason: str) -> None:
        if self.signum is None:
            self.signum, self.reason = int(signum), reason

    def arm(self) -> None:
        """From now on a first signal only sets the flag (the loop saves and stops at its next step)."""
        self.armed = True

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: abandon now
        first = self.signum is None
        self.request(signum, signal_name(signum))
        if not self.armed and first:
            raise Interrupted(f"interrupted by {signal_name(signum)} before training started; nothing to save",
                              signum)

    def _watch(self) -> None:
        while not self._done.wait(POLL_SECONDS):
            for pid, start in self.ancestors:
                if not pid_alive(pid, start):
                    self.request(signal.SIGTERM, f"the launcher (pid {pid}) exited")
                    return

    def interrupted(self, step: int, saved: str | None, resume_hint: str) -> Interrupted:
        """The exception ending an interrupted run: where it stopped and how to go on."""
        where = f"saved {saved}" if saved else "nothing saved"
        reason = self.reason or "another rank was stopped"
        return Interrupted(f"interrupted at step {step} ({reason}; {where}); resume with {resume_hint}",
                           self.signum or signal.SIGTERM)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        if self.watch_launcher:
            self.ancestors = launcher_ancestors()
            if self.ancestors:
                self._deathsig = _set_parent_death_signal(signal.SIGTERM)
                self._thread = threading.Thread(target=self._watch, name="launcher-watch", daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._deathsig:
            _set_parent_death_signal(0)
