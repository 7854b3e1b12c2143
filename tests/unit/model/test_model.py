"""NextGPT on the tiny checkpoints: losses per stage, trainable sets, soft tokens, projector modes, 8-bit.
(Generating what it was overfitted on: tests/e2e/test_generate_overfit.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batches import make_batch, sample
from nextgpt.data.conversation import signal_blocks
from nextgpt.data.types import Media, Target, Turn
from nextgpt.model import llm as llm_utils
from nextgpt.model.nextgpt import build_model
from nextgpt.model.trainable import set_trainable
from nextgpt.modalities import MODALITIES

HIDDEN, VOCAB_BASE, NEW = 64, 700, 38            # scripts/tiny/make_tiny_ckpt.py: hidden 64, sentencepiece vocab 700


STAGE_SAMPLES = {
    1: lambda: [sample([Turn("human", ""), Turn("gpt", "a red circle on a black background")],
                       [Media("image", "/none/1.jpg", "1.jpg")]),
                sample([Turn("human", ""), Turn("gpt", "a low steady tone")], [Media("audio", "/none/2.wav", "2.wav")],
                       index=1)],
    2: lambda: [sample([Turn("human", c), Turn("gpt", c, m)], targets=[Target(m, "unused.npy")], index=i)
                for i, (c, m) in enumerate([("a red circle", "image"), ("a blue square moving left", "video"),
                                            ("a high beeping tone", "audio")])],
    3: lambda: [sample([Turn("human", "What do you hear?"), Turn("gpt", "A tone. Here is a sound:", "audio")],
                       [Media("audio", "/none/2.wav", "2.wav")], [Target("audio", "a.npy")]),
                sample([Turn("human", "Show me a picture of a red circle"), Turn("gpt", "Sure thing!", "image"),
                        Turn("human", "And a video?"), Turn("gpt", "Here is a video.", "video")],
                       targets=[Target("image", "i.npy"), Target("video", "v.npy")], index=1),
                sample([Turn("human", "Tell me a joke."), Turn("gpt", "Hello, how are you?")], index=2)],
}
EXPECTED_TERMS = {1: set(), 2: {"image", "video", "audio"}, 3: {"image", "video", "audio"}}
TRAINED = {1: {"input_proj", "token_rows"}, 2: {"output_proj", "token_rows"},
           3: {"lora", "input_proj", "output_proj", "token_rows"}}


@pytest.fixture(scope="module")
def stage_models(tiny_env):
    models = {}
    for stage in (1, 2, 3):
        torch.manual_seed(stage)
        cfg = tiny_env.config(stage)
        model = build_model(cfg)
        models[stage] = (model, set_trainable(model, cfg))
    return models


def group_of(name: str) -> str:
    if name.startswith("input_proj."):
        return "input_proj"
    if name.startswith("output_proj."):
        return "output_proj"
    if "lora_" in name:
        return "lora"
    if "trainable_tokens_delta" in name:
        return "token_rows"
    return "other"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_forward_terms_weights_and_gradients(stage_models, stage):
    model, _ = stage_models[stage]
    model.zero_grad(set_to_none=True)
    batch = make_batch(model, STAGE_SAMPLES[stage]())
    out = model(batch)
    assert set(out) == {"loss", "lm", "token_acc"} | EXPECTED_TERMS[stage]
    assert all(torch.isfinite(v).all() for v in out.values())
    weights = model.cfg.train.loss_weights
    expected = sum(weights[k] * out[k] for k in ["lm", *EXPECTED_TERMS[stage]])
    torch.testing.assert_close(out["loss"], expected)
    if stage == 3:
        assert weights["video"] == 2.0
    out["loss"].backward()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert parameter.grad is None, name
    got = {group_of(n) for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # LoRA B starts at zero, so only lora_B gets a gradient on the first step; the group still shows up
    assert got == TRAINED[stage]


def gradient_order(model, batch):
    """(loss, names of the trainable parameters in the order backward completes their gradients, {name: grad})."""
    model.zero_grad(set_to_none=True)
    order, handles = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            handles.append(parameter.register_post_accumulate_grad_hook(lambda p, name=name: order.append(name)))
    try:
        loss = model(batch)["loss"]
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return loss.detach(), order, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# micro-batches that use different modules: (stage, which of STAGE_SAMPLES[stage]) -> one batch each
DIFFERENT_BATCHES = {2: [[0], [1], [2], [0, 2]],              # image / video / audio / image + audio out
                     3: [[0], [1], [2], [0, 1, 2]]}           # audio in+out / image+video out / text only / all


@pytest.mark.parametrize("stage", [2, 3])
def test_every_trainable_parameter_takes_part_in_one_order(stage_models, stage, monkeypatch):
    """Any batch on any rank (NextGPT.unused_here), with another rank's micro-batch using every module: whatever
    this micro-batch holds, every trainable parameter gets a gradient, in the same order (DeepSpeed's ZeRO-2
    buckets follow that order, and the ranks' buckets must agree), and the loss and the used parameters' gradients
    are bit-identical to a forward that runs only what the batch uses; the rest get exact zeros."""
    from nextgpt import runtime
    from nextgpt.model import nextgpt

    monkeypatch.setattr(runtime, "any_rank_each", lambda flags, device: [True] * len(flags))
    model, _ = stage_models[stage]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    orders = []
    for rows in DIFFERENT_BATCHES[stage]:
        batch = make_batch(model, [STAGE_SAMPLES[stage]()[i] for i in rows])
        loss, order, grads = gradient_order(model, batch)
        assert sorted(order) == sorted(trainable), rows      # each exactly once
        orders.append(order)
        with monkeypatch.context() as patch:
            patch.setattr(nextgpt, "takes_part", lambda module: False)
            bare_loss, _, bare_grads = gradient_order(model, batch)
        assert torch.equal(loss, bare_loss)
        for name in trainable:
            if name in bare_grads:
                assert torch.equal(grads[name], bare_grads[name]), name
            else:
                assert not grads[name].any(), name
        assert set(bare_grads) != trainable or rows == DIFFERENT_BATCHES[stage][-1]   # the batch leaves some out
    assert all(order == orders[0] for order in orders)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_trainable_sets_per_stage(stage_models, stage):
    model, counts = stage_models[stage]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {group_of(n) for n in trainable} == TRAINED[stage]
    token_params = sorted(n for n in trainable if group_of(n) == "token_rows")
    assert len(token_params) == 2 and any("embed_tokens" in n for n in token_params) and \
        any("lm_head" in n for n in token_params)
    assert counts["token_rows"] == 2 * NEW * HIDDEN
    assert counts["input_proj"] == (16 * HIDDEN + HIDDEN if stage != 2 else 0)
    lora = 2 * 4 * (4 * HIDDEN + HIDDEN * 4)            # 2 layers x q/k/v/o x (A r x D + B D x r), r = 4
    assert counts["lora"] == (lora if stage == 3 else 0)
    for modality in MODALITIES:
        n = sum(p.numel() for p in model.output_proj[modality].parameters())
        assert counts[f"output_proj.{modality}"] == (n if stage != 1 else 0)
    assert counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("rows", ["all", "none"])
def test_token_rows_all_and_none(tiny_env, rows):
    cfg = tiny_env.config(1, f"train.token_rows={rows}")
    model = build_model(cfg)
    counts = set_trainable(model, cfg)
    vocab = VOCAB_BASE + NEW
    assert counts["token_rows"] == (2 * vocab * HIDDEN if rows == "all" else 0)
    assert not llm_utils.is_peft(model.llm)
    embed = llm_utils.base_token_weight(model.llm, "embed_tokens")
    assert embed.shape == (vocab, HIDDEN) and embed.requires_grad == (rows == "all")
    out = model(make_batch(model, STAGE_SAMPLES[1]()))
    assert torch.isfinite(out["loss"])


def test_only_the_new_rows_change(stage_models):
    model, _ = stage_models[1]
    before = {n: llm_utils.effective_token_matrix(model.llm, n).detach().clone() for n in llm_utils.TOKEN_MATRICES}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    batch = make_batch(model, STAGE_SAMPLES[1]())
    optimizer.zero_grad()
    model(batch)["loss"].backward()
    optimizer.step()
    new = torch.tensor(model.token_ids.new_token_ids)
    old = torch.ones(VOCAB_BASE + NEW, dtype=torch.bool)
    old[new] = False
    for name in llm_utils.TOKEN_MATRICES:
        after = llm_utils.effective_token_matrix(model.llm, name).detach()
        assert torch.equal(after[old], before[name][old]), name
        assert not torch.equal(after[new], before[name][new]), name


def test_loss_definitions(stage_models):
    model, _ = stage_models[2]
    batch = make_batch(model, STAGE_SAMPLES[2]())
    with torch.no_grad():
        out = model(batch)
        embeds, token_embeds = model.embed(batch["input_ids"])
        result = model.causal_lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                 output_hidden_states=True)
        hidden = result.hidden_states[-1]
        # next-token accuracy over supervised targets, no +1 in the denominator
        targets = batch["labels"][:, 1:]
        valid = targets != -100
        accuracy = ((result.logits[:, :-1].argmax(-1) == targets) & valid).sum() / valid.sum()
        torch.testing.assert_close(out["token_acc"], accuracy.float())
        torch.testing.assert_close(out["lm"], F.cross_entropy(result.logits[:, :-1].flatten(0, 1), targets.flatten()))
        for modality in ("image", "video", "audio"):
            starts = [(r, s) for r in range(3) for m, s in signal_blocks(batch["labels"][r].tolist(), model.token_ids)
                      if m == modality]
            n = MODALITIES[modality].num_signal_tokens
            h = torch.stack([hidden[r, s:s + n] for r, s in starts])
            e = torch.stack([token_embeds[r, s:s + n] for r, s in starts])
            prediction = model.output_proj[modality](h, e)
            assert prediction.shape[1:] == model.conditioning_shapes[modality]
            target = batch["caption_embeds"][modality]
            l2 = (prediction - target).pow(2).sum(-1).sqrt().mean()          # the original's l2_loss(...).mean()
            torch.testing.assert_close(out[modality], l2, rtol=1e-5, atol=1e-5)
        model.losses.alignment = "mse"
        try:
            mse = model(batch)
        finally:
            model.losses.alignment = "l2"
        torch.testing.assert_close(mse["audio"], F.mse_loss(prediction, target))


def test_soft_token_is_the_projected_feature(stage_models):
    model, _ = stage_models[1]
    batch = make_batch(model, STAGE_SAMPLES[1]())
    with torch.no_grad():
        embeds, token_embeds = model.embed(batch["input_ids"], batch["media_positions"], batch["media_features"])
        for (row, position), feature in zip(batch["media_positions"].tolist(), batch["media_features"]):
            torch.testing.assert_close(embeds[row, position], model.input_proj(feature))
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool)
        mask[batch["media_positions"][:, 0], batch["media_positions"][:, 1]] = False
        assert torch.equal(embeds[mask], token_embeds[mask])
        other = dict(batch, media_features=batch["media_features"] + 1.0)
        assert model(other)["lm"] != model(batch)["lm"]


def test_live_imagebind_matches_cached_features(stage_models, tiny_env):
    from nextgpt.imagebind.encode import Encoder, LazyEncoder

    model, _ = stage_models[1]
    image = next((tiny_env.data / "T_X_pair_data" / "cc3m" / "images").glob("*.jpg"))
    audio = next((tiny_env.data / "T_X_pair_data" / "audiocap" / "audios").glob("*.wav"))
    samples = STAGE_SAMPLES[1]()
    samples[0].media = [Media("image", str(image), image.name)]
    samples[1].media = [Media("audio", str(audio), audio.name)]
    model.media_encoder = LazyEncoder(tiny_env.imagebind, "tiny")     # what build_model gives, at the tiny file
    batch = make_batch(model, samples)
    encoder = Encoder(tiny_env.imagebind, "tiny")
    cached = torch.cat([encoder.encode([str(image)], "image"), encoder.encode([str(audio)], "audio")])
    with torch.no_grad():
        live = model(dict(batch, media_features=None))
        from_cache = model(dict(batch, media_features=cached))
    torch.testing.assert_close(live["lm"], from_cache["lm"])
    assert model.media_encoder.encoder is not None and "media_encoder" not in dict(model.named_children())


def test_broken_signal_block_in_labels_names_the_sample(stage_models):
    model, _ = stage_models[2]
    batch = make_batch(model, STAGE_SAMPLES[2]())
    row = 1
    start = signal_blocks(batch["labels"][row].tolist(), model.token_ids)[0][1]
    batch["labels"][row, start + 2] = -100
    with pytest.raises(ValueError, match=r"test\.json record 1"):
        model(batch)


@pytest.mark.parametrize("mode", ["linear", "qformer"])
def test_other_projector_modes(tiny_env, mode):
    from nextgpt import runtime

    cfg = tiny_env.config(2, f"model.output_proj.mode={mode}")
    model = build_model(cfg)
    set_trainable(model, cfg)
    out = model(make_batch(model, STAGE_SAMPLES[2]()))
    assert set(out) == {"loss", "lm", "token_acc", "image", "video", "audio"}
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.output_proj["image"].parameters())
    model.zero_grad(set_to_none=True)        # an image-only batch beside a rank that uses every projector:
    with pytest.MonkeyPatch.context() as patch:      # the others run on a zero block (qformer) / nothing
        patch.setattr(runtime, "any_rank_each", lambda flags, device: [True] * len(flags))
        model(make_batch(model, STAGE_SAMPLES[2]()[:1]))["loss"].backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.output_proj["video"].parameters())


def test_quantized_8bit_llm(tiny_env):
    import bitsandbytes as bnb

    cfg = tiny_env.config("fine_tuning")
    assert cfg.model.quantization == "8bit"
    model = build_model(cfg)
    counts = set_trainable(model, cfg)
    assert counts["lora"] > 0 and counts["token_rows"] == 2 * NEW * HIDDEN
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.causal_lm.modules())
    out = model(make_batch(model, STAGE_SAMPLES[3]()))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_load_llm_from_sharded_bin(tiny_env, tmp_path):
    """Vicuna v0 ships as pytorch_model-0000N-of-00002.bin + index; load_llm reads it like safetensors."""
    import json
    import shutil

    from transformers import LlamaForCausalLM

    source = LlamaForCausalLM.from_pretrained(str(tiny_env.ckpt / "vicuna"))
    state = source.state_dict()
    keys = list(state)
    weight_map = {}
    for index, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:]), start=1):
        name = f"pytorch_model-0000{index}-of-00002.bin"
        torch.save({k: state[k] for k in part}, tmp_path / name)
        weight_map |= {k: name for k in part}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(tiny_env.ckpt / "vicuna" / "config.json", tmp_path)
    loaded = llm_utils.load_llm(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert all(torch.equal(state[k].bfloat16(), v) for k, v in loaded.state_dict().items())
    with pytest.raises(FileNotFoundError, match="config.json"):
        llm_utils.load_llm(tmp_path / "nowhere")


def test_forward_takes_its_loss_settings_at_construction():
    """Loss weights, the alignment kind and the suffix-backward choice are NextGPT.losses (build_model takes them from
    train.* and the device decision); forward reads no config and picks no maths path by the tensors' device."""
    import inspect

    from nextgpt.model.nextgpt import NextGPT

    for method in (NextGPT.forward, NextGPT._split):
        source = inspect.getsource(method)
        assert "cfg" not in source and "is_cuda" not in source, method.__name__
