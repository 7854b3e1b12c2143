"""Signals under the seed's own launcher (issue 26): SIGTERM to the outermost `deepspeed` process only, left
unreaped as a supervisor that signals and sleeps leaves it, stops every rank within one step with a checkpoint
that verifies; the plain one-process command then resumes it bit-identical. `make chaos` runs the same cases for
every launcher form (chaos.LAUNCHERS) and SIGINT to the process group too."""

from __future__ import annotations

import pytest

from chaos import run as chaos


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sigterm_outer_deepspeed", "resume_after_deepspeed"])
def test_sigterm_to_the_deepspeed_command_stops_every_rank(name, tiny_env, tmp_path):
    chaos.REFS = chaos.References(tiny_env, tmp_path, print)       # the uninterrupted run resume_after compares to
    table = {case.name: case for case in chaos.cases()}
    check = chaos.run_case(table[name], tiny_env, tmp_path)
    assert check.ok, f"{check.detail}\n{check.output}"
