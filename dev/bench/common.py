"""Helpers the benchmark and fault-injection scripts share: a cached tiny workspace, timing, tables, JSON.

    env = workspace(Path("runs/bench/work"))      # tiny checkpoints + toy data (scripts/tiny/tiny_workspace.py), once
    cfg = env.config("stage_1", "train.micro_batch_size=8")
    print_table("title", ["col", ...], rows);  write_json(path, {...})

Importing this module does no work.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[2]

SAMPLES = REPO.parent / "shared" / "samples" / "nextgpt"      # real NExT-GPT records + media, when present
ENV_RECORD = "workspace.json"


class BenchError(ValueError):
    """A benchmark cannot run as asked (e.g. --device cuda without a GPU); main prints `error: ...`."""


# ----------------------------------------------------------------------------------------------------------------
# The tiny workspace: built once per folder, reused by every later run (process_embeddings skips finished items).

def workspace(root: Path, log: Callable[[str], None] = print):
    """A tiny_workspace.TinyEnv in `root` (tiny checkpoints, toy data, caption embeddings, ImageBind features)."""
    from tiny.tiny_workspace import TinyEnv, build_tiny_env

    root = Path(root).resolve()
    record = root / ENV_RECORD
    if record.is_file():
        saved = json.loads(record.read_text())
        env = TinyEnv(root=root, ckpt=root / "ckpt", data=root / "data", delta=root / "ckpt" / "delta",
                               overrides=saved["overrides"])
        env._built.update(saved.get("built", []))
        return env
    log(f"building the tiny workspace in {root} (tiny checkpoints, toy data, embeddings, features; ~30 s, once)")
    with quiet():
        env = build_tiny_env(root)
        env.embeddings()
        env.features()
    from nextgpt.io import atomic_write_text

    atomic_write_text(record, json.dumps({"overrides": env.overrides, "built": sorted(env._built)}, indent=2))
    return env


class quiet:
    """Send stdout/stderr (file descriptors too: tqdm, C libraries) to a log file while building things."""

    def __init__(self, log_path: str | os.PathLike | None = None):
        self.log_path = log_path

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = os.dup(1), os.dup(2)
        target = open(self.log_path or os.devnull, "a")
        os.dup2(target.fileno(), 1)
        os.dup2(target.fileno(), 2)
        target.close()
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        os.close(self.saved[0])
        os.close(self.saved[1])
        return False


# ----------------------------------------------------------------------------------------------------------------
# Devices and machine description

def resolve_device(name: str | None):
    """torch.device for --device (default cpu); --device cuda without a GPU is a BenchError, not a fallback."""
    import torch

    name = name or "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {name}: no CUDA device on this machine (torch.cuda.is_available() is False); "
                         "this variant runs unchanged on a GPU machine")
    return device


def set_threads(threads: int) -> None:
    """torch intra-op threads for a CPU benchmark (and OMP_NUM_THREADS for the processes it starts).

    Default 1: on a shared machine whose other processes keep the cores busy, every small OpenMP region of a
    2-thread torch waits for a descheduled thread; a 4-layer Llama step measured 6.5 s with 2 threads under a load
    of ~4 and 0.18 s with 1 thread. One thread gives stable figures; --threads N measures N."""
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def machine() -> dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "cpu": platform.processor() or platform.machine(), "load_average_1min": os.getloadavg()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line() -> str:
    m = machine()
    gpu = m.get("gpu", "no GPU (CUDA variants not run)")
    return (f"machine: {m['cpu_count']} CPU cores (load average {m['load_average_1min']:.1f} from other "
            f"processes at start), {m['torch_threads']} torch thread(s), torch {m['torch']}, python {m['python']}, "
            f"{gpu}")


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device=None) -> float:
    """Seconds one call of fn takes (device-synchronised)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Output

def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(f"\n{title}")
    print(format_table(columns, rows), flush=True)


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    if value != value:
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "ok" if ok else "MISS"


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    from nextgpt.io import atomic_write_text

    path = Path(path)
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
    return path


def peak_rss_of(command: Sequence[str], env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
                log_path: str | os.PathLike | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run a command; -> {returncode, seconds, peak_rss_bytes (ru_maxrss of that child, as /usr/bin/time -v),
    sampled_peak_rss_bytes, cpu_s}.

    On Linux a child's ru_maxrss starts at its parent's RSS when it was forked (a child of a 600 MiB parent that
    runs `python -c pass` reports 611 MiB here), so peak_rss_bytes is at least this process's own RSS;
    sampled_peak_rss_bytes is the command's own RSS, polled every 50 ms (/proc/<pid>/stat; a spike shorter than
    that, or a grandchild, is not in it)."""
    import subprocess

    from nextgpt.training.stop import proc_stat

    page = os.sysconf("SC_PAGE_SIZE")
    sampled = 0
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    try:
        start = time.perf_counter()
        process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        deadline = None if timeout is None else start + timeout
        while True:
            stat = proc_stat(process.pid)
            if stat is not None and len(stat[1]) > 21 and stat[1][21].isdigit():
                sampled = max(sampled, int(stat[1][21]) * page)        # rss: field 24 overall, in pages
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log_path:
            out.close()
    return {"returncode": process.returncode, "seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "sampled_peak_rss_bytes": sampled,
            "cpu_s": usage.ru_utime + usage.ru_stime}          # the child and every descendant it reaped


def bench_args(parser, json_name: str | None, threads: int | None = 1, threads_help: str = "") -> None:
    """The options every bench script shares: --threads (CPU), --workdir, --json (written by run_cli)."""
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads,
                            help=threads_help or f"torch threads on CPU (default {threads}, see set_threads)")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench" / "work"))
    parser.add_argument("--json", default=str(REPO / "runs" / "bench" / json_name) if json_name else None,
                        help="where the results go (JSON)")


def run_cli(parser, run: Callable[[Any], Any], argv: Sequence[str] | None) -> int:
    """The main() of every bench script: parse, run, write the result to --json, and turn a known failure into one
    `error:` line (exit 2)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = list(argv)
    try:
        result = run(args)
        if result is not None and getattr(args, "json", None):
            write_json(args.json, result)
            print(f"\nwrote {args.json}")
    except (ValueError, FileNotFoundError, OSError) as e:  # BenchError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

