"""Several "nodes" on one machine: one launcher per node, as on a cluster without ssh (ENVIRONMENT_NOTES), for the
tests and dev/chaos/run.py.

    job = NodeJob("deepspeed", [code/train.py, --config, ...], out_dir / "nodes")   # or "torchrun"
    job.start(own_disk={1: output_dir})     # node 1 under `unshare --mount` with a tmpfs over output_dir (root)
    job.kill_rank(1) / job.kill_node(1)     # kill -9 node 1's training process / its whole process group
    codes = job.wait(timeout)               # every launcher's exit status; job.log(r): node r's output

deepspeed: `python -m deepspeed.launcher.runner --hostfile H --no_ssh --node_rank R --master_addr 127.0.0.1
--master_port P`, hostfile `node0 slots=1` / `node1 slots=1` (one process per node: LOCAL_RANK 0 on both, global
ranks 0 and 1). torchrun: `torchrun --nnodes 2 --nproc_per_node 1 --node_rank R --rdzv_backend c10d
--rdzv_endpoint 127.0.0.1:P`. Traffic stays on 127.0.0.1.

Importing this module does no work.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_env() -> dict[str, str]:
    """The environment without a parent launcher's variables (each node's launcher sets its own)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.setdefault("OMP_NUM_THREADS", "1")    # two ranks on a busy 2-core machine crawl with more threads
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def own_disk_available() -> str | None:
    """None when `unshare --mount` + tmpfs can give a node its own disk here, else why not."""
    if os.geteuid() != 0:
        return "needs root (mount namespaces and tmpfs)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    return None


def node_command(kind: str, node: int, nodes: int, port: int, hostfile: Path, script_args: list[str]) -> list[str]:
    """The launcher command of node `node` (one process per node)."""
    if kind == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), *script_args]
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", "1",
                "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                *script_args]
    raise ValueError(f"launcher kind {kind!r}: deepspeed or torchrun")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if parent == pid:
                found += [int(entry), *_children(int(entry))]
    return found


class NodeJob:
    def __init__(self, kind: str, script_args: list[str], folder: Path, nodes: int = 2):
        self.kind, self.script_args, self.folder, self.nodes = kind, list(script_args), Path(folder), nodes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hostfile = self.folder / "hostfile"
        self.hostfile.write_text("".join(f"node{r} slots=1\n" for r in range(nodes)))
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []

    def log_path(self, node: int) -> Path:
        return self.folder / f"node{node}.log"

    def log(self, node: int) -> str:
        return self.log_path(node).read_text(errors="replace")

    def start(self, own_disk: dict[int, Path] | None = None) -> "NodeJob":
        """Start every node's launcher; node r in `own_disk` sees a fresh tmpfs at own_disk[r] (its own disk)."""
        for node in range(self.nodes):
            command = node_command(self.kind, node, self.nodes, self.port, self.hostfile, self.script_args)
            if own_disk and node in own_disk:
                folder = Path(own_disk[node])
                folder.mkdir(parents=True, exist_ok=True)
                command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           f'mount -t tmpfs tmpfs "{folder}" && exec "$@"', "sh", *command]
            with open(self.log_path(node), "w") as log:
                self.processes.append(subprocess.Popen(command, cwd=REPO, env=launcher_env(), stdout=log,
                                                       stderr=subprocess.STDOUT, start_new_session=True))
        return self

    def wait_for(self, text: str, node: int = 0, timeout: float = 300, poll: float = 0.2) -> None:
        deadline = time.time() + timeout
        while text not in self.log(node):
            if time.time() > deadline or all(p.poll() is not None for p in self.processes):
                raise TimeoutError(f"node {node} never printed {text!r}:\n{self.log(node)[-3000:]}")
            time.sleep(poll)

    def rank_pid(self, node: int) -> int:
        """The training process of `node` (the launcher's python child that is not a launcher itself)."""
        for pid in _children(self.processes[node].pid):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"python" in command and b"deepspeed.launcher" not in command and b"torch.distributed.run" not in \
                    command and b"unshare" not in command and command.split(b"\0")[0] != b"sh":
                return pid
        raise ProcessLookupError(f"node {node}: no training process found")

    def kill_rank(self, node: int) -> None:
        os.kill(self.rank_pid(node), signal.SIGKILL)

    def kill_node(self, node: int) -> None:
        os.killpg(self.processes[node].pid, signal.SIGKILL)

    def wait(self, timeout: float = 600) -> list[int]:
        deadline = time.time() + timeout
        codes = []
        for process in self.processes:
            try:
                codes.append(process.wait(timeout=max(1.0, deadline - time.time())))
            except subprocess.TimeoutExpired:
                self.stop()
                codes.append(process.wait())
        return codes

    def stop(self) -> None:
        """kill -9 whatever still runs (a test that failed half-way must not leave ranks behind)."""
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
