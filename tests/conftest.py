"""Shared fixtures. `tiny_env`: a tiny workspace (scripts/tiny/tiny_workspace.py: tiny checkpoints, toy data, the
config overrides pointing the tiny configs at them), built once per test session in a tmp dir.

    def test_something(tiny_env):
        cfg = tiny_env.config("stage_2", "train.max_steps=3")     # code/config/tiny/stage_2.yaml, paths -> tmp
        main(tiny_env.argv("stage_2", "train.max_steps=3"))        # the same as script arguments

scripts/ and code/ are on the import path through pyproject.toml's [tool.pytest.ini_options] pythonpath.
"""

from __future__ import annotations

import pytest

from tiny.tiny_workspace import TinyEnv, build_tiny_env


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory) -> TinyEnv:
    return build_tiny_env(tmp_path_factory.mktemp("tiny_env"))
