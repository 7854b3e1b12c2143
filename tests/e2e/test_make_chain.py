"""The seed's one-line make chains on a FRESH `git clone` (no .venv, no conda env): `make env stage1 stage2
stage3` (plain and CONFIG=tiny), `make env demo`, `make env test`.

The Makefile under test is the real one (the working tree's, copied over the clone so uncommitted edits count);
only `make env` is a cheap stand-in (MAKE_ENV_SCRIPT) that creates .venv/bin/python as a recorder: it logs every
command it is asked to run and succeeds. The system `python3` on the PATH is a trap that fails the run, so a
target that picked its interpreter when the Makefile was parsed (before `make env` built .venv) is caught.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OVERLAY = ["Makefile", "scripts/python.sh", "scripts/free_port.sh"]


@pytest.fixture
def clone(tmp_path):
    if shutil.which("make") is None or shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs make, git and a git checkout")
    target = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True, timeout=60)
    for name in OVERLAY:
        shutil.copy2(REPO / name, target / name)
    log = tmp_path / "commands.log"
    recorder = tmp_path / "recorder"
    # -c snippets (the free-port helper) and the Makefile asking the config where a stage writes really run;
    # everything else is recorded
    recorder.write_text(f'#!/usr/bin/env bash\nif [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\n'
                        f'if [ "$1 $2" = "-m nextgpt.config" ]; then exec {sys.executable} "$@"; fi\n'
                        f'echo "$*" >> {log}\n')
    recorder.chmod(0o755)
    fake_env = tmp_path / "fake_make_env.sh"
    fake_env.write_text(f"set -e\nmkdir -p .venv/bin\nln -sf {recorder} .venv/bin/python\necho '[env] fake'\n")
    trap = tmp_path / "bin"
    trap.mkdir()
    for name in ("python3", "python"):
        (trap / name).write_text(f"#!/bin/sh\necho \"system {name} used: $*\" >> {log}\nexit 3\n")
        (trap / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MASTER_PORT")}
    env["PATH"] = f"{trap}:/usr/local/bin:/usr/bin:/bin"

    def make(*args: str, **extra_env: str) -> list[str]:
        if log.exists():
            log.unlink()
        shutil.rmtree(target / ".venv", ignore_errors=True)
        (target / ".env-ready").unlink(missing_ok=True)
        result = subprocess.run(["make", "--no-print-directory", f"MAKE_ENV_SCRIPT={fake_env}", *args], cwd=target,
                                env={**env, **extra_env}, capture_output=True, text=True, timeout=120)
        lines = log.read_text().splitlines() if log.exists() else []
        assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:], lines)
        assert not [line for line in lines if line.startswith("system ")], lines
        return lines

    assert not (target / ".venv").exists()
    make.target = target
    return make


def _ran(lines: list[str], pattern: str) -> list[str]:
    return [line for line in lines if re.search(pattern, line)]


@pytest.mark.parametrize("config", ["", "tiny"])
def test_env_then_three_stages_in_one_line(clone, config):
    lines = clone("env", "stage1", "stage2", "stage3", f"CONFIG={config}")
    folder = "code/config/tiny" if config else "code/config"
    assert _ran(lines, rf"scripts/check_ckpt.py --config {folder}/stage_3.yaml")
    assert _ran(lines, rf"process_embeddings.py --config {folder}/stage_1.yaml --all --features")
    assert _ran(lines, rf"process_embeddings.py --config {folder}/stage_3.yaml --all$")
    trains = _ran(lines, r"code/train\.py --config")              # through the DeepSpeed launcher
    assert [re.search(r"stage_(\d)\.yaml", t).group(1) for t in trains] == ["1", "2", "3"]
    ports = [int(re.search(r"--master_port (\d+)", t).group(1)) for t in trains]
    assert all(1024 <= p < 65536 for p in ports) and 29500 not in ports
    if config:
        assert _ran(lines, r"scripts/tiny/make_tiny_ckpt.py") and _ran(lines, r"scripts/tiny/make_toy_data.py")


def test_env_demo_and_env_test_in_one_line(clone):
    assert _ran(clone("env", "demo"), r"^scripts/demo.py")
    assert _ran(clone("env", "test", "ARGS=-x tests/test_x.py"), r"^-m pytest -q -x tests/test_x.py")


def test_master_port_and_args_are_honoured(clone):
    lines = clone("env", "stage1", "MASTER_PORT=4321", "ARGS=--set data.root=/elsewhere --resume none")
    (train,) = _ran(lines, r"code/train.py")
    assert "--master_port 4321" in train and train.endswith("--set data.root=/elsewhere --resume none")
    # the chain's feature step gets the --set overrides, not train.py's own flags
    (features,) = _ran(lines, r"--features")
    assert features.endswith("--features --set data.root=/elsewhere")
    for target in ("validate", "embeddings", "features"):
        lines = clone("env", target, "ARGS=--set data.root=/elsewhere")
        assert lines and all(line.endswith("--set data.root=/elsewhere") for line in lines), (target, lines)


def test_set_output_dir_moves_where_make_looks(clone):
    """`make stage2 ARGS="--set train.output_dir=DIR"` trains stage 2 into DIR and looks for DIR/done.json (the
    Makefile asks the config); the stage before it keeps its own folder."""
    args = "ARGS=--set train.output_dir=runs/elsewhere"
    trains = _ran(clone("env", "stage2", "CONFIG=tiny", args), r"code/train\.py --config")
    assert [re.search(r"stage_(\d)\.yaml", t).group(1) for t in trains] == ["1", "2"]
    assert "train.output_dir" not in trains[0] and trains[1].endswith("--set train.output_dir=runs/elsewhere")
    target = clone.target
    (target / "ckpt/tiny/delta/stage_1").mkdir(parents=True)
    (target / "ckpt/tiny/delta/stage_1/done.json").write_text("{}")
    trains = _ran(clone("env", "stage2", "CONFIG=tiny", args), r"code/train\.py --config")
    assert [re.search(r"stage_(\d)\.yaml", t).group(1) for t in trains] == ["2"]   # DIR/done.json is missing
    (target / "runs/elsewhere").mkdir(parents=True)
    (target / "runs/elsewhere/done.json").write_text("{}")
    assert not _ran(clone("env", "stage2", "CONFIG=tiny", args), r"code/train\.py --config")
