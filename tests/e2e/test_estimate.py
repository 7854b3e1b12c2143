"""scripts/estimate.py on the tiny workspace: the FLOPs it predicts follow what the step runs."""

from __future__ import annotations

import json

import estimate


def test_estimate_counts_the_suffix_backward_and_the_zero_stage(tiny_env, tmp_path, capsys):
    on, off, zero_0 = tmp_path / "on.json", tmp_path / "off.json", tmp_path / "zero0.json"
    ds = json.loads((estimate.REPO / "code" / "dsconfig" / "cpu.json").read_text())      # ZeRO-2
    zero_0.write_text(json.dumps({**ds, "zero_optimization": {"stage": 0}}))
    big = "train.micro_batch_size=64"          # compute-bound passes: the split pays (suffix.worth_splitting)
    assert estimate.main([*tiny_env.argv("stage_2", big), "--json", str(on), "--gpus", "8", "--mfu", "0.4",
                          "--ds_config", str(estimate.REPO / "code" / "dsconfig" / "cpu.json")]) == 0
    assert estimate.main([*tiny_env.argv("stage_2", big, "train.suffix_backward=false"), "--json", str(off),
                          "--gpus", "8", "--ds_config", str(zero_0)]) == 0
    fast, full = json.loads(on.read_text()), json.loads(off.read_text())
    assert fast["tokens_per_sample"] == full["tokens_per_sample"] > 10
    assert fast["grad_tokens_per_sample"] < fast["tokens_per_sample"] / 2       # only the signal block and after
    assert full["grad_tokens_per_sample"] == full["tokens_per_sample"]
    assert 0.5 < fast["full_backward_ratio"] < 0.8 < full["full_backward_ratio"]
    h100, a100 = fast["predictions"][:2]
    assert (h100["gpu"], a100["gpu"]) == ("H100", "A100-80GB")
    assert h100["samples_per_s_per_gpu"] > 3 * a100["samples_per_s_per_gpu"] > 0   # 989 vs 312 TFLOP/s
    assert fast["memory_gib"]["LLM weights"] > 12                                 # a bf16 7B on every GPU
    # ZeRO-2 partitions optimizer states over the 8 GPUs, ZeRO-0 keeps them whole
    assert (fast["memory_gib"]["zero"], full["memory_gib"]["zero"]) == (2, 0)
    assert abs(full["memory_gib"]["optimizer states"] - 8 * fast["memory_gib"]["optimizer states"]) < 1e-9
    assert "stage 2" in capsys.readouterr().out


def test_estimate_bad_mfu_is_one_line(tiny_env, capsys):
    assert estimate.main([*tiny_env.argv("stage_2"), "--mfu", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --mfu") and err.count("\n") == 1


def test_estimate_micro_batch_1_is_weight_bound_and_does_not_split(tiny_env, tmp_path):
    out = tmp_path / "one.json"
    assert estimate.main([*tiny_env.argv("stage_2", "train.micro_batch_size=1"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["suffix_backward_used"] is False and result["full_backward_ratio"] > 0.99
    assert all(p["bound"] == "weights" for p in result["predictions"])       # 13 GB read per pass, few rows
