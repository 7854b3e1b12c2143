"""The NExT-GPT sequence template and label masks, for every stage and for inference prompts.

One template serves all stages (the original's prompt_wrap); a stage only changes what the Sample's turns hold:

    stage 1   <s>### Human: <Img>{soft}</Img> {prompt}\\n### Assistant: {caption}\\n###
    stage 2   <s>### Human: {caption}\\n### Assistant: {caption}[IMG0][IMG1][IMG2][IMG3]\\n###
    stage 3   <s>### Human: [<Img>{soft}</Img> ]{q1}\\n### Assistant: {a1}[signal block]\\n### Human: {q2}\\n### Assistant: {a2}\\n###

Loss only on the assistant parts ({a}, its signal block and the closing "\\n###").

Token for token as the original, which matters for importing its released delta and continuing from it:
- model.max_length cuts only the ids after prompt_wrap's prefix (BOS, "### Human:", <Img> + soft token), as the
  original's process_batch_stage_* cut only the text ids;
- the same chunks are tokenised separately, as the original's separate tokenizer calls were
  ([BOS] | "### Human: <Img>" | soft token | "</Img> " + q + "\\n### Assistant: " | a + signal + "\\n###" |
  "Human: " + q + "\\n### Assistant: " | ...), each with add_special_tokens=False, so a trailing space in a chunk
  is its own "▁" piece exactly as in training the original;
- BOS is an id (the original inserted it as an embedding), signal blocks and <Img>/</Img> are ids concatenated
  in (never tokenised from a space-joined string, whose splitting around added tokens depends on the
  tokenizer version);
- the original's tokenizer (transformers 4.29, tokens added with `add_tokens`) stripped whitespace on both sides
  of every added token inside a tokenizer call. We apply that rule explicitly to the text next to an added token
  within a chunk, so "### Human: <Img>" -> ids("### Human:") + [<Img>] and "[IMG3]\\n###" -> [IMG3] + ids("###")
  as the released model saw them (the newline after a signal block was eaten by the original too).

The soft token of an input medium holds a placeholder id (`token_ids.pad`) that the model overwrites with the
projected ImageBind feature; its index is recorded in `Encoded.media_positions`. Labels are not shifted:
labels[t] = input_ids[t] where supervised, -100 elsewhere.

The inference prompt (`prompt_for_generation`) is built by the same code and ends exactly where a training
assistant part begins (after the chunk "... \\n### Assistant: " with its trailing "▁"), with a single BOS:
this fixes the original's train/inference mismatches (another prompt at inference than in training; signal
tokens generated one at a time).
"""

from __future__ import annotations

from typing import Sequence, Union

from nextgpt.data.types import Encoded, Media, Sample, Turn
from nextgpt.modalities import MODALITIES
# IGNORE, signal_blocks re-exported: the token facts' home is tokens.py (so is the templates')
from nextgpt.tokens import IGNORE, VICUNA_V0, Template, signal_blocks  # noqa: F401

# The vicuna_v0 strings (nextgpt.tokens holds them and the `chat` template; token_ids.template picks one).
HUMAN_PREFIX = VICUNA_V0.first_human  # before the first human turn (the original's prompt_wrap prefix)
LATER_HUMAN = VICUNA_V0.later_human   # before every later human turn (the previous gpt turn ended with "\n###")
ASSISTANT = VICUNA_V0.assistant       # ends every human turn; the model answers after it
TURN_END = VICUNA_V0.turn_end         # ends every gpt turn; generation stops at "###"


def template_of(token_ids) -> Template:
    """The conversation template resolved with the tokenizer (model.template); vicuna_v0 when none was."""
    return getattr(token_ids, "template", None) or VICUNA_V0


class EncodeError(ValueError):
    """A sample that cannot be encoded; datasets count these, warn and skip the sample."""


class TruncatedSignalError(EncodeError):
    """max_length would cut (or drop) a signal block or an input medium's soft token."""


# A chunk is what the original passed to one tokenizer call: text pieces (str) and added-token ids (a tuple,
# never tokenised from text). The soft token sits between chunks, as the original's inserted embedding did.
_Piece = Union[str, tuple]


def _encode_text(text: str, tokenizer, reserved: set[int], where: str) -> list[int]:
    if not text:
        return []
    ids = tokenizer.encode(text, add_special_tokens=False)
    bad = sorted({i for i in ids if i in reserved})
    if bad:
        names = tokenizer.convert_ids_to_tokens(bad)
        raise EncodeError(f"{where}: text contains reserved token(s) {names} (added/special tokens are built "
                          f"from ids, never taken from the data): {text[:80]!r}")
    return ids


def _encode_chunk(pieces: Sequence[_Piece], tokenizer, reserved: set[int], where: str) -> list[int]:
    """One tokenizer call of the original: text next to an added token loses its whitespace on that side."""
    merged: list[_Piece] = []
    for piece in pieces:                 # adjacent text pieces are one string in the original's call
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        else:
            merged.append(piece)
    pieces = merged
    out: list[int] = []
    for i, piece in enumerate(pieces):
        if isinstance(piece, tuple):
            out += list(piece)
            continue
        text = piece
        if i > 0 and isinstance(pieces[i - 1], tuple):
            text = text.lstrip()
        if i + 1 < len(pieces) and isinstance(pieces[i + 1], tuple):
            text = text.rstrip()
        out += _encode_text(text, tokenizer, reserved, where)
    return out


def _reserved(tokenizer, token_ids) -> set[int]:
    ids = set(token_ids.new_token_ids)
    for special in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if special is not None:
            ids.add(special)
    # a chat template's own special tokens (e.g. Qwen2's <|im_end|> = eos) are markup there; _build refuses
    # them in the data text by name instead
    markup = template_of(token_ids).markup_tokens
    return ids - set(tokenizer.convert_tokens_to_ids(list(markup))) if markup else ids


def _build(turns: Sequence[Turn], num_media: int, tokenizer, token_ids, where: str, for_generation: bool):
    """-> (input_ids, labels, media_positions, signal_blocks[(modality, start)], prefix_length).

    prefix_length: ids of what the original's prompt_wrap prepended to the text ids (BOS, "### Human:", and with
    media "<Img>" + soft token(s)); model.max_length counts only the ids after it, as the original cut only the
    text ids."""
    if not turns:
        raise EncodeError(f"{where}: no turns")
    if turns[0].role != "human":
        raise EncodeError(f"{where}: the first turn must be 'human', got {turns[0].role!r}")
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.role != expected:
            raise EncodeError(f"{where}: turn {i} is {turn.role!r}, expected {expected!r} (turns alternate "
                              "human/gpt)")
    if for_generation and turns[-1].role != "human":
        raise EncodeError(f"{where}: a generation prompt must end with a human turn")

    template = template_of(token_ids)
    for i, turn in enumerate(turns):
        if found := [t for t in template.markup_tokens if t in turn.text]:
            raise EncodeError(f"{where}: turn {i} contains the chat template's token(s) {found} (the template "
                              f"adds them; they are never taken from the data): {turn.text[:80]!r}")
    reserved = _reserved(tokenizer, token_ids)
    start, end = (token_ids.media_start,), (token_ids.media_end,)
    bos = template.bos and token_ids.bos is not None     # Qwen2 has no BOS; a chat template may write its own
    input_ids: list[int] = [token_ids.bos] if bos else []
    labels: list[int] = [IGNORE] if bos else []
    media_positions: list[int] = []
    blocks: list[tuple[str, int]] = []
    prefix_length = 0

    def add(ids: list[int], supervised: bool) -> None:
        input_ids.extend(ids)
        labels.extend(ids if supervised else [IGNORE] * len(ids))

    def soft() -> None:
        media_positions.append(len(input_ids))
        input_ids.append(token_ids.pad)           # placeholder; the model writes input_proj(feature) here
        labels.append(IGNORE)

    for i, turn in enumerate(turns):
        if turn.role == "human":
            if i == 0:
                if num_media:
                    # "### Human: <Img>" | soft | ("</Img><Img>" | soft)* | "</Img> " + q + "\n### Assistant: "
                    add(_encode_chunk([template.first_human, start], tokenizer, reserved, where), False)
                    soft()
                    for _ in range(num_media - 1):
                        add(_encode_chunk([end, start], tokenizer, reserved, where), False)
                        soft()
                    prefix_length = len(input_ids)
                    add(_encode_chunk([end, " " + turn.text + template.assistant], tokenizer, reserved, where),
                        False)
                else:
                    add(_encode_chunk([template.first_human], tokenizer, reserved, where), False)
                    prefix_length = len(input_ids)
                    add(_encode_chunk([turn.text + template.assistant], tokenizer, reserved, where), False)
            else:
                add(_encode_chunk([template.later_human + turn.text + template.assistant], tokenizer, reserved,
                                  where), False)
        else:
            pieces: list[_Piece] = [turn.text]
            if turn.output_modality:
                if turn.output_modality not in token_ids.signal:
                    raise EncodeError(f"{where}: turn {i} has unknown output_modality {turn.output_modality!r}; "
                                      f"known: {', '.join(token_ids.signal)}")
                pieces.append(tuple(token_ids.signal[turn.output_modality]))
            pieces.append(template.turn_end)
            ids = _encode_chunk(pieces, tokenizer, reserved, where)
            if turn.output_modality:
                text_len = len(_encode_chunk(pieces[:2], tokenizer, reserved, where)) - \
                    len(token_ids.signal[turn.output_modality])
                blocks.append((turn.output_modality, len(input_ids) + text_len))
            add(ids, True)
    return input_ids, labels, media_positions, blocks, prefix_length


def encode(sample: Sample, tokenizer, token_ids, max_length: int, prompt: str | None = None) -> Encoded:
    """Sample -> Encoded (input_ids starting with BOS, unshifted labels, soft-token positions).

    prompt: the stage-1 instruction (cfg.train.prompt); it fills a first human turn whose text is empty, which is
        how pair readers express "caption this medium". Non-empty human text is kept as is.
    max_length: as the original's process_batch_stage_*: the text ids after the prompt_wrap prefix (BOS,
        "### Human:", <Img> + soft token(s)) are cut to this many tokens, so a sequence has at most
        prefix + max_length ids; a cut that would reach a signal block raises TruncatedSignalError (the dataset
        counts and skips it); a cut that leaves nothing supervised raises EncodeError.
    """
    where = sample.where
    turns = list(sample.turns)
    if prompt is not None and turns and turns[0].role == "human" and not turns[0].text.strip():
        turns[0] = Turn("human", prompt)
    for medium in sample.media:
        if medium.modality not in MODALITIES:
            raise EncodeError(f"{where}: unknown input modality {medium.modality!r}")
    input_ids, labels, media_positions, blocks, prefix_length = _build(turns, len(sample.media), tokenizer,
                                                                       token_ids, where, for_generation=False)
    block_modalities = [m for m, _ in blocks]
    target_modalities = [t.modality for t in sample.targets]
    if block_modalities != target_modalities:
        raise EncodeError(f"{where}: signal blocks {block_modalities} do not match the caption-embedding targets "
                          f"{target_modalities} (one target per block, in order)")
    limit = prefix_length + max_length          # the prefix (and so every soft token) is never cut
    if len(input_ids) > limit:
        for modality, position in blocks:
            last = position + MODALITIES[modality].num_signal_tokens - 1
            if last >= limit:
                raise TruncatedSignalError(
                    f"{where}: max_length {max_length} would cut the {modality} signal block at tokens "
                    f"{position}..{last} (sequence of {len(input_ids)} tokens, {prefix_length} of them the "
                    f"prompt prefix, which max_length does not count)")
        input_ids, labels = input_ids[:limit], labels[:limit]
    if all(label == IGNORE for label in labels):
        raise EncodeError(f"{where}: nothing to learn (no assistant tokens within max_length {max_length})")
    return Encoded(input_ids=input_ids, labels=labels, media_positions=media_positions, sample=sample,
                   signal_blocks=blocks)


def prompt_for_generation(prompt: str | Sequence[Turn], media: Sequence[Media], tokenizer, token_ids) -> Encoded:
    """The inference prompt with the training template: one BOS, media at the start of the first human turn,
    ending with "\\n### Assistant: " (trailing "▁" included, as the training chunks), all labels -100.

    prompt: the user's text, or a history of turns (human, gpt, ..., human); gpt turns of the history may carry
        output_modality, whose signal block is rebuilt from ids as in training.
    """
    turns = [Turn("human", prompt)] if isinstance(prompt, str) else list(prompt)
    sample = Sample(dataset="prompt", source="<prompt>", index=0, turns=turns, media=list(media))
    input_ids, _, media_positions, blocks, _ = _build(turns, len(sample.media), tokenizer, token_ids, sample.where,
                                                      for_generation=True)
    return Encoded(input_ids=input_ids, labels=[IGNORE] * len(input_ids), media_positions=media_positions,
                   sample=sample, signal_blocks=blocks)

