"""eval/embedders.ImageBindScorer on the tiny ImageBind, its heads fitted on the spot (a minute of Adam steps on a
CPU, so not a unit test): matching pairs score higher, every modality's tower, batch-independent scores. The
tokenizer and the CLIP score: tests/unit/eval/test_eval_embedders.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nextgpt.eval.embedders import ImageBindScorer


def _solid(path: Path, colour: tuple[int, int, int]) -> Path:
    from PIL import Image

    Image.new("RGB", (64, 64), colour).save(path)
    return path


def _align_heads(model, images: torch.Tensor, ids: torch.Tensor, steps: int = 60) -> None:
    """Fit only the vision and text heads of the random tiny ImageBind contrastively on these pairs (the trunks stay
    random and frozen), so that it has something to agree about, as the real one does."""
    with torch.no_grad():
        vision_tokens = model.modality_trunks["vision"](model.modality_preprocessors["vision"](images))
        text = model.modality_preprocessors["text"]
        text_tokens = model.modality_trunks["text"](text(ids), attn_mask=text.mask)
    heads = [model.modality_heads["vision"], model.modality_heads["text"]]
    parameters = [p for head in heads for p in head.parameters()]
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    for _ in range(steps):
        image = torch.nn.functional.normalize(heads[0](vision_tokens), dim=-1)
        words = torch.nn.functional.normalize(heads[1](text_tokens, eos_positions=ids.argmax(-1)), dim=-1)
        logits = 10 * image @ words.T
        target = torch.arange(len(ids))
        loss = torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for p in parameters:
        p.requires_grad_(False)


def test_imagebind_score_higher_for_matching_pairs(tiny_env, tmp_path):
    from nextgpt.imagebind import preprocess

    torch.manual_seed(0)
    scorer = ImageBindScorer(tiny_env.imagebind, "tiny", tiny_env.ckpt / "stable-diffusion" / "tokenizer")
    red, blue = _solid(tmp_path / "red.png", (230, 20, 20)), _solid(tmp_path / "blue.png", (20, 20, 230))
    texts = ["a red square", "a blue square"]
    model = scorer.encoder.model
    _align_heads(model, torch.stack([preprocess.load_image(red), preprocess.load_image(blue)]), scorer.tokenizer(texts))
    # through the scorer's own path: files -> preprocessing -> towers; texts -> tokenizer -> text tower
    scores = scorer.score([red, red, blue, blue], ["image"] * 4, [texts[0], texts[1], texts[0], texts[1]])
    assert scores[0] > scores[1] and scores[3] > scores[2], scores
    assert scores.abs().max() <= 1.0 + 1e-5
    # video and audio go through their own towers; one of each from the toy data, one batched call
    video = next((tiny_env.data / "T_X_pair_data" / "webvid" / "videos").glob("*.mp4"))
    audio = next((tiny_env.data / "T_X_pair_data" / "audiocap" / "audios").glob("*.wav"))
    mixed = scorer.score([audio, red, video], ["audio", "image", "video"], ["a tone", "a red square", "a moving dot"])
    assert mixed.shape == (3,) and torch.isfinite(mixed).all()
    assert mixed[1] == pytest.approx(float(scores[0]), abs=1e-5)     # the same pair scores the same in any batch
    with pytest.raises(ValueError, match="differ in number"):
        scorer.score([red], ["image"], [])
