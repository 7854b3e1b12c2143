"""Delta checkpoints: exact contents, bit-exact round trip, strict loading, PEFT adapter, the original's layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nextgpt.checkpoint import delta as checkpoint
from nextgpt.checkpoint import legacy as legacy_lib
from nextgpt.data.types import Media, Sample, Target, Turn
from nextgpt.io import sha256_file
from nextgpt.model import llm as llm_utils
from nextgpt.model.nextgpt import build_model
from nextgpt.model.trainable import set_trainable

HIDDEN, NEW, VOCAB = 64, 38, 738          # tiny Llama: hidden 64, 700 sentencepiece pieces + 38 added tokens


def perturb(model, seed: int) -> None:
    """Move every trainable tensor away from its initial value (LoRA B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


def built(tiny_env, stage, *overrides, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_env.config(stage, *overrides)
    model = build_model(cfg)
    set_trainable(model, cfg)
    return model


def all_groups(model):
    return {"input_proj", "token_rows", "lora"} | {f"output_proj.{m}" for m in model.output_proj}


def batch_for(model):
    from nextgpt.data.conversation import encode

    s = Sample("t", "t.json", 0, [Turn("human", "What do you hear?"), Turn("gpt", "A tone.", "audio")],
               [Media("image", "/none.jpg", "none.jpg")], [Target("audio", "a.npy")])
    e = encode(s, model.tokenizer, model.token_ids, 128)
    return {"input_ids": torch.tensor([e.input_ids]), "labels": torch.tensor([e.labels]),
            "attention_mask": torch.ones(1, len(e.input_ids), dtype=torch.long),
            "media_positions": torch.tensor([[0, e.media_positions[0]]]), "media_features": torch.ones(1, 16),
            "media_paths": ["/none.jpg"], "media_modalities": ["image"],
            "caption_embeds": {"audio": torch.ones(1, 1, 16)}, "samples": [s],
            "signal_blocks": {m: torch.tensor([[0, start]]) for m, start in e.signal_blocks}}


@pytest.fixture(scope="module")
def stage_3_delta(tiny_env, tmp_path_factory):
    model = built(tiny_env, 3, seed=1)
    perturb(model, 1)
    out = tmp_path_factory.mktemp("delta") / "stage_3"
    checkpoint.save_delta(model, out, model.cfg, {"step": 7}, atomic=True)
    return model, out


def test_delta_holds_exactly_the_trained_tensors(stage_3_delta):
    model, out = stage_3_delta
    tensors = load_file(str(out / checkpoint.DELTA_FILE))
    projector_keys = {f"output_proj.{m}.{k}" for m, p in model.output_proj.items() for k in p.state_dict()}
    assert set(tensors) == {"input_proj.weight", "input_proj.bias", "token_rows.embed_tokens",
                            "token_rows.lm_head"} | projector_keys
    assert tensors["token_rows.embed_tokens"].shape == (NEW, HIDDEN)
    new_ids = torch.tensor(model.token_ids.new_token_ids)
    for name in llm_utils.TOKEN_MATRICES:
        assert torch.equal(tensors[f"token_rows.{name}"], llm_utils.effective_token_matrix(model.llm, name)[new_ids])
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {k for k in adapter if "lora_" in k} == set(llm_utils.lora_state_dict(model.llm))
    assert not any("base_layer" in k for k in adapter)            # no full embedding matrices in the adapter
    meta = json.loads((out / checkpoint.META_FILE).read_text())
    assert meta["stage"] == 3 and meta["step"] == 7 and meta["token_rows"] == "new"
    assert set(meta["groups"]) == all_groups(model) and {"torch", "transformers", "peft"} <= set(
        meta["versions"])
    assert {"delta.safetensors", "config.yaml", "adapter/adapter_model.safetensors",
            "adapter/adapter_config.json", "tokenizer_config.json"} <= set(meta["files"])
    assert "train:" in (out / "config.yaml").read_text()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]     # no temporary folder left


def test_save_load_round_trip_is_bit_exact(tiny_env, stage_3_delta):
    model, out = stage_3_delta
    fresh = built(tiny_env, 3, seed=2)
    batch = batch_for(model)
    assert not torch.equal(fresh(batch)["loss"], model(batch)["loss"])
    meta = checkpoint.load_delta(fresh, out)
    assert set(meta["loaded"]) == all_groups(model)
    saved, loaded = checkpoint.delta_state(model, all_groups(model)), checkpoint.delta_state(fresh, all_groups(fresh))
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    with torch.no_grad():
        a, b = model(batch), fresh(batch)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the tokenizer saved beside the delta gives the same ids
    from nextgpt.tokens import load_tokenizer

    assert load_tokenizer(out)[1] == model.token_ids


def test_adapter_loads_with_peft(tiny_env, stage_3_delta):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model, out = stage_3_delta
    base = LlamaForCausalLM.from_pretrained(str(tiny_env.ckpt / "vicuna"))
    base.resize_token_embeddings(VOCAB)
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter"))
    ours = llm_utils.lora_state_dict(model.llm)
    theirs = llm_utils.lora_state_dict(peft_model)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    new_ids = torch.tensor(model.token_ids.new_token_ids)
    torch.testing.assert_close(llm_utils.effective_token_matrix(peft_model, "embed_tokens")[new_ids],
                               llm_utils.effective_token_matrix(model.llm, "embed_tokens")[new_ids])


def _rewrite(folder, tensors):
    """Replace delta.safetensors and keep meta.json's sha256 consistent, so only the key check can object."""
    save_file(tensors, str(folder / checkpoint.DELTA_FILE))
    meta = json.loads((folder / checkpoint.META_FILE).read_text())
    meta["files"]["delta.safetensors"] = sha256_file(folder / checkpoint.DELTA_FILE)
    (folder / checkpoint.META_FILE).write_text(json.dumps(meta))


def test_stage_3_delta_with_a_missing_key_fails_loudly(tiny_env, stage_3_delta, tmp_path):
    import shutil

    model, out = stage_3_delta
    fresh = built(tiny_env, 3, seed=3)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    tensors = load_file(str(broken / checkpoint.DELTA_FILE))
    del tensors["output_proj.video.model.weight"]
    _rewrite(broken, tensors)
    with pytest.raises(ValueError, match=r"missing key.*output_proj\.video\.model\.weight"):
        checkpoint.load_delta(fresh, broken)
    # a whole group missing is an error too, unless the caller says that group is about to be trained
    del tensors["output_proj.video.model.bias"]
    for key in [k for k in tensors if k.startswith("output_proj.video.")]:
        del tensors[key]
    _rewrite(broken, tensors)
    with pytest.raises(ValueError, match=r"missing key.*output_proj\.video\."):
        checkpoint.load_delta(fresh, broken)
    assert "output_proj.video" not in checkpoint.load_delta(fresh, broken, allow_missing=("output_proj",))["loaded"]
    # LoRA adapter gone
    shutil.rmtree(broken / "adapter")
    meta = json.loads((broken / checkpoint.META_FILE).read_text())
    meta["files"] = {k: v for k, v in meta["files"].items() if not k.startswith("adapter/")}
    (broken / checkpoint.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"missing key.*lora\.base_model"):
        checkpoint.load_delta(fresh, broken, allow_missing=("output_proj",))
    # unexpected key
    tensors["output_proj.smell.fc.weight"] = torch.zeros(1)
    _rewrite(broken, tensors)
    with pytest.raises(ValueError, match=r"unexpected key.*output_proj\.smell\.fc\.weight"):
        checkpoint.load_delta(fresh, broken, allow_missing=("output_proj", "lora"))


def test_corrupt_file_is_detected(tiny_env, stage_3_delta, tmp_path):
    import shutil

    _, out = stage_3_delta
    broken = tmp_path / "corrupt"
    shutil.copytree(out, broken)
    data = bytearray((broken / checkpoint.DELTA_FILE).read_bytes())
    data[-1] ^= 0xFF
    (broken / checkpoint.DELTA_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        checkpoint.load_delta(built(tiny_env, 3), broken)


def test_stage_chain_latest_and_init_from(tiny_env, tmp_path):
    stage_1 = built(tiny_env, 1, seed=4)
    perturb(stage_1, 4)
    run = tmp_path / "run_1"
    checkpoint.save_delta(stage_1, run / "step_3", stage_1.cfg, {"step": 3})
    (run / "latest").write_text("step_3\n")
    assert checkpoint.resolve_checkpoint(run) == run / "step_3"
    stage_1_keys = set(load_file(str(run / "step_3" / checkpoint.DELTA_FILE)))
    assert not any(k.startswith("output_proj.") for k in stage_1_keys)     # stage 1 never trained them

    stage_2 = built(tiny_env, 2, f"train.init_from={run}", seed=5)
    with pytest.raises(ValueError, match=r"missing key.*output_proj"):
        checkpoint.load_delta(stage_2, run)                                 # strict by default
    assert checkpoint.init_from(stage_2) == {"input_proj", "token_rows"}   # stage 2 trains output_proj
    assert torch.equal(stage_2.input_proj.weight, stage_1.input_proj.weight)
    for name in llm_utils.TOKEN_MATRICES:
        assert torch.equal(llm_utils.effective_token_matrix(stage_2.llm, name),
                           llm_utils.effective_token_matrix(stage_1.llm, name))
    checkpoint.save_delta(stage_2, tmp_path / "stage_2", stage_2.cfg, {})
    keys = set(load_file(str(tmp_path / "stage_2" / checkpoint.DELTA_FILE)))
    assert "input_proj.weight" in keys and "output_proj.audio.query_embs" in keys   # carried + trained

    with pytest.raises(FileNotFoundError, match="latest"):
        (run / "latest").write_text("step_9\n")
        checkpoint.resolve_checkpoint(run)


def test_token_rows_all_round_trip(tiny_env, tmp_path):
    model = built(tiny_env, 1, "train.token_rows=all", seed=6)
    perturb(model, 6)
    checkpoint.save_delta(model, tmp_path / "all", model.cfg, {})
    tensors = load_file(str(tmp_path / "all" / checkpoint.DELTA_FILE))
    assert tensors["token_rows.embed_tokens"].shape == (VOCAB, HIDDEN)
    fresh = built(tiny_env, 1, "train.token_rows=all", seed=7)
    checkpoint.load_delta(fresh, tmp_path / "all", allow_missing=("output_proj",))
    for name in llm_utils.TOKEN_MATRICES:
        assert torch.equal(llm_utils.base_token_weight(fresh.llm, name), llm_utils.base_token_weight(model.llm, name))


# ----------------------------------------------------------------------------------------------------------------
# The original pytorch_model.pt layout (reference §1.6, §3.3), written out here from the reference's names

def text_fc_layer(prefix, in_dim, out_dim, tokens, d, ff, encoder_layers, decoder_layers):
    shapes = {"query_embs": (1, tokens, d), "fc.weight": (d, in_dim), "fc.bias": (d,),
              "model.weight": (out_dim, d), "model.bias": (out_dim,)}

    def attention(name):
        return {f"{name}.in_proj_weight": (3 * d, d), f"{name}.in_proj_bias": (3 * d,),
                f"{name}.out_proj.weight": (d, d), f"{name}.out_proj.bias": (d,)}

    def feed_forward_and_norms(norms):
        out = {"linear1.weight": (ff, d), "linear1.bias": (ff,), "linear2.weight": (d, ff), "linear2.bias": (d,)}
        for i in range(1, norms + 1):
            out |= {f"norm{i}.weight": (d,), f"norm{i}.bias": (d,)}
        return out

    for i in range(encoder_layers):
        layer = {**attention("self_attn"), **feed_forward_and_norms(2)}
        shapes |= {f"tfm.encoder.layers.{i}.{k}": v for k, v in layer.items()}
    for i in range(decoder_layers):
        layer = {**attention("self_attn"), **attention("multihead_attn"), **feed_forward_and_norms(3)}
        shapes |= {f"tfm.decoder.layers.{i}.{k}": v for k, v in layer.items()}
    for stack in ("encoder", "decoder"):
        shapes |= {f"tfm.{stack}.norm.weight": (d,), f"tfm.{stack}.norm.bias": (d,)}
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def legacy_checkpoint(model, lora: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = model.cfg.model.output_proj
    shapes = {"llama_proj.weight": (HIDDEN, 16), "llama_proj.bias": (HIDDEN,)}
    for prefix, modality in (("gen_text_hidden_fcs.0", "image"), ("gen_text_hidden_fcs_video.0", "video"),
                             ("gen_text_hidden_fcs_audio.0", "audio")):
        tokens, out_dim = model.conditioning_shapes[modality]
        shapes |= text_fc_layer(prefix, HIDDEN, out_dim, tokens, cfg.d_model, cfg.dim_feedforward,
                                cfg.num_encoder_layers, cfg.num_decoder_layers)
    if lora:
        shapes |= {"llama_model.base_model.model.model.embed_tokens.weight": (VOCAB, HIDDEN),
                   "llama_model.base_model.model.lm_head.weight": (VOCAB, HIDDEN)}
        r = model.cfg.model.lora.r
        for i in range(2):
            for projection in "qkvo":
                name = f"llama_model.base_model.model.model.layers.{i}.self_attn.{projection}_proj"
                shapes |= {f"{name}.lora_A.default.weight": (r, HIDDEN), f"{name}.lora_B.default.weight": (HIDDEN, r)}
    else:
        shapes |= {"llama_model.model.embed_tokens.weight": (VOCAB, HIDDEN), "llama_model.lm_head.weight": (VOCAB, HIDDEN)}
    generator = torch.Generator().manual_seed(seed)
    # fp16 parameters, as the original's DeepSpeed fp16 run saved them
    return {k: torch.nn.Parameter(torch.randn(v, generator=generator).half(), requires_grad=False)
            for k, v in shapes.items()}


def test_legacy_stage_3_imports_strictly_and_exports_the_same_keys(tiny_env, tmp_path):
    model = built(tiny_env, 3, seed=8)
    legacy = legacy_checkpoint(model, lora=True)
    path = tmp_path / "pytorch_model.pt"
    torch.save(legacy, path)
    groups = checkpoint.load_checkpoint(model, path)
    assert groups == all_groups(model)
    assert torch.equal(model.input_proj.weight, legacy["llama_proj.weight"].float())
    assert torch.equal(model.output_proj["video"].tfm.decoder.layers[0].multihead_attn.in_proj_weight,
                       legacy["gen_text_hidden_fcs_video.0.tfm.decoder.layers.0.multihead_attn.in_proj_weight"].float())
    assert torch.equal(llm_utils.effective_token_matrix(model.llm, "lm_head"),
                       legacy["llama_model.base_model.model.lm_head.weight"].float())
    lora_a = legacy["llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight"]
    assert torch.equal(model.causal_lm.model.layers[1].self_attn.v_proj.lora_A["default"].weight, lora_a.float())
    exported = legacy_lib.export_legacy(model, tmp_path / "export")
    back = torch.load(exported, map_location="cpu", weights_only=True)
    assert list(back) and set(back) == set(legacy)
    for key in legacy:
        assert back[key].dtype == torch.float16 and torch.equal(back[key], legacy[key].data), key
    # a whole matrix was loaded, so the delta now carries whole matrices and reloads bit-exactly
    checkpoint.save_delta(model, tmp_path / "delta", model.cfg, {})
    assert load_file(str(tmp_path / "delta" / checkpoint.DELTA_FILE))["token_rows.lm_head"].shape == (VOCAB, HIDDEN)
    fresh = built(tiny_env, 3, seed=9)
    checkpoint.load_delta(fresh, tmp_path / "delta")
    for name in llm_utils.TOKEN_MATRICES:
        assert torch.equal(llm_utils.effective_token_matrix(fresh.llm, name),
                           llm_utils.effective_token_matrix(model.llm, name))


def test_legacy_stage_1_2_layout(tiny_env, tmp_path):
    model = built(tiny_env, 2, seed=10)
    legacy = legacy_checkpoint(model, lora=False, seed=1)
    assert legacy_lib.import_legacy(model, legacy) == all_groups(model) - {"lora"}
    assert torch.equal(llm_utils.effective_token_matrix(model.llm, "embed_tokens"),
                       legacy["llama_model.model.embed_tokens.weight"].float())
    back = legacy_lib.legacy_state(model)
    assert set(back) == set(legacy)
    assert all(torch.equal(back[k], legacy[k].data) for k in legacy)


def test_legacy_errors_list_the_keys(tiny_env):
    stage_3 = built(tiny_env, 3, seed=11)
    legacy = legacy_checkpoint(stage_3, lora=True)
    with pytest.raises(ValueError, match=r"outside the NExT-GPT layout: visual_encoder\.trunk\.x"):
        legacy_lib.import_legacy(stage_3, {**legacy, "visual_encoder.trunk.x": torch.zeros(1)})
    missing = {k: v for k, v in legacy.items() if k != "gen_text_hidden_fcs_audio.0.query_embs"}
    with pytest.raises(ValueError, match=r"missing key.*output_proj\.audio\.query_embs"):
        legacy_lib.import_legacy(stage_3, missing)
    stage_2 = built(tiny_env, 2, seed=12)          # no LoRA: the stage-3 LoRA keys have no place
    with pytest.raises(ValueError, match=r"unexpected key.*lora\.base_model\.model\.model\.layers\.0"):
        legacy_lib.import_legacy(stage_2, legacy)
    both = {**legacy, "llama_model.model.embed_tokens.weight": legacy[
        "llama_model.base_model.model.model.embed_tokens.weight"]}
    with pytest.raises(ValueError, match="several keys map onto token_rows.embed_tokens"):
        legacy_lib.import_legacy(stage_3, both)


def _drop_hashes(folder):
    """meta.json without sha256s, so the load reaches the file itself (a hand-made or damaged folder)."""
    meta = json.loads((folder / checkpoint.META_FILE).read_text())
    meta.pop("files", None)
    (folder / checkpoint.META_FILE).write_text(json.dumps(meta))


def test_unreadable_files_are_one_line_errors_naming_the_file(tiny_env, stage_3_delta, tmp_path):
    import shutil

    _, out = stage_3_delta
    fresh = built(tiny_env, 3, seed=5)
    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00{\"bad\": json" + b"\0" * 64   # header length + broken JSON
    for name in (checkpoint.DELTA_FILE, f"{checkpoint.ADAPTER_DIR}/adapter_model.safetensors"):
        broken = tmp_path / name.replace("/", "_")
        shutil.copytree(out, broken)
        _drop_hashes(broken)
        (broken / name).write_bytes(garbage)
        with pytest.raises(ValueError) as caught:
            checkpoint.load_delta(fresh, broken)
        message = str(caught.value)
        assert message.startswith(f"{broken / name}: unreadable safetensors file (") and "\n" not in message
    # the adapter's JSON
    broken = tmp_path / "adapter_config"
    shutil.copytree(out, broken)
    _drop_hashes(broken)
    (broken / checkpoint.ADAPTER_DIR / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json: not valid JSON \("):
        checkpoint.load_delta(fresh, broken)
    # an original pytorch_model.pt: random bytes (unpickling error), a cut zip, a cut legacy pickle
    for name, data in (("random.pt", b"garbage" * 20), ("cut.pt", b"PK\x03\x04" + b"x" * 100),
                       ("short.pt", b"\x80\x02}q\x00")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError) as caught:
            checkpoint.load_checkpoint(fresh, path)
        message = str(caught.value)
        assert message.startswith(f"{path}: not a readable torch checkpoint") and "\n" not in message
