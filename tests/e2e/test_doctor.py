"""`make doctor` (scripts/doctor.py): passes on this CPU machine with the tiny config; a missing checkpoint, a
dsconfig that needs a compiler where none is on PATH, too little disk and an unreachable host each fail with
their one line."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest

import doctor
from tiny.nodes import REPO

DSCONFIG = REPO / "code" / "dsconfig"


def run(tiny_env, tmp_path, capsys, *overrides, extra=()):
    argv = tiny_env.argv("stage_1", f"train.output_dir={tmp_path / 'out'}", *overrides)
    code = doctor.main([*argv, "--ds_config", str(DSCONFIG / "cpu.json"), *extra])
    out = capsys.readouterr().out  # (the error line of a refusal: `code` 2 and stderr, see the last test)
    return code, out, [line.split("PROBLEM", 1)[1].strip() for line in out.splitlines() if "PROBLEM" in line]


def test_doctor_passes_on_cpu_with_the_tiny_config(tiny_env, tmp_path, capsys):
    code, out, problems = run(tiny_env, tmp_path, capsys)
    assert (code, problems) == (0, []), out
    assert "no CUDA device" in out and "gloo" in out and "compiles nothing" in out
    assert "no problems: the run would start" in out


def test_doctor_names_a_missing_checkpoint(tiny_env, tmp_path, capsys):
    code, out, problems = run(tiny_env, tmp_path, capsys, f"model.llm={tmp_path / 'no_vicuna'}")
    assert code == 1 and problems, out
    assert all(p.startswith("checkpoint") for p in problems) and str(tmp_path / "no_vicuna") in problems[0]
    assert "make check-ckpt" in problems[0]


def test_doctor_names_a_compiler_that_is_not_there(tiny_env, tmp_path, capsys, monkeypatch):
    """An AdamW without torch_adam: DeepSpeed would build FusedAdam (on CPU with a C++ compiler) at first use."""
    ds = json.loads((DSCONFIG / "cpu.json").read_text())
    ds["optimizer"]["params"].pop("torch_adam")
    path = tmp_path / "fused.json"
    path.write_text(json.dumps(ds))
    monkeypatch.setenv("PATH", str(tmp_path / "empty_bin"))
    argv = tiny_env.argv("stage_1", f"train.output_dir={tmp_path / 'out'}")
    code = doctor.main([*argv, "--ds_config", str(path)])
    lines = [line for line in capsys.readouterr().out.splitlines() if "PROBLEM" in line]
    assert code == 1 and len(lines) == 1, lines
    assert "fused_adam" in lines[0] and "c++ and ninja is not on PATH" in lines[0] and str(path) in lines[0]


def test_doctor_names_too_little_disk(tiny_env, tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    code, out, problems = run(tiny_env, tmp_path, capsys, "train.keep_last=3")
    assert code == 1 and len(problems) == 1, out
    assert problems[0].startswith(f"disk        {tmp_path / 'out'}: 0.0 GiB free, 3 + 1 checkpoint(s)")
    assert "train.keep_last" in problems[0]


def test_doctor_names_an_unreachable_host(tiny_env, tmp_path, capsys):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("no-such-host-23.invalid slots=1\n")
    code, out, problems = run(tiny_env, tmp_path, capsys, extra=["--hostfile", str(hostfile)])
    assert code == 1 and len(problems) == 1, out
    assert problems[0].startswith("nodes") and "--no_ssh --node_rank" in problems[0]
    assert not list((tmp_path / "out").glob(".shared-check.*"))


def test_doctor_refuses_a_malformed_hostfile(tiny_env, tmp_path, capsys):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0\n")
    argv = tiny_env.argv("stage_1", f"train.output_dir={tmp_path / 'out'}")
    code = doctor.main([*argv, "--ds_config", str(DSCONFIG / "cpu.json"), "--hostfile", str(hostfile)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: {hostfile}:1: expected '<host> slots=<n>', got 'node0'"
