"""`python -m nextgpt.launch <deepspeed launcher arguments>`: DeepSpeed's launcher with one owner of the signals.

    python -m nextgpt.launch --num_gpus 8 code/train.py --config code/config/stage_1.yaml    # what `make stageN` runs

`python -m deepspeed.launcher.runner` (the `deepspeed` command) does not forward SIGTERM on a single node (its
ranks would train on, orphaned, and write done.json) and answers Ctrl-C with a KeyboardInterrupt traceback. This
wrapper runs it in a process group of its own and, on SIGINT / SIGTERM / SIGHUP, sends SIGTERM to that whole group:
the runner ends quietly, launch.py passes SIGTERM to every rank, and each rank finishes its step, saves and exits
143 with "interrupted at step N; resume with ..." (nextgpt.training.stop). A second signal abandons at once (SIGKILL to the
group; the next start removes the partial save). Should this wrapper itself be killed with SIGKILL, the ranks see
their launcher chain end and stop the same way. Exit status: the runner's, or 128 + the signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from nextgpt.training.stop import proc_stat

GRACE_SECONDS = 120  # ranks get this long to finish the step and save (launch.py itself allows 30 s per rank tree)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Members that have exited but not been reaped (zombies of an exited parent) still answer; check /proc.
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(entry)
            if stat is None:
                continue
            fields = stat[1]
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    process = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", *args], start_new_session=True)
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        try:
            os.killpg(process.pid, signal.SIGTERM if len(received) == 1 else signal.SIGKILL)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    code = process.wait()
    if received:  # the runner is gone; wait for launch.py and the ranks it stops (they save first)
        deadline = time.time() + GRACE_SECONDS
        while group_alive(process.pid) and time.time() < deadline:
            time.sleep(0.2)
        if group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
            print(f"error: ranks still running {GRACE_SECONDS} s after {signal.Signals(received[0]).name}; killed",
                  file=sys.stderr)
        return 128 + received[0]
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    raise SystemExit(main())
