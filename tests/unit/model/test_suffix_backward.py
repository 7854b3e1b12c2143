"""Suffix backward (train.suffix_backward) == one full autograd pass: loss, every term, accuracy and every
trainable gradient within 1e-5 (fp32, CPU), on padded mixed-modality batches whose rows split at different places."""

from __future__ import annotations

import pytest
import torch

from nextgpt.data.types import Media, Target, Turn
from nextgpt.model import suffix
from nextgpt.model.nextgpt import build_model
from nextgpt.model.trainable import set_trainable
from batches import make_batch, sample

CAPTIONS = [("a red circle", "image"), ("a blue square moving left on a white background", "video"),
            ("a high beeping tone", "audio"), ("two green triangles", "image"), ("a low hum", "audio")]


def stage_2_samples():
    return [sample([Turn("human", c), Turn("gpt", c, m)], targets=[Target(m, "unused.npy")], index=i)
            for i, (c, m) in enumerate(CAPTIONS)]


def stage_1_samples():
    return [sample([Turn("human", ""), Turn("gpt", c)], [Media(m, f"/none/{i}", f"{i}")], index=i)
            for i, (c, m) in enumerate(CAPTIONS)]


def both_paths(model, batch):
    """-> [(outputs, {name: grad})] for suffix_backward on, then off."""
    results = []
    for on in (True, False):
        model.losses.suffix_backward = on
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append(({k: v.detach() for k, v in out.items()}, grads))
    return results


def perturb_token_rows(model, seed):
    """Non-zero PEFT rows, so the signal tokens' inputs differ from the base rows as after some training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("stage,samples", [(2, stage_2_samples), (1, stage_1_samples)])
def test_suffix_backward_equals_full_autograd(tiny_env, stage, samples):
    torch.manual_seed(stage)
    cfg = tiny_env.config(stage, "train.suffix_backward=true")    # stage 1 runs without it by default (slower)
    model = build_model(cfg)
    set_trainable(model, cfg)
    perturb_token_rows(model, stage)
    batch = make_batch(model, samples(), seed=stage)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 1                                           # padded rows
    split = model._split(batch["input_ids"], batch["attention_mask"], batch["media_positions"],
                         {m: [tuple(b) for b in v.tolist()] for m, v in batch["signal_blocks"].items()})
    assert split is not None and all(0 < s < n for s, n in zip(split, lengths))
    if stage == 1:   # the split is <Img>: "<s>### Human:" runs without gradients
        assert all(batch["input_ids"][r, s] == model.token_ids.media_start for r, s in enumerate(split))
    if stage == 2:   # the split is the first signal token: prefix = everything before the block, per row
        starts = {r: s for v in batch["signal_blocks"].values() for r, s in v.tolist()}
        assert split == [starts[r] for r in range(len(split))] and len(set(split)) > 1
        assert set(batch["signal_blocks"]) == {"image", "video", "audio"}
    (fast, fast_grads), (full, full_grads) = both_paths(model, batch)
    assert set(fast) == set(full)
    for name in full:
        torch.testing.assert_close(fast[name], full[name], atol=1e-5, rtol=1e-5, msg=name)
    assert set(fast_grads) == set(full_grads) and len(full_grads) > 2
    for name, grad in full_grads.items():
        assert grad.abs().sum() > 0, name                                  # every trainable group is reached
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_suffix_backward_falls_back_when_the_llm_body_trains(tiny_env):
    cfg = tiny_env.config(3)
    model = build_model(cfg)
    set_trainable(model, cfg)
    assert cfg.train.suffix_backward and suffix.trainable_inputs(model) is None          # LoRA: full pass
    batch = make_batch(model, stage_2_samples()[:2])
    blocks = {m: [tuple(b) for b in v.tolist()] for m, v in batch["signal_blocks"].items()}
    assert model._split(batch["input_ids"], batch["attention_mask"], batch["media_positions"], blocks) is None
    with torch.no_grad():             # nothing to differentiate: one plain pass
        assert model._split(batch["input_ids"], batch["attention_mask"], None, blocks) is None


def test_collate_carries_the_blocks_encode_recorded(tiny_env, tmp_path):
    """Blocks are found once (encode), carried by collate as {modality: (n, 2) (row, start)} in caption order."""
    import numpy as np

    from nextgpt.data.collate import Collator
    from nextgpt.data.conversation import encode
    from nextgpt.tokens import load_tokenizer, signal_blocks

    tokenizer, token_ids = load_tokenizer(tiny_env.ckpt / "vicuna")
    samples = []
    for i, (caption, modality) in enumerate(CAPTIONS):
        path = tmp_path / f"{i}.npy"
        np.save(path, np.full((2, 3), float(i), dtype=np.float32))
        samples.append(sample([Turn("human", caption), Turn("gpt", caption, modality)],
                              targets=[Target(modality, str(path), caption)], index=i))
    encoded = [encode(s, tokenizer, token_ids, 256) for s in samples]
    batch = Collator(token_ids)(encoded)
    for modality, blocks in batch["signal_blocks"].items():
        rows = [r for r, (_, m) in enumerate(CAPTIONS) if m == modality]
        assert blocks.tolist() == [[r, encoded[r].signal_blocks[0][1]] for r in rows]
        assert batch["caption_embeds"][modality][:, 0, 0].tolist() == [float(r) for r in rows]   # same order
        for r, start in blocks.tolist():          # the recorded starts are where the scanner finds the blocks
            assert (modality, start) in signal_blocks(batch["input_ids"][r].tolist(), token_ids)


def test_gpu_roofline_keeps_one_pass_when_weights_bound():
    """Micro-batch 1 (100 tokens, split at 93): every pass reads all weights, so no split on a GPU; at 32 rows the
    prefix pass is compute-bound and the short suffix passes cost little."""
    assert not suffix.worth_splitting(1, 100, [93], [100])
    assert suffix.worth_splitting(32, 100, [93] * 32, [100] * 32)
    assert not suffix.worth_splitting(32, 100, [5] * 32, [100] * 32)          # stage 1: the prefix is tiny
