"""scripts/prepare_vicuna.py: LLaMA + Vicuna delta without FastChat, on tiny random base and delta folders laid out
like the real ones (two pytorch_model-0000N-of-00002.bin shards + index; the delta has one more vocabulary row)."""

from __future__ import annotations

import json

import pytest
import torch

import prepare_vicuna


def _write_model(folder, vocab: int, seed: int, safetensors: bool = False) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    state = {k: v.to(torch.float32).clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    folder.mkdir(parents=True)
    config.to_json_file(folder / "config.json")
    names = sorted(state)
    halves = (names[: len(names) // 2], names[len(names) // 2:])
    ext = "safetensors" if safetensors else "bin"
    stem = "model" if safetensors else "pytorch_model"
    weight_map = {}
    for i, part in enumerate(halves, 1):
        shard = f"{stem}-{i:05d}-of-00002.{ext}"
        if safetensors:
            from safetensors.torch import save_file

            save_file({k: state[k].contiguous() for k in part}, str(folder / shard))
        else:
            torch.save({k: state[k] for k in part}, folder / shard)
        weight_map.update({k: shard for k in part})
    (folder / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


def _fastchat(base: dict, delta: dict) -> dict:
    """FastChat apply_delta on CPU: both loaded as float16, base added in place (top-left block for the grown
    embedding / lm_head)."""
    out = {}
    for name, value in delta.items():
        param, b = value.to(torch.float16).clone(), base[name].to(torch.float16)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            param[:b.shape[0], :b.shape[1]] += b
        else:
            param += b
        out[name] = param
    return out


@pytest.mark.parametrize("safetensors", [False, True])
def test_apply_delta_equals_fastchat(tmp_path, safetensors):
    base = _write_model(tmp_path / "llama", 32, seed=0, safetensors=safetensors)
    delta = _write_model(tmp_path / "delta", 33, seed=1, safetensors=safetensors)
    (tmp_path / "delta" / "tokenizer_config.json").write_text('{"pad_token": "[PAD]"}')
    out = tmp_path / "vicuna"
    assert prepare_vicuna.main(["--base", str(tmp_path / "llama"), "--delta", str(tmp_path / "delta"),
                                "--out", str(out)]) == 0
    ext = "safetensors" if safetensors else "bin"
    stem = "model" if safetensors else "pytorch_model"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "config.json", "tokenizer_config.json", f"{stem}.{ext}.index.json",
        f"{stem}-00001-of-00002.{ext}", f"{stem}-00002-of-00002.{ext}"])
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float16)
    expected = _fastchat(base, delta)
    got = model.state_dict()
    assert got["model.embed_tokens.weight"].shape == (33, 16)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    # the added pad row is the delta's own
    assert torch.equal(got["lm_head.weight"][32], delta["lm_head.weight"][32].half())


def test_bad_inputs_are_one_line(tmp_path, capsys):
    _write_model(tmp_path / "llama", 32, seed=0)
    args = ["--base", str(tmp_path / "llama"), "--out", str(tmp_path / "out")]
    assert prepare_vicuna.main(args + ["--delta", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: --delta folder not found")
    delta = _write_model(tmp_path / "small", 32, seed=1)
    state = torch.load(tmp_path / "small" / "pytorch_model-00001-of-00002.bin")
    name = sorted(state)[0]
    state[name] = state[name][..., :-1].clone()                  # a tensor of the wrong shape
    torch.save(state, tmp_path / "small" / "pytorch_model-00001-of-00002.bin")
    assert prepare_vicuna.main(args + ["--delta", str(tmp_path / "small")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shape mismatch" in err and name in err and delta
    assert not (tmp_path / "out").exists()                       # nothing half-written


def test_check_ckpt_hints_use_the_pinned_hub_cli():
    """`make check-ckpt` hints: huggingface-hub 2.x's `hf download` (its `huggingface-cli` is gone), Vicuna via
    prepare_vicuna.py; every option a hint uses is one the installed `hf download` knows."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import check_ckpt

    hints = " ".join(check_ckpt.SOURCES.values())
    assert "huggingface-cli" not in hints and "fastchat.model" not in hints.lower()
    assert "scripts/prepare_vicuna.py" in check_ckpt.SOURCES["llm"] and "hf download" in check_ckpt.SOURCES["llm"]
    hf = shutil.which("hf", path=str(Path(sys.executable).parent)) or shutil.which("hf")
    if hf is None:
        pytest.skip("the hf command of huggingface-hub is not installed")
    usage = subprocess.run([hf, "download", "--help"], capture_output=True, text=True, timeout=60).stdout
    for hint in check_ckpt.SOURCES.values():
        for command in hint.split("hf download ")[1:]:
            command = command.split("&&")[0].split("(")[0]
            for option in (w for w in command.split() if w.startswith("--")):
                assert option in usage, (option, hint)
