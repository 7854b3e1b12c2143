"""Evaluation metrics on hand-made cases with known answers (no model needed; a few seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from nextgpt.eval import metrics
from nextgpt.tokens import TokenIds

# -- BLEU ------------------------------------------------------------------------------------------------------------


def bleu_n(candidates, references, n):
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for key in candidates:
        scorer += (metrics.normalize_caption(candidates[key]), [metrics.normalize_caption(r) for r in references[key]])
    return scorer.compute_score(option="closest", verbose=0)[0][n - 1]


def test_bleu_published_modified_precision_examples():
    # Papineni et al. 2002, §2.1: modified unigram precision 2/7 for "the the the ..." and 17/18 for candidate 1 of
    # the "guide to action" example. Both candidates are not shorter than their closest reference, so BLEU-1 = p1.
    refs = ["The cat is on the mat.", "There is a cat on the mat."]
    assert bleu_n({0: "the the the the the the the"}, {0: refs}, 1) == pytest.approx(2 / 7, rel=1e-6)
    candidate = "It is a guide to action which ensures that the military always obeys the commands of the party."
    references = ["It is a guide to action that ensures that the military will forever heed Party commands.",
                  "It is the guiding principle which guarantees the military forces always being under the command "
                  "of the Party.",
                  "It is the practical guide for the army always to heed the directions of the party."]
    assert bleu_n({0: candidate}, {0: references}, 1) == pytest.approx(17 / 18, rel=1e-6)


def test_bleu4_hand_computed():
    ref = "A red circle on a green background."
    # p1..p4 = 6/7, 4/6, 3/5, 2/4, equal lengths -> (6/35) ** (1/4)
    assert metrics.bleu4({0: "a red circle on a blue background"}, {0: [ref]}) == \
        pytest.approx((6 / 35) ** 0.25, rel=1e-6)
    # 6 words against 7: p = 5/6, 4/5, 3/4, 2/3 (product 1/3), brevity penalty exp(1 - 7/6)
    assert metrics.bleu4({0: "a red circle on a blue"}, {0: [ref]}) == \
        pytest.approx(math.exp(1 - 7 / 6) * (1 / 3) ** 0.25, rel=1e-6)
    assert metrics.bleu4({0: "A red circle on a green background"}, {0: [ref]}) == pytest.approx(1.0, abs=1e-6)
    # no 4-gram in common: (almost) zero, as the COCO code's tiny smoothing leaves it
    assert metrics.bleu4({0: "green circle"}, {0: [ref]}) < 1e-3


def test_cider_d_hand_computed():
    refs = {0: ["red circle on blue"], 1: ["a tone of low pitch"]}
    # identical candidates whose n-grams occur in one document of two: every tf-idf cosine is 1 -> 10
    assert metrics.cider_d({0: "red circle on blue", 1: "a tone of low pitch"}, refs) == pytest.approx(10.0)
    # item 1 gives "a tone": n=1 cosine 2/(sqrt2*sqrt5), n=2 1/sqrt4, n=3,4 nothing; the length penalty uses the
    # bigram counts (1 vs 4) as the COCO code does: exp(-(1-4)^2 / (2*6^2)); CIDEr-D = 10 * mean over n
    item1 = 10 * (2 / (math.sqrt(2) * math.sqrt(5)) + 1 / 2) / 4 * math.exp(-9 / 72)
    assert metrics.cider_d({0: "red circle on blue", 1: "a tone"}, refs) == pytest.approx((10 + item1) / 2)
    # one item alone: every n-gram is in every document, idf 0
    assert metrics.cider_d({0: "red circle"}, {0: ["red circle"]}) == 0.0
    scores = metrics.caption_scores({"a": "red circle on blue", "b": "x"}, {"a": ["red circle on blue"], "b": ["y"]})
    assert set(scores) == {"bleu4", "cider_d"}


def test_caption_scores_reject_bad_input():
    with pytest.raises(ValueError, match="different items"):
        metrics.bleu4({0: "a"}, {1: ["a"]})
    with pytest.raises(ValueError, match="at least one reference"):
        metrics.cider_d({0: "a"}, {0: []})
    with pytest.raises(ValueError, match="no items"):
        metrics.bleu4({}, {})
    assert metrics.normalize_caption("  A red Circle, on blue!  don't ") == "a red circle on blue don't"


# -- emission --------------------------------------------------------------------------------------------------------

IDS = TokenIds(bos=1, eos=2, pad=2, media_start=100, media_end=101,
               signal={"image": [110, 111, 112, 113], "video": [120, 121, 122], "audio": [130, 131]})


@pytest.mark.parametrize("ids, requested, expected", [
    ([5, 6, 110, 111, 112, 113, 7], "image", metrics.OK),
    ([5, 6, 7], "image", metrics.NONE),
    ([5, 120, 121, 122], "image", metrics.WRONG),
    ([110, 111, 112, 113, 110, 111, 112, 113], "image", metrics.EXTRA),
    ([5, 110, 112, 111, 113], "image", metrics.MALFORMED),
    ([5, 111], "image", metrics.MALFORMED),
    ([5, 110, 111], "image", metrics.TRUNCATED),
    ([5, 6], "text", metrics.OK),
    ([5, 6], None, metrics.OK),
    ([5, 130, 131], "text", metrics.EXTRA),
    ([5, 130, 131], "audio", metrics.OK),
])
def test_emission_outcomes(ids, requested, expected):
    assert metrics.emission(ids, requested, IDS) == expected


def test_emission_rates_on_programmed_replies():
    replies = [([110, 111, 112, 113], "image"), ([5], "image"), ([5, 110, 111], "image"), ([5], "text"),
               ([130, 131], "text"), ([130, 131], "audio")]
    records = [(requested, metrics.emission(ids, requested, IDS)) for ids, requested in replies]
    rates = metrics.emission_rates(records)
    assert rates["image"] == {"rate": pytest.approx(1 / 3), "n": 3, "ok": 1, "none": 1, "truncated": 1}
    assert rates["text"]["rate"] == 0.5 and rates["text"]["extra_blocks"] == 1
    assert rates["audio"]["rate"] == 1.0
    with pytest.raises(ValueError, match="unknown emission outcome"):
        metrics.emission_rates([("image", "great")])


# -- vectors ---------------------------------------------------------------------------------------------------------

def test_alignment_and_cosine_known_values():
    target = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])                 # (1, 2, 2)
    prediction = torch.tensor([[[0.0, 0.0], [0.0, 2.0]]])
    out = metrics.alignment(prediction, target)
    assert out["l2"] == pytest.approx((5.0 + math.sqrt(5.0)) / 2)
    assert out["cos"] == pytest.approx(0.0)                           # zero vector -> 0; orthogonal -> 0
    same = metrics.alignment(target * 2, target)
    assert same["cos"] == pytest.approx(1.0) and same["l2"] == pytest.approx((5.0 + 1.0) / 2)
    pooled = metrics.alignment(torch.ones(3, 1, 4), torch.ones(3, 4))  # pooled audio target (n, D)
    assert pooled == {"l2": 0.0, "cos": pytest.approx(1.0)}
    assert metrics.cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[-1.0, 0.0], [2.0, 2.0]])).tolist() \
        == pytest.approx([-1.0, 1.0])
    with pytest.raises(ValueError, match="one shape"):
        metrics.cosine(torch.ones(2, 3), torch.ones(3, 3))
