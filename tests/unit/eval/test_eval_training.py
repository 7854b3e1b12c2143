"""Generation checks during training: the emission rate added to the held-out evaluation, media to TensorBoard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nextgpt.eval import run as R
from nextgpt.eval import training as T
from nextgpt.model.decoders import Decoded

EVAL_CONFIG = Path(__file__).resolve().parents[3] / "code" / "config" / "tiny" / "eval.yaml"


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


def test_media_go_to_tensorboard(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    checks = T.GenerationChecks.__new__(T.GenerationChecks)
    checks.pending = [
        ("generate/image_0", Decoded("image", Image.new("RGB", (16, 16), (200, 10, 10))), 0.25),
        ("generate/audio_0", Decoded("audio", np.sin(np.linspace(0, 100, 1600)).astype(np.float32), rate=16000), None),
        ("generate/video_0", Decoded("video", np.zeros((4, 16, 16, 3), np.uint8), rate=8.0), 0.5)]
    checks.write_media(writer, step=3)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "audio": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert {"generate/image_0", "generate/video_0"} <= set(tags["images"]) and "generate/audio_0" in tags["audio"]
    video = events.Images("generate/video_0")[0]
    assert video.step == 3 and video.encoded_image_string[:6] == b"GIF89a" and (video.width, video.height) == (16, 16)
    assert events.Audio("generate/audio_0")[0].sample_rate == 16000
    assert checks.pending == []
