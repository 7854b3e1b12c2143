"""nextgpt.runtime: DeepSpeed JSON resolution (auto values, contradictions), fp16 on CPU, single-process setup."""

from __future__ import annotations

import json
import os

import pytest
import torch

from nextgpt import config as config_lib
from nextgpt import runtime

DSCONFIG = config_lib.REPO_ROOT / "code" / "dsconfig"


def stage_config(*overrides: str) -> config_lib.Config:
    return config_lib.load(config_lib.REPO_ROOT / "code" / "config" / "stage_1.yaml", list(overrides))


def write_json(tmp_path, data, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_required_dsconfigs_exist_and_are_all_auto():
    for name in ("stage_1", "stage_2", "stage_3", "fine_tuning"):  # the documented names: one file, gpu.json
        assert (DSCONFIG / f"{name}.json").resolve() == (DSCONFIG / "gpu.json").resolve(), name
    for name in ("gpu", "cpu", "offload"):
        ds = json.loads((DSCONFIG / f"{name}.json").read_text())
        assert ds["train_batch_size"] == "auto" and ds["train_micro_batch_size_per_gpu"] == "auto"
        assert ds["optimizer"]["params"]["lr"] == "auto"
        assert ds["scheduler"]["type"] == "WarmupDecayLR"
        assert ds["zero_optimization"]["stage"] == 2
    for name in ("stage_1", "stage_2", "stage_3", "fine_tuning", "offload"):  # GPU ones: bf16
        assert json.loads((DSCONFIG / f"{name}.json").read_text())["bf16"]["enabled"] is True
    cpu = json.loads((DSCONFIG / "cpu.json").read_text())
    assert "bf16" not in cpu and "fp16" not in cpu  # fp32: see the report / README on why
    assert cpu["optimizer"]["params"]["torch_adam"] is True  # nothing compiles on CPU
    fp16 = json.loads((DSCONFIG / "fp16.json").read_text())
    assert fp16["fp16"]["enabled"] is True and fp16["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    offload = json.loads((DSCONFIG / "offload.json").read_text())
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_auto_values_filled_from_yaml():
    cfg = stage_config("train.micro_batch_size=3", "train.gradient_accumulation_steps=2", "train.lr=1e-4",
                       "train.warmup_steps=7", "train.grad_clip=0.5")
    ds = runtime.load_ds_config(DSCONFIG / "stage_1.json", cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"] == {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.001,
                                         "torch_adam": True, "fused": True}
    params = ds["scheduler"]["params"]
    assert (params["warmup_max_lr"], params["warmup_min_lr"], params["warmup_num_steps"]) == (1e-4, 0.0, 7)
    assert runtime.unresolved(ds) == ["scheduler.params.total_num_steps"]
    filled = runtime.fill_ds_config(ds, cfg, 4, total_steps=123)
    assert filled["scheduler"]["params"]["total_num_steps"] == 123 and runtime.unresolved(filled) == []
    assert runtime.unresolved(ds) == ["scheduler.params.total_num_steps"]     # a new dict: the one read is as it was


def test_matching_explicit_values_are_accepted(tmp_path):
    cfg = stage_config("train.micro_batch_size=2")
    path = write_json(tmp_path, {"train_batch_size": 4, "train_micro_batch_size_per_gpu": "auto",
                                 "optimizer": {"type": "AdamW", "params": {"lr": 5e-4, "betas": [0.9, 0.95]}}})
    ds = runtime.load_ds_config(path, cfg, world_size=2)
    assert ds["train_batch_size"] == 4 and ds["train_micro_batch_size_per_gpu"] == 2


def test_batch_size_contradiction_names_both_files(tmp_path):
    cfg = stage_config("train.micro_batch_size=1")
    path = write_json(tmp_path, {"train_batch_size": 2, "train_micro_batch_size_per_gpu": "auto",
                                 "gradient_accumulation_steps": "auto"}, "original_stage_1.json")
    with pytest.raises(ValueError) as info:
        runtime.load_ds_config(path, cfg, world_size=1)
    message = str(info.value)
    assert "original_stage_1.json" in message and "stage_1.yaml" in message
    assert "train_batch_size=2" in message and "world size 1" in message
    assert "\n" not in message


def test_lr_contradiction_is_an_error(tmp_path):
    cfg = stage_config()
    path = write_json(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": 4e-4}}})
    with pytest.raises(ValueError, match=r"optimizer\.params\.lr=0\.0004 contradicts .*train\.lr"):
        runtime.load_ds_config(path, cfg, world_size=1)


def test_missing_and_broken_json(tmp_path):
    cfg = stage_config()
    with pytest.raises(FileNotFoundError, match="nope.json"):
        runtime.load_ds_config(tmp_path / "nope.json", cfg, 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        runtime.load_ds_config(bad, cfg, 1)


def test_fp16_on_cpu_is_a_clear_error(monkeypatch):
    for name in runtime.DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    cfg = stage_config()
    ds = runtime.load_ds_config(DSCONFIG / "fp16.json", cfg, 1)
    with pytest.raises(ValueError) as info:
        runtime.setup(ds, DSCONFIG / "fp16.json")
    assert "fp16 is not supported on CPU by DeepSpeed; use code/dsconfig/cpu.json (bf16/fp32)" in str(info.value)
    assert "fp16.json" in str(info.value)
    assert not any(name in os.environ for name in runtime.DIST_ENV)  # nothing left behind
    assert not torch.distributed.is_initialized()


def test_single_process_setup_and_every_json_parses(monkeypatch):
    """setup() fills the env, initialises gloo, and every shipped JSON (filled) is accepted by DeepSpeed's schema;
    shutdown() destroys the group and removes the env defaults again."""
    from deepspeed.runtime.config import DeepSpeedConfig

    for name in runtime.DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    cfg = stage_config()
    ds = runtime.load_ds_config(DSCONFIG / "cpu.json", cfg, 1)
    rt = runtime.setup(ds, DSCONFIG / "cpu.json")
    try:
        assert (rt.device.type, rt.dtype, rt.backend, rt.rank, rt.world_size) == ("cpu", torch.float32, "gloo", 0, 1)
        assert "no CUDA device" in rt.reason and "cpu.json" in rt.reason
        assert os.environ["WORLD_SIZE"] == "1" and int(os.environ["MASTER_PORT"]) > 0
        assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
        assert runtime.any_rank(True, rt.device) and not runtime.any_rank(False, rt.device)
        for path in sorted(DSCONFIG.glob("*.json")):
            filled = runtime.fill_ds_config(json.loads(path.read_text()), cfg, 1, 100, path)
            assert runtime.unresolved(filled) == []
            parsed = DeepSpeedConfig(filled)
            assert parsed.train_batch_size == 1 and parsed.gradient_clipping == 1.0
            assert parsed.zero_optimization_stage == 2
    finally:
        runtime.shutdown(rt)
    assert not torch.distributed.is_initialized()
    assert not any(name in os.environ for name in runtime.DIST_ENV)


def test_launcher_env_is_respected(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    set_here = runtime.single_process_env(local_rank=1)
    try:
        assert set_here == ["LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]
        assert os.environ["RANK"] == "3" and os.environ["LOCAL_RANK"] == "1"
    finally:
        for name in set_here:
            os.environ.pop(name)


def test_seed_everything_is_reproducible():
    import random

    import numpy as np

    runtime.seed_everything(5)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    runtime.seed_everything(5)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_shipped_dsconfigs_compile_nothing_but_offload():
    """Every shipped dsconfig names torch's AdamW through DeepSpeed ("torch_adam": true) except offload.json, whose
    DeepSpeedCPUAdam is built with a C++ compiler, as code/dsconfig/README.md says."""
    from nextgpt.training.deepspeed import ops_to_compile

    for path in sorted(DSCONFIG.glob("*.json")):
        ds = json.loads(path.read_text())
        for cuda in (True, False):
            expected = [("cpu_adam", ["c++", "ninja"])] if path.name == "offload.json" else []
            assert ops_to_compile(ds, cuda) == expected, (path.name, cuda)
    assert "cpu_adam" in (DSCONFIG / "README.md").read_text()


def test_gpu_json_builds_torch_fused_adamw(monkeypatch):
    """deepspeed.initialize on gpu.json (bf16, ZeRO-2; here on the CPU) builds torch.optim.AdamW with its fused
    kernel, the path ops_to_compile reads as compiling nothing."""
    import deepspeed

    for name in runtime.DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    cfg = stage_config()
    path = DSCONFIG / "gpu.json"
    ds = runtime.fill_ds_config(runtime.load_ds_config(path, cfg, 1), cfg, 1, 10, path)
    rt = runtime.setup(ds, path)
    try:
        model = torch.nn.Linear(4, 4)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
        base = engine.optimizer.optimizer           # inside the ZeRO wrapper
        assert type(base) is torch.optim.AdamW and base.defaults["fused"] is True
    finally:
        runtime.shutdown(rt)


def test_device_and_dtype_are_decided_in_runtime_only():
    """cuda-or-cpu and its dtype are decided by nextgpt.runtime (setup for training, pick_device elsewhere); the parts
    (ImageBind encoder, caption encoder, loaders) take the decision as arguments."""
    device, dtype, reason = runtime.pick_device("cpu")
    assert (device, dtype, reason) == (torch.device("cpu"), torch.float32, "CPU: float32")
    assert runtime.pick_device("cpu", torch.bfloat16)[1] == torch.bfloat16
    package = config_lib.REPO_ROOT / "code" / "nextgpt"
    # checkpoint/resume.py saves and restores the CUDA RNG when there is one: not a device choice
    deciding = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                      if "torch.cuda.is_available()" in p.read_text() and p.name != "runtime.py"
                      and p != package / "checkpoint" / "resume.py")
    assert deciding == []
