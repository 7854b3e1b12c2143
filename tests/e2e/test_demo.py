"""`make demo` end to end with a handful of steps per stage: every step runs, the report and files appear.

The real demo (scripts/demo.py defaults) trains long enough to learn; here only the plumbing is checked, so the
step counts are tiny and nothing about accuracy is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_every_step_and_reports(tmp_path):
    work = tmp_path / "demo"
    command = [sys.executable, str(REPO / "scripts" / "demo.py"), "--workdir", str(work), "--launcher", "python",
               "--pretrain-steps", "3", "--stage1-steps", "2", "--stage2-steps", "2", "--stage3-steps", "2",
               "--judged-requests", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for stage in (1, 2, 3):
        assert f"stage {stage}: 2 steps" in out
        assert (work / "ckpt" / "tiny" / "delta" / f"stage_{stage}" / "done.json").exists()
    assert "stage-1 token accuracy on the same" in out
    # the base-vs-stages evaluation table: one row per checkpoint, base first, each stage's final checkpoint after
    evaluated = json.loads((work / "runs" / "demo" / "eval" / "metrics.json").read_text())["checkpoints"]
    assert [run["name"] for run in evaluated] == ["base", "stage_1/checkpoint-2", "stage_2/checkpoint-2",
                                                  "stage_3/checkpoint-2"]
    assert "held-out evaluation, base vs stages 1-3" in out and "| base | – |" in out
    assert "signal-token emission rate, base -> stage_3/checkpoint-2: image" in out
    assert (work / "runs" / "demo" / "loss_curves.png").stat().st_size > 0
    # the judged evaluation ran (random decoders here: the table, not its figures) and the report shows it
    assert (work / "runs" / "demo" / "judged" / "judged.json").exists() and "(a) true caption embedding" in out
    # A rerun finds every step done and redoes nothing.
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped") >= 8
