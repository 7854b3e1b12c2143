"""Shared fixtures. `tiny_env`: a tiny workspace (scripts/tiny/tiny_workspace.py: tiny checkpoints, toy data, the
config overrides pointing the tiny configs at them), built once per test session in a tmp dir.

    def test_something(tiny_env):
        cfg = tiny_env.config("stage_2", "train.max_steps=3")     # code/config/tiny/stage_2.yaml, paths -> tmp
        main(tiny_env.argv("stage_2", "train.max_steps=3"))        # the same as script arguments

scripts/ and code/ are on the import path through pyproject.toml's [tool.pytest.ini_options] pythonpath.

tests/unit/ mirrors code/nextgpt (in-process); every test under tests/e2e/ is marked `slow` here, except the one
marked `smoke`: `make test` runs `-m "not slow"` (unit + the smoke), `make test-all` everything but the tests marked
`heavy` (minutes each), which `make test-heavy` runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny.tiny_workspace import TinyEnv, build_tiny_env


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory) -> TinyEnv:
    return build_tiny_env(tmp_path_factory.mktemp("tiny_env"))


E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E in Path(item.fspath).resolve().parents and item.get_closest_marker("smoke") is None:
            item.add_marker(pytest.mark.slow)
