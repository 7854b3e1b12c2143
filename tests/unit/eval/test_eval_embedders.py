"""ImageBind's text tokenizer (id equality with the original) and the CLIP score (the ImageBind score on the tiny
ImageBind: tests/e2e/test_eval_scores.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nextgpt.eval.embedders import ClipScorer, ImageBindTokenizer, clip_bpe_files

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
