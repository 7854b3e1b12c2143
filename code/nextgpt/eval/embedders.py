"""Embed generated media and request texts in one space, to score how well they agree.

    ImageBindTokenizer(source)(texts)            -> (B, 77) int64 ids, exactly ImageBind's SimpleTokenizer output
    ImageBindScorer(checkpoint, preset, source)  .score(paths, modalities, texts) -> (N,) cosine (the ImageBind score)
    ClipScorer(folder)                           .score(images, texts) -> (N,) CLIP score, 100 * max(cos, 0)

ImageBind's text tower reads OpenAI CLIP's byte-level BPE (bpe_simple_vocab_16e6.txt.gz) with context 77: the same
vocabulary and merges as the `tokenizer/` folder of Stable Diffusion 1.x (vocab.json + merges.txt), so the
transformers CLIPTokenizer of that folder gives the same BPE ids (tests/unit/eval/test_eval_embedders.py proves it against the
reference file and the original's outputs). What differs from CLIPTokenizer's own framing, and is done here:
ImageBind un-escapes HTML twice before BPE, pads with 0 (not the end token), and a sequence cut at 77 keeps no
end token. The end token (49407) is the largest id, which is how the text tower finds it (argmax).
"""

from __future__ import annotations

import gzip
import html
import json
import tempfile
from pathlib import Path
from typing import Sequence

import torch

CONTEXT_LENGTH = 77
START, END = "<|startoftext|>", "<|endoftext|>"
# The merges ImageBind / CLIP use: lines 1 .. 48894 of bpe_simple_vocab_16e6.txt.gz (its first line is a header).
NUM_MERGES = 49152 - 256 - 2


def clip_bpe_files(bpe_gz: str | Path, out_dir: str | Path) -> Path:
    """Write vocab.json + merges.txt (the Stable Diffusion `tokenizer/` layout) from OpenAI's
    bpe_simple_vocab_16e6.txt.gz; -> out_dir. The vocabulary is the 256 byte symbols, the same with "</w>", one
    token per merge, then the start and end tokens (ids 49406, 49407), as CLIP builds it."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    bpe_gz, out_dir = Path(bpe_gz), Path(out_dir)
    try:
        lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{bpe_gz}: not a gzip'd CLIP BPE merges file ({e})") from None
    merges = [line for line in lines[1:NUM_MERGES + 1] if line]
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{bpe_gz}: expected {NUM_MERGES} BPE merges (pairs), found {len(merges)}")
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [START, END]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out_dir


class ImageBindTokenizer:
    """Texts -> (B, 77) ids as ImageBind's SimpleTokenizer makes them, from a CLIP tokenizer folder (vocab.json +
    merges.txt, e.g. <stable-diffusion>/tokenizer) or the bpe_simple_vocab_16e6.txt.gz file itself."""

    def __init__(self, source: str | Path, context_length: int = CONTEXT_LENGTH):
        from transformers import CLIPTokenizer

        source = Path(source)
        self.context_length = context_length
        if source.is_file() and source.name.endswith(".gz"):
            with tempfile.TemporaryDirectory() as tmp:
                self.tokenizer = CLIPTokenizer.from_pretrained(str(clip_bpe_files(source, tmp)))
        elif (source / "vocab.json").is_file() and (source / "merges.txt").is_file():
            self.tokenizer = CLIPTokenizer.from_pretrained(str(source))
        else:
            raise FileNotFoundError(f"{source}: not a CLIP tokenizer folder (vocab.json + merges.txt) nor "
                                    "bpe_simple_vocab_16e6.txt.gz (ImageBind's text tokenizer)")
        vocab = self.tokenizer.get_vocab()
        if START not in vocab or END not in vocab:
            raise ValueError(f"{source}: the vocabulary has no {START} / {END} (not a CLIP tokenizer)")
        self.start, self.end = vocab[START], vocab[END]
        self.vocab_size = len(vocab)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        # SimpleTokenizer: html.unescape twice, then whitespace cleaned and lowercased (CLIPTokenizer does those)
        cleaned = [html.unescape(html.unescape(t)).strip() for t in texts]
        bodies = self.tokenizer(cleaned, add_special_tokens=False)["input_ids"] if cleaned else []
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, body in enumerate(bodies):
            ids = ([self.start] + body + [self.end])[:self.context_length]     # cut: no end token, as the original
            out[row, :len(ids)] = torch.tensor(ids)
        return out


class ImageBindScorer:
    """ImageBind with its vision, audio and text towers: cosine of a generated medium and its request text.

    The same frozen encoder NExT-GPT reads its inputs with, so no extra model is needed; its text tower is loaded
    here only (training never loads it)."""

    def __init__(self, checkpoint: str | Path, preset: str, tokenizer_source: str | Path, device=None, dtype=None):
        from nextgpt.imagebind.encode import Encoder
        from nextgpt.imagebind.model import load_imagebind

        self.tokenizer = ImageBindTokenizer(tokenizer_source)
        model = load_imagebind(checkpoint, preset, modalities=("vision", "audio", "text"))
        vocab = model.modality_preprocessors["text"].token_embedding.num_embeddings
        if self.tokenizer.vocab_size > vocab:
            raise ValueError(f"{tokenizer_source}: {self.tokenizer.vocab_size} tokens but the ImageBind text tower "
                             f"of {checkpoint} has {vocab} (another tokenizer)")
        self.encoder = Encoder.from_model(model, device=device, dtype=dtype, name=str(checkpoint))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N,) texts -> (N, out_dim) float32 on the CPU."""
        ids = self.tokenizer(texts).to(self.encoder.device)
        return self.encoder.model.encode("text", ids).float().cpu()

    def embed_media(self, paths: Sequence[str | Path], modalities: Sequence[str]) -> torch.Tensor:
        """Media files (any mix of image / video / audio) -> (N, out_dim) float32, in the given order."""
        out: list[torch.Tensor | None] = [None] * len(paths)
        for modality in dict.fromkeys(modalities):
            index = [i for i, m in enumerate(modalities) if m == modality]
            encoded = self.encoder.encode([paths[i] for i in index], modality, workers=0)
            for row, i in enumerate(index):
                out[i] = encoded[row]
        return torch.stack(out) if out else torch.zeros(0, self.encoder.out_dim)

    def score(self, paths: Sequence[str | Path], modalities: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        """(N,) cosine between each medium and its text, in ImageBind's joint space."""
        from nextgpt.eval.metrics import cosine

        if not (len(paths) == len(modalities) == len(texts)):
            raise ValueError("ImageBind score: paths, modalities and texts differ in number")
        if not paths:
            return torch.zeros(0)
        return cosine(self.embed_media(paths, modalities), self.embed_texts(texts))


class ClipScorer:
    """CLIP score (Hessel et al. 2021, the torchmetrics convention): 100 * max(cos(image, text), 0), from a local
    transformers CLIP folder (CLIPModel + its processor), e.g. openai/clip-vit-large-patch14 saved with
    save_pretrained."""

    def __init__(self, folder: str | Path, device=None):
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: not a CLIP model folder (config.json missing)")
        try:
            self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().requires_grad_(False)
            self.processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder}: cannot load a CLIP model ({str(e).splitlines()[0]})") from None
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model.to(self.device)

    @torch.no_grad()
    def score(self, images: Sequence, texts: Sequence[str]) -> torch.Tensor:
        """PIL images (or paths) and their texts -> (N,) CLIP scores in [0, 100]."""
        from PIL import Image

        from nextgpt.eval.metrics import cosine

        if len(images) != len(texts):
            raise ValueError("CLIP score: images and texts differ in number")
        if not images:
            return torch.zeros(0)
        pictures = [Image.open(i).convert("RGB") if isinstance(i, (str, Path)) else i.convert("RGB") for i in images]
        inputs = self.processor(text=list(texts), images=pictures, return_tensors="pt", padding="max_length",
                                truncation=True).to(self.device)
        image = _projected(self.model.get_image_features(pixel_values=inputs["pixel_values"]))      # (N, P)
        text = _projected(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                       attention_mask=inputs["attention_mask"]))   # (N, P)
        return 100.0 * cosine(image, text).clamp(min=0).cpu()


def _projected(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features; 4.x a tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output
