"""Base fingerprints (nextgpt.checkpoint.fingerprint): every delta's meta.json records the LLM / ImageBind it was trained on,
and loading it onto another base is a one-line error naming both, unless train.allow_other_base. Also the
`adapter/` model card: what it is, how to load it with PEFT, no absolute paths."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nextgpt.checkpoint import delta as checkpoint
from nextgpt.checkpoint import fingerprint
from nextgpt.model import llm as llm_utils
from nextgpt.model.nextgpt import build_model
from nextgpt.model.trainable import set_trainable


def built(tiny_env, stage, *overrides):
    torch.manual_seed(0)
    cfg = tiny_env.config(stage, *overrides)
    model = build_model(cfg)
    set_trainable(model, cfg)
    return model


def other_llm(tiny_env, tmp_path):
    """A copy of the tiny Vicuna with slightly different weights (same config and tokenizer)."""
    folder = tmp_path / "vicuna_other"
    shutil.copytree(tiny_env.ckpt / "vicuna", folder)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("embed_tokens.weight"))
    state[name] = state[name] + 0.01
    save_file(state, str(weights), metadata={"format": "pt"})
    return folder


def test_digest_ignores_the_file_format_but_not_the_weights(tiny_env, tmp_path):
    from transformers import LlamaForCausalLM

    original = fingerprint.llm_fingerprint(tiny_env.ckpt / "vicuna")
    as_bin = tmp_path / "as_bin"
    shutil.copytree(tiny_env.ckpt / "vicuna", as_bin)
    (as_bin / "model.safetensors").unlink()
    model = LlamaForCausalLM.from_pretrained(str(tiny_env.ckpt / "vicuna"))
    torch.save(model.state_dict(), as_bin / "pytorch_model.bin")
    assert fingerprint.llm_fingerprint(as_bin)["digest"] == original["digest"]
    assert fingerprint.llm_fingerprint(other_llm(tiny_env, tmp_path))["digest"] != original["digest"]


def test_another_llm_is_refused_by_name(tiny_env, tmp_path):
    model = built(tiny_env, 2)
    out = tmp_path / "delta"
    checkpoint.save_delta(model, out, model.cfg, {"step": 1}, atomic=True)
    base = json.loads((out / checkpoint.META_FILE).read_text())["base"]
    assert base["llm"]["digest"] == fingerprint.llm_fingerprint(tiny_env.ckpt / "vicuna")["digest"]
    assert base["llm"]["hidden_size"] == 64 and base["imagebind"]["preset"] == "tiny"
    checkpoint.load_delta(built(tiny_env, 2), out, allow_missing=("input_proj",))     # the same base loads

    other = other_llm(tiny_env, tmp_path)
    with pytest.raises(fingerprint.BaseMismatchError) as caught:
        checkpoint.load_delta(built(tiny_env, 2, f"model.llm={other}"), out, allow_missing=("input_proj",))
    message = str(caught.value)
    assert "\n" not in message and "train.allow_other_base=true" in message
    assert re.search(r"trained on LLM \S*vicuna \(", message) and f"LLM {other} (" in message
    meta = checkpoint.load_delta(built(tiny_env, 2, f"model.llm={other}", "train.allow_other_base=true"), out,
                                 allow_missing=("input_proj",))
    assert "output_proj.image" in meta["loaded"]


def test_another_imagebind_is_refused_for_an_input_projection(tiny_env, tmp_path):
    model = built(tiny_env, 1)
    out = tmp_path / "delta"
    checkpoint.save_delta(model, out, model.cfg, {"step": 1}, atomic=True)
    swapped = tmp_path / "imagebind_other.pth"
    state = torch.load(tiny_env.imagebind, weights_only=True)
    key = next(iter(state))
    state[key] = state[key] + 1
    torch.save(state, swapped)
    with pytest.raises(fingerprint.BaseMismatchError, match=r"trained on ImageBind .* base is ImageBind .*"
                                                              r"imagebind_other.pth"):
        checkpoint.load_delta(built(tiny_env, 1, f"model.imagebind={swapped}"), out)


def test_adapter_has_a_model_card_and_loads_as_it_says(tiny_env, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = built(tiny_env, 3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    out = tmp_path / "stage_3"
    checkpoint.save_delta(model, out, model.cfg, {"step": 1}, atomic=True)
    card = (out / "adapter" / "README.md").read_text()
    assert "resize_token_embeddings(len(tokenizer))" in card and "PeftModel.from_pretrained" in card
    assert "delta.safetensors" in card and "stage 3" in card
    for path in (out / "adapter").iterdir():
        text = path.read_text(errors="ignore") if path.suffix in (".json", ".md") else ""
        assert str(tmp_path) not in text and "/work/" not in text and str(tiny_env.root) not in text, path.name
    # the card's recipe, step by step
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_env.ckpt / "vicuna"))
    base.resize_token_embeddings(len(tokenizer))
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter"))
    ours, theirs = llm_utils.lora_state_dict(model.llm), llm_utils.lora_state_dict(peft_model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_stale_run_names_a_run_made_on_another_base(tiny_env, tmp_path):
    """What the demo checks before skipping a finished stage (scripts/demo.py)."""
    model = built(tiny_env, 2)
    run = tmp_path / "stage_2"
    checkpoint.save_delta(model, run / "checkpoint-1", model.cfg, {"step": 1}, atomic=True)
    (run / "latest").write_text("checkpoint-1\n")
    assert fingerprint.stale_run(run, model.cfg) is None
    assert fingerprint.stale_run(tmp_path / "nothing", model.cfg) is None
    other = tiny_env.config(2, f"model.llm={other_llm(tiny_env, tmp_path)}")
    assert "trained on LLM" in fingerprint.stale_run(run, other)
    meta_path = run / "checkpoint-1" / checkpoint.META_FILE
    meta = json.loads(meta_path.read_text())
    del meta["base"]
    meta_path.write_text(json.dumps(meta))
    assert "records no base fingerprint" in fingerprint.stale_run(run, model.cfg)
