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

Orphans: `deepspeed` (= `python -m deepspeed.launcher.runner`) -> `deepspeed.launcher.launch` -> ranks. When the
runner is killed (SIGKILL, or SIGTERM, which the single-node runner does not forward: it just dies), launch.py and
the ranks would go on and finish the run unattended. So each rank records its launcher ancestors (the unbroken
chain of python processes above it, with their start times so a reused PID does not count); `requested` looks at
them at every step (two or three reads of /proc/<pid>/stat, ~20 us) and a daemon thread every second (for a step
that takes longer); when one is gone the run stops as on SIGTERM. An ancestor that is exiting, or has exited but
is not reaped yet (a zombie: a supervisor that sent SIGTERM and sleeps before wait()), counts as gone -- counting
it alive let the ranks train on for as long as the supervisor waited (issue 26). PR_SET_PDEATHSIG additionally
delivers SIGTERM the moment the direct parent dies (Linux). So SIGTERM to the outermost process stops every rank
within one step whichever launcher started them: the deepspeed runner dies (seen here), deepspeed.launcher.launch
and torchrun forward it; SIGINT to the process group (Ctrl-C) reaches the ranks themselves.

interrupt_on_signals: for jobs with no step to finish (process_embeddings), a signal raises at once so their
`except` / `finally` blocks run (SIGTERM's default action would skip them and leave temporary files).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from nextgpt.cli import Interrupted, ignore_stop_signals, signal_name  # noqa: F401

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 1.0
PF_EXITING = 0x4  # linux/sched.h: set when do_exit() starts (a big process takes tens of ms to be torn down)


def proc_stat(pid: int | str) -> tuple[str, list[str]] | None:
    """(command name, the fields after it) of /proc/<pid>/stat, None when the process is gone; fields[0] is the
    state (field 3 overall: "Z" for a zombie), fields[1] the parent pid, fields[2] the process group, fields[6] the
    kernel flags (PF_EXITING), fields[19] the start time. The one reader of that file (runlock, launch and the chaos harness use it)."""
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
    """Whether `pid` runs on this host (and, when `start_time` is given, is the same process that recorded it).
    A process that is exiting or has exited but is not reaped yet (a zombie) is not running: it holds no lock and
    launches nothing any more."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    stat = proc_stat(pid)
    if stat is None:
        return True  # no /proc (not Linux): os.kill's answer stands
    fields = stat[1]
    try:
        if fields[0] in ("Z", "X", "x") or int(fields[6]) & PF_EXITING:
            return False
        if start_time is not None and int(fields[19]) != start_time:
            return False  # the PID was reused by another process
    except (IndexError, ValueError):
        pass
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


@contextmanager
def interrupt_on_signals(message: str) -> Iterator[None]:
    """SIGINT / SIGTERM / SIGHUP raise cli.Interrupted("interrupted by <SIGNAL>; <message>") at once, so the
    `except` / `finally` blocks of a job with no step to finish run (a precompute keeps what it wrote and leaves no
    temporary file). Main thread only (elsewhere: nothing installed); the previous handlers come back on exit."""
    previous = {}

    def handle(signum, frame) -> None:
        raise Interrupted(f"interrupted by {signal_name(signum)}; {message}", signum)

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, handle)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
        """A signal arrived or (checked now, so within the step that asks) a launcher ancestor has exited."""
        if self.signum is None and self.ancestors:
            self._check_launcher()
        return self.signum is not None

    def _check_launcher(self) -> bool:
        for pid, start in self.ancestors:
            if not pid_alive(pid, start):
                self.request(signal.SIGTERM, f"the launcher (pid {pid}) exited")
                return True
        return False

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
            if self.signum is not None or self._check_launcher():
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
