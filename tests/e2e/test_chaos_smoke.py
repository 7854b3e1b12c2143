"""The fault-injection harness works: a real bad input passes its check, and a command that fails to report its
error is caught. (The full suite is `make chaos`; no timing here.)"""

from __future__ import annotations

import sys

from chaos import run as chaos


def test_bad_input_cases_pass_and_a_silent_failure_is_caught(tiny_env, tmp_path):
    table = {case.name: case for case in chaos.cases()}
    typo = chaos.run_case(table["config_typo"], tiny_env, tmp_path)
    assert typo.ok, typo.detail
    assert "lrr" in typo.detail and "exit 2" in typo.detail

    # A command that exits 0 and prints no error line, and one that dies with a traceback: both must fail.
    silent = chaos.Case("silent", "exits 0 quietly", lambda case, env: [sys.executable, "-c", "print('done')"],
                        ("anything",))
    crash = chaos.Case("crash", "raises", lambda case, env: [sys.executable, "-c", "raise ValueError('boom')"],
                       ("boom",))
    silent_check = chaos.run_case(silent, tiny_env, tmp_path)
    crash_check = chaos.run_case(crash, tiny_env, tmp_path)
    assert not silent_check.ok and "exit 0" in silent_check.detail
    assert not crash_check.ok and "traceback printed" in crash_check.detail
