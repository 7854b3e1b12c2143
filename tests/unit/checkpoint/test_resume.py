"""nextgpt.checkpoint.resume with a real DeepSpeed engine on CPU and a tiny stand-in module (the NExT-GPT model is exercised
end to end in test_train.py): layout, atomic rename + `latest`, keep_last rotation, bit-exact continuation."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from nextgpt import config as config_lib
from nextgpt import runtime
from nextgpt.checkpoint import resume
from nextgpt.checkpoint import resume_checks

DSCONFIG = config_lib.REPO_ROOT / "code" / "dsconfig" / "cpu.json"


class Tiny(torch.nn.Module):
    """A frozen layer, a trainable one and dropout (so the torch RNG matters for the next step)."""

    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 1)
        self.dropout = torch.nn.Dropout(0.3)
        self.frozen.requires_grad_(False)

    def forward(self, x):  # (B, 8) -> scalar loss
        return self.head(self.dropout(torch.relu(self.frozen(x)))).pow(2).mean()


@pytest.fixture(scope="module")
def rt():
    cfg = config_lib.load(None, ["train.micro_batch_size=4", "train.lr=0.05", "train.warmup_steps=2"])
    ds = runtime.fill_ds_config(runtime.load_ds_config(DSCONFIG, cfg, 1), cfg, 1, total_steps=20)
    handle = runtime.setup(ds, DSCONFIG, verbose=False)
    handle.ds = ds
    yield handle
    runtime.shutdown(handle)


def make_engine(rt):
    import deepspeed

    torch.manual_seed(0)
    model = Tiny()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=json.loads(json.dumps(rt.ds)))
    return engine


def batch(step):
    # The "data": a deterministic function of the step, plus a python/numpy random draw so those RNGs matter too.
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 8, generator=g) * (1 + random.random()) * (1 + float(np.random.rand()))


def run(engine, start, stop):
    losses = []
    for step in range(start, stop):
        loss = engine(batch(step))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def test_resume_is_bit_exact_and_layout(rt, tmp_path):
    runtime.seed_everything(1)
    engine = make_engine(rt)
    initial = engine.module.head.weight.detach().clone()
    runtime.seed_everything(1)
    reference = run(engine, 0, 6)
    ref_head = {k: v.clone() for k, v in engine.module.head.state_dict().items()}
    assert not torch.allclose(ref_head["weight"], initial)  # it did train

    runtime.seed_everything(1)
    engine = make_engine(rt)
    runtime.seed_everything(1)
    first = run(engine, 0, 3)
    for step in (1, 2, 3):  # keep_last=2: checkpoint-1 is rotated away
        path = resume.save(engine, tmp_path, step, 0, {"sampler": {"epoch": 0, "position": step}},
                           lambda folder: (folder / "delta.safetensors").write_bytes(b"stand-in"), keep_last=2)
    assert path == tmp_path / "checkpoint-3"
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "latest"]  # no temp dirs
    assert (path / "delta.safetensors").is_file() and (path / "state" / "rank_0.pt").is_file()
    assert (path / "state" / resume.DS_TAG / "mp_rank_00_model_states.pt").is_file()
    # exclude_frozen_parameters: DeepSpeed's module state holds only the trainable tensors.
    module_state = torch.load(path / "state" / resume.DS_TAG / "mp_rank_00_model_states.pt", weights_only=False)
    assert sorted(module_state["module"]) == ["head.bias", "head.weight"]
    assert resume_checks.find_resume(tmp_path, "auto") == path
    assert resume_checks.find_resume(tmp_path, str(tmp_path)) == path
    assert resume_checks.find_resume(tmp_path, "none") is None
    python_state, torch_state = random.getstate(), torch.get_rng_state()

    # "Interrupt": scramble every RNG and the weights, build a fresh engine, and resume.
    runtime.seed_everything(999)
    engine = make_engine(rt)
    with torch.no_grad():
        engine.module.head.weight.add_(1.0)
    state = resume.load(engine, resume_checks.find_resume(tmp_path, "auto"), 0)
    assert state["step"] == 3 and state["sampler"] == {"epoch": 0, "position": 3}
    assert random.getstate() == python_state and torch.equal(torch.get_rng_state(), torch_state)
    assert engine.global_steps == 3
    second = run(engine, 3, 6)
    assert first + second == reference
    for name, value in engine.module.head.state_dict().items():
        assert torch.equal(value, ref_head[name]), name


def test_state_converts_with_zero_to_fp32_without_a_tag(rt, tmp_path):
    """<checkpoint>/state is a DeepSpeed checkpoint folder with its own `latest`, so DeepSpeed's zero_to_fp32
    finds the tag by itself (`python zero_to_fp32.py <checkpoint>/state out/`, no -t)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    engine = make_engine(rt)
    run(engine, 0, 1)
    path = resume.save(engine, tmp_path, 1, 0, {}, lambda folder: (folder / "delta.safetensors").write_bytes(b"x"),
                       keep_last=1)
    assert (path / "state" / "latest").read_text().strip() == resume.DS_TAG
    state = get_fp32_state_dict_from_zero_checkpoint(str(path / "state"))
    assert torch.equal(state["head.weight"], engine.module.head.weight.detach().float())


def test_save_replaces_stale_temp_and_same_step(rt, tmp_path):
    engine = make_engine(rt)
    run(engine, 0, 1)
    stale = tmp_path / ".checkpoint-1.tmp"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("left by a killed run")
    resume.save(engine, tmp_path, 1, 0, {}, lambda folder: None, keep_last=0)
    resume.save(engine, tmp_path, 1, 0, {}, lambda folder: None, keep_last=0)  # the same step again: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "latest"]
    assert not (tmp_path / "checkpoint-1" / "junk").exists()


def test_strict_load_of_trainable_state(rt, tmp_path):
    engine = make_engine(rt)
    run(engine, 0, 1)
    resume.save(engine, tmp_path, 1, 0, {}, lambda folder: None, keep_last=0)
    other = make_engine(rt)
    other.module.head.requires_grad_(False)
    other.module.frozen.requires_grad_(True)  # now frozen.* would have to be in the training state
    with pytest.raises(ValueError, match="missing .*frozen.weight"):
        resume._load_trainable(torch.load(tmp_path / "checkpoint-1" / "state" / resume.DS_TAG /
                                          "mp_rank_00_model_states.pt", weights_only=False)["module"], other.module)
    with pytest.raises(ValueError, match="unexpected .*extra"):
        resume._load_trainable({"extra": torch.zeros(1), **engine.module.state_dict()}, engine.module)


def test_find_resume_errors(tmp_path):
    assert resume_checks.find_resume(tmp_path, "auto") is None  # a fresh run
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        resume_checks.find_resume(tmp_path, str(tmp_path / "nowhere"))
    (tmp_path / "latest").write_text("checkpoint-7\n")
    with pytest.raises(FileNotFoundError, match="checkpoint-7, which has no state"):
        resume_checks.find_resume(tmp_path, "auto")


def test_rotation_keeps_newest(tmp_path):
    for step in (5, 10, 15, 20):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "other").mkdir()
    removed = resume.rotate(tmp_path, 2, tmp_path / "checkpoint-20")
    assert sorted(p.name for p in removed) == ["checkpoint-10", "checkpoint-5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-15", "checkpoint-20", "other"]


def test_remove_partial_leaves_complete_checkpoints(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / ".checkpoint-6.tmp" / "state").mkdir(parents=True)
    (tmp_path / ".checkpoint-2.old").mkdir()
    (tmp_path / ".latest.abc123.tmp").write_text("checkpoint-6")
    (tmp_path / "latest").write_text("checkpoint-4\n")
    removed = resume.remove_partial(tmp_path)
    assert sorted(p.name for p in removed) == [".checkpoint-2.old", ".checkpoint-6.tmp", ".latest.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "latest"]
    assert resume.remove_partial(tmp_path / "absent") == []
