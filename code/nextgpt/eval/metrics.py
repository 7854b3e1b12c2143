"""Evaluation metrics: caption quality, signal-token emission, alignment, and embedding-space agreement.

    caption_scores(candidates, references)   BLEU-4 and CIDEr-D (pycocoevalcap's scorers, the COCO caption code)
    emission(ids, requested, token_ids)       how one reply's signal tokens came out ("ok", "none", "wrong", ...)
    emission_rates(records)                   share of "ok" replies per requested modality (and "text")
    alignment(prediction, target)             l2 (mean per-token distance, as the training loss) and cosine
    cosine(a, b)                              row-wise cosine of two (N, D) embedding batches (ImageBind / CLIP score)

Nothing is imported at module import beyond the standard library; torch / pycocoevalcap load in the functions.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Mapping, Sequence

# Emission outcomes of one reply. A generation request is right only with "ok"; a text request only with "none".
OK, NONE, WRONG, EXTRA, MALFORMED, TRUNCATED = "ok", "none", "wrong_modality", "extra_blocks", "malformed", "truncated"
OUTCOMES = (OK, NONE, WRONG, EXTRA, MALFORMED, TRUNCATED)
TEXT = "text"                      # the "requested modality" of a request that should get no signal block

# pycocoevalcap's published numbers come after its Java PTB tokenizer, which lowercases, splits off punctuation and
# drops it. Without Java we do the same for plain captions: lowercase, punctuation out, words split on whitespace.
_PUNCTUATION = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")


def normalize_caption(text: str) -> str:
    """'A red circle, on blue!' -> 'a red circle on blue' (what the COCO scorers expect: space-separated words)."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def _check(candidates: Mapping, references: Mapping) -> list:
    if set(candidates) != set(references):
        missing = sorted(map(str, set(references) ^ set(candidates)))[:3]
        raise ValueError(f"caption scores: candidates and references cover different items (e.g. {missing})")
    keys = sorted(candidates, key=str)
    for key in keys:
        if not isinstance(candidates[key], str):
            raise ValueError(f"caption scores: item {key}: the candidate must be one string")
        if not references[key] or not all(isinstance(r, str) for r in references[key]):
            raise ValueError(f"caption scores: item {key}: needs at least one reference string")
    return keys


def bleu4(candidates: Mapping[object, str], references: Mapping[object, Sequence[str]]) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002) as the COCO caption evaluation computes it: clipped n-gram precisions
    for n = 1..4 pooled over the corpus, geometric mean, brevity penalty with the closest reference length."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    keys = _check(candidates, references)
    if not keys:
        raise ValueError("caption scores: no items")
    scorer = BleuScorer(n=4)
    for key in keys:
        scorer += (normalize_caption(candidates[key]), [normalize_caption(r) for r in references[key]])
    score, _ = scorer.compute_score(option="closest", verbose=0)
    return float(score[3])


def cider_d(candidates: Mapping[object, str], references: Mapping[object, Sequence[str]]) -> float:
    """Corpus CIDEr-D (Vedantam et al. 2015) as the COCO caption evaluation computes it (its "CIDEr" is the -D
    variant): tf-idf n-gram vectors (n = 1..4, document frequency over this corpus's references), cosine with each
    reference with clipped counts, a Gaussian length penalty (sigma 6), averaged over references and n, times 10.

    The idf comes from the evaluated set itself, so CIDEr-D of one item alone is 0 (every n-gram is in every
    "document"); compare numbers only over the same held-out set."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    keys = _check(candidates, references)
    if not keys:
        raise ValueError("caption scores: no items")
    scorer = CiderScorer(n=4, sigma=6.0)
    for key in keys:
        scorer += (normalize_caption(candidates[key]), [normalize_caption(r) for r in references[key]])
    score, _ = scorer.compute_score()
    return float(score)


def caption_scores(candidates: Mapping[object, str], references: Mapping[object, Sequence[str]]) -> dict[str, float]:
    return {"bleu4": bleu4(candidates, references), "cider_d": cider_d(candidates, references)}


# --------------------------------------------------------------------------------------------------------------
# Signal-token emission

def emission(ids: Sequence[int], requested: str | None, token_ids) -> str:
    """How the signal tokens of one generated reply (ids after the prompt) came out, for a request of `requested`
    modality (None or "text": a request that should get no medium).

    ok: exactly one complete, in-order block, of the requested modality (or, for a text request, no signal token);
    none: no signal token although a medium was asked for; wrong_modality: one complete block of another modality;
    extra_blocks: more than one block, or any block for a text request; malformed: signal ids out of order (a stray
    or a gap); truncated: the reply ends inside a block (max_new_tokens cut it).
    """
    from nextgpt.tokens import scan_signal_blocks

    scan = scan_signal_blocks(list(ids), token_ids)
    if scan.malformed:
        return MALFORMED
    if scan.truncated:
        return TRUNCATED
    if requested in (None, TEXT):
        return OK if not scan.blocks else EXTRA
    if not scan.blocks:
        return NONE
    if len(scan.blocks) > 1:
        return EXTRA
    return OK if scan.blocks[0][0] == requested else WRONG


def emission_rates(records: Iterable[tuple[str | None, str]]) -> dict[str, dict]:
    """[(requested modality or "text", outcome)] -> {requested: {"rate": share ok, "n": count, outcome: count}}."""
    grouped: dict[str, Counter] = {}
    for requested, outcome in records:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown emission outcome {outcome!r}; known: {', '.join(OUTCOMES)}")
        grouped.setdefault(requested or TEXT, Counter())[outcome] += 1
    out = {}
    for requested, counts in grouped.items():
        n = sum(counts.values())
        out[requested] = {"rate": counts[OK] / n, "n": n, **{k: counts[k] for k in OUTCOMES if counts[k]}}
    return out


# --------------------------------------------------------------------------------------------------------------
# Vectors

def alignment(prediction, target) -> dict[str, float]:
    """Projector output vs the decoder text encoder's caption embedding, both (n, T, D) (T = 1 for pooled audio).

    l2: mean over the n·T tokens of the Euclidean distance (the training loss without its epsilon);
    cos: mean over the tokens of their cosine similarity. Computed in fp32."""
    import torch

    prediction, target = prediction.float(), target.float().reshape(prediction.shape)
    if prediction.numel() == 0:
        raise ValueError("alignment: empty prediction")
    l2 = (prediction - target).pow(2).sum(-1).sqrt().mean()
    cos = torch.nn.functional.cosine_similarity(prediction, target, dim=-1, eps=1e-8).mean()
    return {"l2": float(l2), "cos": float(cos)}


def cosine(a, b):
    """Row-wise cosine of (N, D) and (N, D) -> (N,), fp32 (the ImageBind score; CLIP score before its scaling)."""
    import torch

    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"cosine: expected two (N, D) batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
