"""ImageBind's text tokenizer (id equality with the original), the ImageBind score, and the CLIP score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nextgpt.eval.embedders import ClipScorer, ImageBindScorer, ImageBindTokenizer, clip_bpe_files

REPO = Path(__file__).resolve().parents[3]
REFERENCE = (REPO.parent / "shared").resolve() / "reference"
BPE = REFERENCE / "bpe_simple_vocab_16e6.txt.gz"
TOKENS = REFERENCE / "imagebind_text_tokens.json"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} absent (the shared reference files are not checked out beside the repo)")
    return path


def test_tokenizer_ids_equal_imagebinds_simple_tokenizer(tmp_path):
    """The original's SimpleTokenizer outputs (22 texts: html entities, accents, emoji, CJK, a cut at 77 that keeps
    no end token, zero padding) from the reference vocabulary file, read directly and through a Stable-Diffusion
    style tokenizer/ folder (vocab.json + merges.txt) built from the same file: every id equal."""
    cases = json.loads(need(TOKENS).read_text())["cases"]
    from_file = ImageBindTokenizer(need(BPE))
    from_folder = ImageBindTokenizer(clip_bpe_files(BPE, tmp_path / "tokenizer"))
    expected = torch.tensor([case["ids"] for case in cases])
    texts = [case["text"] for case in cases]
    assert torch.equal(from_file(texts), expected)
    assert torch.equal(from_folder(texts), expected)
    assert from_file.vocab_size == 49408 and (from_file.start, from_file.end) == (49406, 49407)


def test_tokenizer_rejects_other_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a CLIP tokenizer folder"):
        ImageBindTokenizer(tmp_path)
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a gzip'd CLIP BPE"):
        ImageBindTokenizer(bad)


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


def test_clip_score_from_a_local_folder(tmp_path):
    """A tiny CLIPModel saved in the transformers layout: the score is 100 * max(cos, 0), as torchmetrics defines
    it, and an identical text scores the same whatever the batch."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(clip_bpe_files(need(BPE), tmp_path / "tok")))
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=77),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=16)
    folder = tmp_path / "clip"
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    scorer = ClipScorer(folder)
    red = _solid(tmp_path / "red.png", (230, 20, 20))
    scores = scorer.score([red, red], ["a red square", "a blue square"])
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 100)).all()
    again = scorer.score([red], ["a red square"])
    assert again[0] == pytest.approx(float(scores[0]), abs=1e-3)
    with pytest.raises(FileNotFoundError, match="not a CLIP model folder"):
        ClipScorer(tmp_path)
    assert np.isfinite(scores.numpy()).all()
