"""Full-size trainable counts on the meta device (no weights, no memory): Vicuna-7B config, ImageBind-huge 1024,
SD-1.5 768 / Zeroscope 1024 / AudioLDM 512 conditioning (reference §1.3, §1.5, §1.6, §1.8)."""

from __future__ import annotations

import pytest
import torch

from nextgpt import config
from nextgpt.config import REPO_ROOT
from nextgpt.model import llm as llm_utils
from nextgpt.model.nextgpt import NextGPT, imagebind_dim
from nextgpt.model.trainable import set_trainable
from nextgpt.modalities import MODALITIES, added_tokens
from nextgpt.tokens import TokenIds

VOCAB, HIDDEN = 32000, 4096
SHAPES = {"image": (77, 768), "video": (77, 1024), "audio": (1, 512)}


def vicuna_7b_token_ids() -> TokenIds:
    ids = iter(range(VOCAB, VOCAB + len(added_tokens())))   # added after the 32000 LLaMA pieces, in order
    media_start, media_end = next(ids), next(ids)
    signal = {m.name: [next(ids) for _ in range(m.num_signal_tokens)] for m in MODALITIES.values()}
    return TokenIds(bos=1, eos=2, pad=2, media_start=media_start, media_end=media_end, signal=signal)


def build_7b(stage: int, *overrides: str) -> tuple[NextGPT, dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = config.load(REPO_ROOT / "code" / "config" / f"stage_{stage}.yaml", list(overrides))
    token_ids = vicuna_7b_token_ids()
    llama = LlamaConfig(vocab_size=VOCAB + len(added_tokens()), hidden_size=HIDDEN, intermediate_size=11008,
                        num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6, tie_word_embeddings=False)
    with torch.device("meta"):
        llm = llm_utils.wrap_llm(LlamaForCausalLM(llama), token_ids, cfg.train.token_rows, cfg.model.lora)
        model = NextGPT(cfg, llm, None, token_ids, imagebind_dim(cfg.model.imagebind_preset), SHAPES)
    return model, set_trainable(model, cfg)


def test_imagebind_huge_dimension():
    assert imagebind_dim("huge") == 1024


def test_stage_3_counts_at_7b():
    model, counts = build_7b(3)
    assert counts["input_proj"] == 4_198_400
    assert counts["output_proj.image"] == 31_958_784
    assert counts["output_proj.video"] == 32_090_112
    assert counts["output_proj.audio"] == 31_788_544
    assert counts["lora"] == 33_554_432
    assert counts["token_rows"] == 2 * 38 * 4096
    assert counts["total"] == 4_198_400 + 31_958_784 + 32_090_112 + 31_788_544 + 33_554_432 + 2 * 38 * 4096
    assert model.input_proj.weight.device.type == "meta"


@pytest.mark.parametrize("stage, trained", [(1, {"input_proj"}), (2, {"output_proj"})])
def test_stages_1_2_and_the_original_token_rows(stage, trained):
    _, counts = build_7b(stage)
    assert {g.split(".")[0] for g, n in counts.items() if n and g not in ("total", "token_rows")} == trained
    assert counts["lora"] == 0 and counts["token_rows"] == 2 * 38 * 4096
    _, original = build_7b(stage, "train.token_rows=all")
    assert original["token_rows"] == 2 * (VOCAB + 38) * 4096          # the whole resized matrices, ~262 M
    _, frozen = build_7b(stage, "train.token_rows=none")
    assert frozen["token_rows"] == 0
