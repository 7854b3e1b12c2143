"""train.py with the denoising loss (train.loss_weights gen_<modality>, model/denoising.py) on the tiny decoders:
off by default and bit-identical, resume bit-exact, an unusable decoder refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

import train
from nextgpt.model import denoising
from test_denoising import ALL_ON, with_scheduler


@pytest.fixture(scope="module")
def env(tiny_env):
    tiny_env.embeddings()
    tiny_env.features()
    return tiny_env


def test_off_by_default_loads_nothing_and_a_zero_weight_is_the_same_run(env, tmp_path):
    """No gen_* weight (every shipped config) or all of them 0: nothing is loaded, no term is added, and two
    training runs give bit-identical weights and losses."""
    cfg = env.config(2)
    assert not any(k.startswith("gen_") for k in cfg.train.loss_weights) and denoising.build(cfg, "cpu") is None
    zero = "train.loss_weights={lm: 1.0, image: 1.0, video: 1.0, audio: 1.0, gen_image: 0.0, gen_video: 0, gen_audio: 0}"
    sets = ["data.datasets=[cc3m_dec,webvid_dec]", "train.micro_batch_size=2", "train.max_steps=2", "train.init_from=",
            "train.log_every=1"]
    outs = {}
    for name, extra in (("default", []), ("zero", [zero])):
        outs[name] = tmp_path / name
        assert train.main(env.argv(2, f"train.output_dir={outs[name]}", *sets, *extra)) == 0
    losses = {n: [json.loads(line) for line in (o / "metrics.jsonl").read_text().splitlines()] for n, o in outs.items()}
    assert [r["loss"] for r in losses["default"]] == [r["loss"] for r in losses["zero"]]
    assert not any(k.startswith("gen_") for r in losses["zero"] for k in r)
    from safetensors.torch import load_file

    a, b = (load_file(str(o / "checkpoint-2" / "delta.safetensors")) for o in outs.values())
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_the_denoising_loss_is_bit_exact(env, tmp_path, monkeypatch):
    """Stage 2 with every denoising term: a crash inside step 3 and --resume auto from checkpoint-2 end with the
    weights and losses of the uninterrupted 4-step run."""
    from nextgpt.data import collate
    from test_train import Crash, delta_tensors

    sets = [f"train.loss_weights={ALL_ON}", "data.mixture=mixed", "train.micro_batch_size=3", "train.max_steps=4",
            "train.save_every=2", "train.init_from=", "train.log_every=1"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train.main(env.argv(2, f"train.output_dir={whole}", *sets)) == 0
    original, calls = collate.Collator.__call__, {"n": 0}

    def crashing(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash("injected")
        return original(self, batch)

    monkeypatch.setattr(collate.Collator, "__call__", crashing)
    assert train.main(env.argv(2, f"train.output_dir={cut}", *sets)) == 2
    monkeypatch.setattr(collate.Collator, "__call__", original)
    assert train.main(env.argv(2, f"train.output_dir={cut}", *sets)) == 0
    expected, got = delta_tensors(whole / "checkpoint-4"), delta_tensors(cut / "checkpoint-4")
    assert sorted(expected) == sorted(got) and all(torch.equal(expected[k], got[k]) for k in expected)
    rows = {o: [json.loads(line) for line in (o / "metrics.jsonl").read_text().splitlines()] for o in (whole, cut)}
    assert [r["gen_video"] for r in rows[whole] if "gen_video" in r] == \
        [r["gen_video"] for r in rows[cut] if "gen_video" in r]
    assert [r["loss"] for r in rows[whole]] == [r["loss"] for r in rows[cut]]


def test_unusable_decoder_is_one_line_error_naming_its_folder(env, tmp_path, capsys):
    folder = with_scheduler(env, tmp_path, "stable-diffusion", prediction_type="sample")
    code = train.main(env.argv(2, f"train.output_dir={tmp_path / 'out'}", f"model.decoders.image={folder}",
                               "train.loss_weights={lm: 1.0, image: 1.0, gen_image: 1.0}", "train.max_steps=1",
                               "train.init_from="))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert str(folder) in err and "prediction_type 'sample'" in err
