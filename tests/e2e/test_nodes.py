"""Two "nodes" on one machine (scripts/tiny/nodes.py: one launcher per node, `--no_ssh --node_rank`, or
torchrun --nnodes 2, or pdsh over ssh to loopback names): stages and the sharded precompute on a shared folder, the
refusal of a node with its own disk, a dead rank or node stopping the job, and the bit-exact resume after it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tiny.nodes import REPO, NodeJob, free_port, launcher_env, own_disk_available

pytestmark = pytest.mark.slow

TRAIN = str(REPO / "code" / "train.py")
PROCESS = str(REPO / "code" / "process_embeddings.py")
# One dataset, so that both ranks' batches are alike; a checkpoint every 2 steps; a dead peer noticed in 20 s.
STAGE_1 = ["data.datasets=[cc3m_enc]", "train.max_steps=6", "train.save_every=2", "train.init_from=",
           "train.dist_timeout=20"]


def train_args(env, stage: str, out: Path, *overrides: str) -> list[str]:
    return [TRAIN, *env.argv(stage, f"train.output_dir={out}", *overrides)]


def delta(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoint / "delta.safetensors"))
    adapter = checkpoint / "adapter" / "adapter_model.safetensors"
    return tensors | ({f"adapter.{k}": v for k, v in load_file(str(adapter)).items()} if adapter.is_file() else {})


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def assert_complete(checkpoint: Path, world: int = 2) -> None:
    """Every rank's files are in the checkpoint, sha256.json vouches for them and they verify."""
    from nextgpt.checkpoint.resume_checks import verify

    listed = json.loads((checkpoint / "state" / "sha256.json").read_text())["files"]
    for rank in range(world):
        assert f"rank_{rank}.pt" in listed
        assert f"deepspeed/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in listed
    assert verify(checkpoint) == []


def assert_written_once(out: Path) -> None:
    """What a job writes once (rank 0): one config block and one `done:` in train.log, one metrics line per step,
    no temporary files or shared-folder nonces left."""
    log = (out / "train.log").read_text()
    assert log.count("(resolved, saved to") == 1 and log.count("done: ") == 1
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == sorted(set(steps))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def shared_run(tiny_env, tmp_path_factory):
    """Stage 1 on two nodes through DeepSpeed's launcher (--no_ssh --node_rank), one shared output folder."""
    root = tmp_path_factory.mktemp("two_nodes")
    job = NodeJob("deepspeed", train_args(tiny_env, "stage_1", root / "out", *STAGE_1), root / "nodes").start()
    codes = job.wait(600)
    assert codes == [0, 0], job.log(0)[-3000:] + job.log(1)[-3000:]
    return root / "out", job


def test_two_nodes_stage1_on_a_shared_folder(shared_run):
    out, job = shared_run
    assert (out / "latest").read_text().strip() == "checkpoint-6"
    for step in (4, 6):  # keep_last 2
        assert_complete(out / f"checkpoint-{step}")
    assert "rank 0/2" in (out / "train.log").read_text()
    assert_written_once(out)
    assert "done: " in job.log(0) and "done: " not in job.log(1)


@pytest.mark.heavy
@pytest.mark.parametrize("kind, stage, data", [("torchrun", "stage_1", "cc3m_enc"), ("torchrun", "stage_2", "cc3m_dec"),
                                               ("deepspeed", "stage_3", "image_instruction")])
def test_two_nodes_stages(tiny_env, tmp_path, kind, stage, data):
    if stage != "stage_1":
        tiny_env.embeddings()
    if stage == "stage_3":
        tiny_env.features()
    out = tmp_path / "out"
    job = NodeJob(kind, train_args(tiny_env, stage, out, f"data.datasets=[{data}]", "train.max_steps=2",
                                   "train.init_from="), tmp_path / "nodes").start()
    codes = job.wait(600)
    assert codes == [0, 0], job.log(0)[-3000:] + job.log(1)[-3000:]
    assert_complete(out / "checkpoint-2")
    assert_written_once(out)


@pytest.mark.heavy
def test_two_nodes_process_embeddings(tiny_env, tmp_path):
    """`process_embeddings --all` sharded over two nodes writes what one process writes, one manifest."""
    reference = tiny_env.embeddings()
    out = tmp_path / "embed"
    job = NodeJob("deepspeed", [PROCESS, *tiny_env.argv("stage_3", f"data.embed_dir={out}"), "--all",
                                "--batch-size", "8"], tmp_path / "nodes").start()
    codes = job.wait(600)
    assert codes == [0, 0], job.log(0)[-3000:] + job.log(1)[-3000:]
    assert "(share 1/2)" in job.log(1) and " 0 written" not in job.log(1).split("image: ")[1].split("\n")[0]
    names = sorted(p.name for p in out.rglob("*.npy"))
    assert names == sorted(p.name for p in reference.rglob("*.npy")) and names
    for name in names[:12]:
        np.testing.assert_array_equal(np.load(out / name), np.load(reference / name))
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


@pytest.mark.skipif(own_disk_available() is not None, reason=f"own disk per node: {own_disk_available()}")
@pytest.mark.parametrize("script", ["train", "process_embeddings"])
def test_node_with_its_own_disk_is_refused(tiny_env, tmp_path, script):
    """Node 1 with a tmpfs over the output folder: both nodes stop at start with the same one line naming the
    folder and the way out; nothing is trained or written (before: exit 0, checkpoints without rank 1's files)."""
    out = tmp_path / "out"
    if script == "train":
        args, key = train_args(tiny_env, "stage_1", out, *STAGE_1), "train.output_dir"
    else:
        args, key = [PROCESS, *tiny_env.argv("stage_3", f"data.embed_dir={out}"), "--all"], "data.embed_dir"
    job = NodeJob("deepspeed", args, tmp_path / "nodes").start(own_disk={1: out})
    codes = job.wait(600)
    assert codes[0] == 2 and codes[1] == 2, job.log(0)[-3000:] + job.log(1)[-3000:]
    lines = [error_lines(job.log(r)) for r in (0, 1)]
    assert len(lines[0]) == 1 and lines[0] == lines[1], lines
    assert lines[0][0].startswith(f"error: {key} {out}: rank 1 ") and "shared file system" in lines[0][0]
    assert "use_node_local_storage" in lines[0][0]
    assert not list(out.glob("checkpoint-*")) and not list(out.glob("*.npy"))


@pytest.mark.parametrize("victim", ["rank", pytest.param("node", marks=pytest.mark.heavy)])
def test_dead_rank_stops_the_job_and_resume_is_bit_exact(tiny_env, tmp_path, shared_run, victim):
    """kill -9 node 1's rank (or its whole launcher tree) after a checkpoint: rank 0 stops within
    train.dist_timeout with one line naming rank 1; `latest` verifies; both nodes rerun with --resume auto end
    bit-identical to the uninterrupted shared_run."""
    from nextgpt.checkpoint.resume_checks import verify

    out = tmp_path / "out"
    args = train_args(tiny_env, "stage_1", out, *STAGE_1)
    job = NodeJob("deepspeed", args, tmp_path / "killed").start()
    job.wait_for(f"saved {out / 'checkpoint-2'}", poll=0.01)
    # node 1's rank held the moment checkpoint-2 is saved: rank 0 cannot get past its next collective, so on a
    # fast machine the run cannot finish before the kill lands
    os.kill(job.rank_pid(1), signal.SIGSTOP)
    killed = time.time()
    job.kill_rank(1) if victim == "rank" else job.kill_node(1)
    codes = job.wait(120)
    assert time.time() - killed < 20 + 15, "rank 0 did not stop within train.dist_timeout"
    lines = error_lines(job.log(0))
    if codes[0] == 0:
        pytest.skip("the run finished before the kill took effect")
    assert codes[0] == 2 and len(lines) == 1, job.log(0)[-3000:]
    assert lines[0].startswith("error: rank 1 (host ") and "stopped answering" in lines[0]
    assert "--resume auto" in lines[0]
    latest = out / (out / "latest").read_text().strip()
    assert verify(latest) == [] and latest.name in lines[0]

    again = NodeJob("deepspeed", args, tmp_path / "resumed").start()
    codes = again.wait(600)
    assert codes == [0, 0], again.log(0)[-3000:] + again.log(1)[-3000:]
    assert f"resumed from {latest}" in (out / "train.log").read_text()
    expected, got = delta(shared_run[0] / "checkpoint-6"), delta(out / "checkpoint-6")
    assert sorted(expected) == sorted(got)
    for name in expected:
        assert (expected[name] == got[name]).all(), name


# -- pdsh over ssh to loopback names (DeepSpeed's default multi-node path) -----------------------------------------

@pytest.fixture
def sshd(tmp_path):
    """An sshd of this test's own on a free loopback port, accepting one fresh key (nothing outside tmp_path
    changes); skipped where sshd, ssh or pdsh are not installed."""
    missing = [tool for tool in ("sshd", "ssh", "pdsh", "ssh-keygen")
               if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install openssh-server pdsh)")
    folder = tmp_path / "ssh"
    folder.mkdir()
    for name in ("key", "host_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    shutil.copy(folder / "key.pub", folder / "authorized_keys")
    port = free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nAuthorizedKeysFile "
        f"{folder / 'authorized_keys'}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        f"StrictModes no\nUsePAM no\nPidFile {folder / 'sshd.pid'}\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    daemon = subprocess.Popen([sshd_bin, "-D", "-f", str(folder / "sshd_config"), "-E", str(folder / "sshd.log")])
    time.sleep(0.5)
    yield port, folder / "key"
    daemon.kill()
    daemon.wait()


@pytest.mark.heavy
def test_pdsh_hostfile_over_ssh(tiny_env, tmp_path, sshd):
    """`deepspeed --hostfile` without --no_ssh: DeepSpeed's runner starts every node's launcher through pdsh/ssh
    (hosts `localhost` and `127.0.0.1`: two names of this machine)."""
    port, key = sshd
    out = tmp_path / "out"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    env = launcher_env()
    # pdsh's ssh takes its options from here; --no_ssh_check: the runner's own check runs plain `ssh` (no key)
    env["PDSH_SSH_ARGS_APPEND"] = (f"-i {key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                                   "-o BatchMode=yes")
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--ssh_port", str(port),
               "--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               *train_args(tiny_env, "stage_1", out, "data.datasets=[cc3m_enc]", "train.max_steps=2",
                           "train.init_from=")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "pdsh -S" in result.stdout + result.stderr
    assert_complete(out / "checkpoint-2")
    assert_written_once(out)
