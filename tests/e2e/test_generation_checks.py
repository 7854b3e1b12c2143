"""eval/training.GenerationChecks on the tiny model: the emission rate train.py adds to its held-out evaluation
(greedy generation from a freshly built model; the media-to-TensorBoard half: tests/unit/eval/test_eval_training.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from nextgpt.eval import run as R
from nextgpt.eval import training as T

EVAL_CONFIG = Path(__file__).resolve().parents[2] / "code" / "config" / "tiny" / "eval.yaml"


def test_generation_checks_add_the_emission_rate(tiny_env):
    from nextgpt import config
    from nextgpt.model.nextgpt import build_model

    cfg = config.load(EVAL_CONFIG, [*tiny_env.overrides, "data.datasets=[cc3m_dec,alpaca_instruction]",
                                    "data.eval_fraction=0.03"])
    torch.manual_seed(0)
    model = build_model(cfg)
    sets = R.held_out_datasets(cfg, model.tokenizer, model.token_ids)
    checks = T.GenerationChecks(cfg, list(sets.values()))
    assert {item.requested for item in checks.items} == {"image", "text"}
    assert all(sum(i.requested == r for i in checks.items) <= T.TRAINING_REQUESTS for r in ("image", "text"))
    model.train()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    result = checks.run(model, step=1)
    assert torch.equal(torch.rand(3), expected_next)           # training's random stream is left as it was
    assert set(result) >= {"emission.image", "emission.text"}
    assert all(0.0 <= result[k] <= 1.0 for k in ("emission.image", "emission.text"))
    assert model.training                                        # generation leaves the training mode as it was
    assert checks.run(model, step=2) == result                   # greedy: the same requests, the same replies
    assert T.GenerationChecks(cfg, []).run(model, step=1) == {}  # no held-out split: nothing to add
