"""The sequence template and label masks against the original's templates (reference §2.2-2.5), token for token.

The expected ids come from an independent emulation of the original: its literal strings (prompt_wrap prefix,
build_one_instance_stage_1/2/3 chunks, space-joined signal tokens) passed through transformers-4.29 tokenizer
semantics (split at added tokens, strip whitespace on both sides of each, sentencepiece on the rest).
"""

from __future__ import annotations

import re

import pytest

from nextgpt.data.conversation import (EncodeError, TruncatedSignalError, encode, prompt_for_generation,
                                       signal_blocks)
from nextgpt.data.types import Media, Sample, Target, Turn
from nextgpt.modalities import MODALITIES, added_tokens

SOFT = "SOFT"      # where the original inserted the media embedding


@pytest.fixture(scope="module")
def tok(tiny_env):
    from nextgpt.tokens import load_tokenizer

    return load_tokenizer(tiny_env.ckpt / "vicuna")


def legacy_tokenize(tokenizer, text: str) -> list[int]:
    """One tokenizer(text, add_special_tokens=False) call of transformers 4.29 with tokens added by add_tokens."""
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added_tokens(), key=len, reverse=True)) + ")"
    parts = [p for p in re.split(pattern, text) if p != ""]
    vocab = tokenizer.get_vocab()
    for i, part in enumerate(parts):
        if part in vocab and part in added_tokens():
            if i > 0 and parts[i - 1] not in added_tokens():
                parts[i - 1] = parts[i - 1].rstrip()
            if i + 1 < len(parts) and parts[i + 1] not in added_tokens():
                parts[i + 1] = parts[i + 1].lstrip()
    ids: list[int] = []
    for part in parts:
        if part in added_tokens():
            ids.append(vocab[part])
        elif part:
            ids += tokenizer.encode(part, add_special_tokens=False)
    return ids


def legacy_sequence(tokenizer, token_ids, chunks: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """[BOS] + chunks (text, supervised); SOFT marks the media embedding -> (ids with pad at SOFT, labels)."""
    ids, labels = [token_ids.bos], [-100]
    for text, supervised in chunks:
        piece = [token_ids.pad] if text == SOFT else legacy_tokenize(tokenizer, text)
        ids += piece
        labels += piece if supervised else [-100] * len(piece)
    return ids, labels


def signal_string(modality: str) -> str:
    return " ".join(MODALITIES[modality].signal_tokens)      # the original's space-joined signal tokens


def sample(turns, media=(), targets=(), index=0):
    return Sample(dataset="test", source="test.json", index=index, turns=list(turns), media=list(media),
                  targets=list(targets))


CAPTION = "a red circle on a black background"


def test_stage_1_matches_the_original(tok):
    tokenizer, token_ids = tok
    s = sample([Turn("human", ""), Turn("gpt", CAPTION)], media=[Media("image", "/x/1.jpg", "1.jpg")])
    enc = encode(s, tokenizer, token_ids, 128, prompt="generate a caption")
    # prompt_wrap: [BOS] + "### Human: <Img>" + img + build_one_instance_stage_1's two chunks
    ids, labels = legacy_sequence(tokenizer, token_ids, [
        ("### Human: <Img>", False), (SOFT, False),
        ("</Img> " + "generate a caption" + "\n### Assistant: ", False), (CAPTION + "\n###", True)])
    assert enc.input_ids == ids
    assert enc.labels == labels
    assert enc.media_positions == [ids.index(token_ids.media_start) + 1]
    assert enc.input_ids[enc.media_positions[0] - 1] == token_ids.media_start
    assert enc.input_ids[enc.media_positions[0] + 1] == token_ids.media_end
    # readable: the supervised part is exactly the caption and the closing ###; one BOS
    supervised = [t for t in enc.labels if t != -100]
    assert tokenizer.decode(supervised) == CAPTION + "\n###"
    assert enc.input_ids.count(token_ids.bos) == 1
    # the masked part ends with the trailing-space piece of "### Assistant: " (its own token, as trained)
    last_masked = max(i for i, t in enumerate(enc.labels) if t == -100)
    assert tokenizer.decode(enc.input_ids[last_masked - 3:last_masked + 1]).endswith("### Assistant: ")


def test_stage_2_matches_the_original(tok):
    tokenizer, token_ids = tok
    s = sample([Turn("human", CAPTION), Turn("gpt", CAPTION, "image")], targets=[Target("image", "e.npy")])
    enc = encode(s, tokenizer, token_ids, 128)
    ids, labels = legacy_sequence(tokenizer, token_ids, [
        ("### Human: ", False), (CAPTION + "\n### Assistant: ", False),
        (CAPTION + signal_string("image") + "\n###", True)])
    assert enc.input_ids == ids
    assert enc.labels == labels
    assert enc.media_positions == []
    blocks = signal_blocks(enc.labels, token_ids)
    assert blocks == [("image", ids.index(token_ids.signal["image"][0]))]
    start = blocks[0][1]
    assert enc.input_ids[start:start + 4] == token_ids.signal["image"]          # contiguous ids, no "▁" between
    assert tokenizer.decode([t for t in enc.labels if t != -100]).startswith(CAPTION + "[IMG0][IMG1][IMG2][IMG3]")
    # The reference template `### Human: {caption}\n### Assistant: {caption}[IMG0]..[IMG3]\n###` as the original's
    # tokens read back: the trailing space of one chunk and the leading "▁" of the next make two spaces, and its
    # tokenizer ate the whitespace (the newline) right after the added token [IMG3].
    assert tokenizer.decode(enc.input_ids) == (f"<s> ### Human:  {CAPTION}\n### Assistant:  {CAPTION}"
                                               "[IMG0][IMG1][IMG2][IMG3] ###")


def test_stage_3_multi_turn_with_media_and_two_blocks(tok):
    tokenizer, token_ids = tok
    turns = [Turn("human", "What is in the picture?"), Turn("gpt", "A red circle. Here is a sound:", "audio"),
             Turn("human", "And a video?"), Turn("gpt", "Sure thing!", "video"),
             Turn("human", "Thanks."), Turn("gpt", "You are welcome.")]
    s = sample(turns, media=[Media("image", "/x/1.jpg", "1.jpg")],
               targets=[Target("audio", "a.npy"), Target("video", "v.npy")])
    enc = encode(s, tokenizer, token_ids, 256)
    # build_one_instance_stage_3: first human turn "</Img> " + value (input_modality image), later "Human: " + value
    ids, labels = legacy_sequence(tokenizer, token_ids, [
        ("### Human: <Img>", False), (SOFT, False),
        ("</Img> " + turns[0].text + "\n### Assistant: ", False),
        (turns[1].text + signal_string("audio") + "\n###", True),
        ("Human: " + turns[2].text + "\n### Assistant: ", False),
        (turns[3].text + signal_string("video") + "\n###", True),
        ("Human: " + turns[4].text + "\n### Assistant: ", False),
        (turns[5].text + "\n###", True)])
    assert enc.input_ids == ids
    assert enc.labels == labels
    blocks = signal_blocks(enc.labels, token_ids)
    assert [m for m, _ in blocks] == ["audio", "video"]
    assert enc.signal_blocks == blocks                       # recorded while building == found by the scanner
    for modality, start in blocks:
        n = MODALITIES[modality].num_signal_tokens
        assert enc.input_ids[start:start + n] == token_ids.signal[modality]
        assert enc.labels[start:start + n] == token_ids.signal[modality]


def test_text_only_first_turn(tok):
    """Alpaca-style: no media -> "### Human: " prefix chunk, then value + "\\n### Assistant: "."""
    tokenizer, token_ids = tok
    s = sample([Turn("human", "Tell me a joke."), Turn("gpt", "Hello, how are you?")])
    enc = encode(s, tokenizer, token_ids, 128)
    ids, labels = legacy_sequence(tokenizer, token_ids, [
        ("### Human: ", False), ("Tell me a joke.\n### Assistant: ", False), ("Hello, how are you?\n###", True)])
    assert (enc.input_ids, enc.labels) == (ids, labels)


def test_prompt_is_ignored_when_the_human_turn_has_text(tok):
    tokenizer, token_ids = tok
    s = sample([Turn("human", "Describe the image."), Turn("gpt", CAPTION)], media=[Media("image", "p", "n")])
    with_prompt = encode(s, tokenizer, token_ids, 128, prompt="generate a caption")
    without = encode(s, tokenizer, token_ids, 128)
    assert with_prompt.input_ids == without.input_ids
    assert "Describe the image." in tokenizer.decode(without.input_ids)


def test_truncation_never_cuts_a_signal_block(tok):
    tokenizer, token_ids = tok
    s = sample([Turn("human", CAPTION), Turn("gpt", CAPTION, "video")], targets=[Target("video", "v.npy")])
    full = encode(s, tokenizer, token_ids, 512)
    start = signal_blocks(full.labels, token_ids)[0][1]
    end = start + MODALITIES["video"].num_signal_tokens          # first position after the block
    prefix = 1 + len(tokenizer.encode("### Human: ", add_special_tokens=False))   # not counted by max_length
    for cut in (start + 1, end - 1, start - 1):                   # inside the block, or before it starts
        with pytest.raises(TruncatedSignalError, match="video signal block"):
            encode(s, tokenizer, token_ids, cut - prefix)
    cut = encode(s, tokenizer, token_ids, end - prefix)          # only the closing "###" goes
    assert cut.input_ids == full.input_ids[:end] and cut.labels == full.labels[:end]
    assert len(full.input_ids) > end


def test_truncation_of_text_and_empty_supervision(tok):
    tokenizer, token_ids = tok
    s = sample([Turn("human", "Tell me a joke."), Turn("gpt", "Hello, how are you? I am fine, thank you.")])
    full = encode(s, tokenizer, token_ids, 512)
    first_supervised = next(i for i, t in enumerate(full.labels) if t != -100)
    # the original cut only the text ids: BOS + "### Human: " (prompt_wrap's prefix) are not counted
    prefix = 1 + len(tokenizer.encode("### Human: ", add_special_tokens=False))
    cut = encode(s, tokenizer, token_ids, first_supervised - prefix + 2)
    assert len(cut.input_ids) == first_supervised + 2 and sum(t != -100 for t in cut.labels) == 2
    with pytest.raises(EncodeError, match="nothing to learn"):
        encode(s, tokenizer, token_ids, first_supervised - prefix)
    # with a medium the prefix ends at the soft token ("### Human: <Img>" + soft), which is never cut
    media = sample([Turn("human", "x" * 0), Turn("gpt", CAPTION)], media=[Media("image", "p", "n")])
    whole = encode(media, tokenizer, token_ids, 512, prompt="generate a caption")
    text_start = whole.media_positions[0] + 1
    first_supervised = next(i for i, t in enumerate(whole.labels) if t != -100)
    cut = encode(media, tokenizer, token_ids, first_supervised - text_start + 1, prompt="generate a caption")
    assert cut.input_ids == whole.input_ids[:first_supervised + 1]
    with pytest.raises(EncodeError, match="nothing to learn"):
        encode(media, tokenizer, token_ids, 3, prompt="generate a caption")


def test_data_errors_name_the_record(tok):
    tokenizer, token_ids = tok
    reserved = sample([Turn("human", "say [IMG0] please"), Turn("gpt", "no")], index=7)
    with pytest.raises(EncodeError, match=r"test\.json record 7.*reserved"):
        encode(reserved, tokenizer, token_ids, 128)
    mismatch = sample([Turn("human", "a"), Turn("gpt", "b", "image")], targets=[Target("audio", "a.npy")])
    with pytest.raises(EncodeError, match="do not match"):
        encode(mismatch, tokenizer, token_ids, 128)
    order = sample([Turn("gpt", "b"), Turn("human", "a")])
    with pytest.raises(EncodeError, match="first turn"):
        encode(order, tokenizer, token_ids, 128)
    unknown = sample([Turn("human", "a"), Turn("gpt", "b", "smell")], targets=[Target("smell", "x")])
    with pytest.raises(EncodeError, match="smell"):
        encode(unknown, tokenizer, token_ids, 128)


def test_generation_prompt_is_the_training_prefix(tok):
    """One BOS, media where training puts them, ending exactly where the supervised answer starts (§7 item 12)."""
    tokenizer, token_ids = tok
    media = [Media("image", "/x/1.jpg", "1.jpg")]
    turns = [Turn("human", "What is in the picture?"), Turn("gpt", "A red circle.", "image"),
             Turn("human", "And a video?"), Turn("gpt", "Sure thing!", "video")]
    train = encode(sample(turns, media, [Target("image", "i"), Target("video", "v")]), tokenizer, token_ids, 256)
    prompt = prompt_for_generation(turns[:3], media, tokenizer, token_ids)
    answer_start = max(i for i, t in enumerate(train.labels) if t == -100) + 1
    assert prompt.input_ids == train.input_ids[:answer_start]
    assert prompt.media_positions == train.media_positions
    assert set(prompt.labels) == {-100}
    assert prompt.input_ids.count(token_ids.bos) == 1
    assert tokenizer.convert_ids_to_tokens(prompt.input_ids[-1:]) == ["▁"]    # the trailing space, as trained
    single = prompt_for_generation("show me a red circle", [], tokenizer, token_ids)
    reference = legacy_sequence(tokenizer, token_ids, [("### Human: ", False),
                                                       ("show me a red circle\n### Assistant: ", False)])[0]
    assert single.input_ids == reference
    with pytest.raises(EncodeError, match="end with a human turn"):
        prompt_for_generation(turns, media, tokenizer, token_ids)


def test_signal_blocks_rejects_broken_blocks(tok):
    _, token_ids = tok
    image = token_ids.signal["image"]
    assert signal_blocks([5, *image, 6, *token_ids.signal["audio"]], token_ids) == [("image", 1), ("audio", 6)]
    with pytest.raises(ValueError, match="incomplete image"):
        signal_blocks([5, *image[:3], 6], token_ids, "somewhere")
    with pytest.raises(ValueError, match="stray"):
        signal_blocks([5, image[2]], token_ids)


def test_scan_signal_blocks_reports_truncated_and_malformed_runs(tok):
    """The one scanner, in its lenient form (generation): complete blocks, a run out of order (skipped whole), and a
    block cut by the end of the ids."""
    from nextgpt.tokens import scan_signal_blocks

    _, token_ids = tok
    image, audio = token_ids.signal["image"], token_ids.signal["audio"]
    ids = [5, *image, 6, image[1], image[0], 7, *audio, 8, *token_ids.signal["video"][:5]]
    scan = scan_signal_blocks(ids, token_ids)
    assert scan.blocks == [("image", 1), ("audio", 9)]
    assert scan.malformed == [("image", 6)] and scan.truncated == [("video", 18)]
    assert scan_signal_blocks([5, 6], token_ids).blocks == []
