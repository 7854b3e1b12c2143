"""Prompts token for token the original's (reference §2.2-2.5, §4.5): its process_caption, LLaVA's literal
"<image>" text in legacy records, and max_length cutting only the text ids after prompt_wrap's prefix.

Expected sequences are the original's strings written out and tokenised with transformers-4.29 semantics
(test_conversation.legacy_sequence)."""

from __future__ import annotations

import json

import pytest

from nextgpt.data.conversation import encode
from nextgpt.data.readers import read_file
from nextgpt.data.records import normalize_caption
from nextgpt.data.types import Media, Sample, Turn
from test_conversation import SOFT, legacy_sequence


@pytest.fixture(scope="module")
def tok(tiny_env):
    from nextgpt.tokens import load_tokenizer

    return load_tokenizer(tiny_env.ckpt / "vicuna")


# (raw caption, the original's process_caption(raw)) written out by hand from code/dataset/utils.py:
#   re.sub(r'([\"()*#:;~])', ' ', c.lower()); re.sub(r'\s{2,}', ' ', c); c.rstrip('\n'); c.strip(' ')
CAPTIONS = [
    ("A Dog (running)", "a dog running"),
    ("\nFrankfurt am Main.", "\nfrankfurt am main."),           # a leading single newline stays
    ("a\tcat", "a\tcat"),                                        # a single tab stays
    ("one\ntwo", "one\ntwo"),                                    # a single newline stays
    ("one\n\ntwo", "one two"),                                   # a run of 2+ becomes one space
    ("ends with newline\n", "ends with newline"),
    ("  spaced: out;  ", "spaced out"),
    ("x \n", "x"),                                               # " \n" is a run -> " " -> stripped
    ('say "hi" #1 ~ok*', "say hi 1 ok"),
]


@pytest.mark.parametrize("raw, expected", CAPTIONS)
def test_caption_normalisation_is_the_originals(raw, expected):
    assert normalize_caption(raw) == expected


def test_legacy_llava_keeps_its_image_text(tok, tmp_path):
    tokenizer, token_ids = tok
    path = tmp_path / "llava" / "llava.json"
    path.parent.mkdir()
    question = "<image>\nWhat is in the image?"
    path.write_text(json.dumps([{"image_name": "1.jpg", "output_modality": "text", "conversation": [
        {"from": "human", "value": question, "input_modality": "image"},
        {"from": "gpt", "value": "A bus.", "caption": "", "output_modality": "text"},
        {"from": "human", "value": "Colour?", "input_modality": "text"},
        {"from": "gpt", "value": "White.", "caption": "", "output_modality": "text"}]}]))
    (sample,) = read_file(path, dataset="llava_instruction", role="instruction", embed_dir=tmp_path).samples
    enc = encode(sample, tokenizer, token_ids, 512)
    # build_one_instance_stage_3 + prompt_wrap: the human value goes in as written
    ids, labels = legacy_sequence(tokenizer, token_ids, [
        ("### Human: <Img>", False), (SOFT, False), ("</Img> " + question + "\n### Assistant: ", False),
        ("A bus." + "\n###", True), ("Human: " + "Colour?" + "\n### Assistant: ", False), ("White." + "\n###", True)])
    assert enc.input_ids == ids and enc.labels == labels


def test_max_length_counts_only_the_text_ids(tok):
    tokenizer, token_ids = tok
    caption = "a red circle on a black background"
    s = Sample("d", "f.json", 0, [Turn("human", ""), Turn("gpt", caption)], media=[Media("image", "/x.jpg", "x.jpg")])
    ids, labels = legacy_sequence(tokenizer, token_ids, [
        ("### Human: <Img>", False), (SOFT, False),
        ("</Img> generate a caption\n### Assistant: ", False), (caption + "\n###", True)])
    prefix = 1 + len(tokenizer.encode("### Human:", add_special_tokens=False)) + 2     # BOS, prefix, <Img>, soft
    text = len(ids) - prefix                                     # what process_batch_stage_1 cut to max_length
    whole = encode(s, tokenizer, token_ids, text, prompt="generate a caption")
    assert whole.input_ids == ids and whole.labels == labels     # max_length = text ids: nothing is cut
    cut = encode(s, tokenizer, token_ids, text - 2, prompt="generate a caption")
    assert cut.input_ids == ids[:-2] and cut.labels == labels[:-2]
