"""Readers for the two conversation formats (see readers.py's docstring):

  conversations  new layout: <image>/<video>/<audio> placeholders in the text, names in input_<m> /
                 <m>_caption_embeddings / output_<m>, captions in <m>_captions
  conversation   legacy (t2x / llava / alpaca): turn-level input_modality / output_modality, mm_name or image_name

Each returns a Sample or raises RecordError naming file, record index and the reason.
"""

from __future__ import annotations

import re
from typing import Any

from nextgpt.data.records import (Context, RecordError, check_modality, media_item, media_name, normalize_caption,
                                  required_field, target_item, text_value)
from nextgpt.data.types import Media, Sample, Target, Turn
from nextgpt.modalities import MODALITIES

_PLACEHOLDERS = {m.placeholder: m.name for m in MODALITIES.values()}
_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in _PLACEHOLDERS))


def _as_list(value: Any, what: str, index: int, ctx: Context) -> list[str]:
    """A field that holds one name/caption or a list of them."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [text_value(v, what, index, ctx, allow_empty=True) for v in items]


def _strip_placeholders(text: str) -> str:
    """Remove <image>/<video>/<audio> and the whitespace (e.g. the newline) around each; text without one is
    kept as written (a comprehension answer is the raw caption, normalised as the original's process_caption)."""
    if not _PLACEHOLDER_RE.search(text):
        return text
    return re.sub(r"\s*(" + _PLACEHOLDER_RE.pattern + r")\s*", " ", text).strip()


def _turn_list(record: dict, key: str, index: int, ctx: Context) -> list[dict]:
    turns = required_field(record, key, index, ctx)
    if not isinstance(turns, list) or not turns:
        raise RecordError(ctx.source, index, f"{key}: expected a non-empty list of turns")
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(ctx.source, index, f"{key}[{t}]: expected an object")
        for k in ("from", "value"):
            if k not in turn:
                raise RecordError(ctx.source, index, f"{key}[{t}]: missing field {k!r}")
        if turn["from"] not in ("human", "gpt"):
            raise RecordError(ctx.source, index, f"{key}[{t}].from: {turn['from']!r}; expected human or gpt")
        text_value(turn["value"], f"{key}[{t}].value", index, ctx, allow_empty=True)
    for t, turn in enumerate(turns):
        expected = "human" if t % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise RecordError(ctx.source, index, f"{key}[{t}] is a {turn['from']} turn; turns must alternate "
                              "human, gpt, human, ...")
    if len(turns) < 2:
        raise RecordError(ctx.source, index, f"{key}: no gpt turn (nothing to learn)")
    return turns


def _unique_media(media: list[Media]) -> list[Media]:
    # A file that repeats the same medium per turn (preprocessed_llava.json: input_image repeated per <image>)
    # gives one Media; distinct media are kept in order (the encoder places them all at the start of turn 0).
    return list({(m.modality, m.name): m for m in media}.values())


def parse_conversations(record: dict, index: int, ctx: Context) -> Sample:
    """New-layout record: placeholders in the text, names in input_<m> / <m>_caption_embeddings / output_<m>."""
    raw_turns = _turn_list(record, "conversations", index, ctx)
    inputs = {m.name: _as_list(record.get(m.input_key), m.input_key, index, ctx) for m in MODALITIES.values()}
    embeds = {m.name: _as_list(record.get(m.embeddings_key, record.get(m.output_key)),
                               m.embeddings_key, index, ctx) for m in MODALITIES.values()}
    captions = {m.name: _as_list(record.get(m.captions_key), m.captions_key, index, ctx)
                for m in MODALITIES.values()}
    used_in = {m: 0 for m in MODALITIES}
    used_out = {m: 0 for m in MODALITIES}
    media: list[Media] = []
    targets: list[Target] = []
    turns: list[Turn] = []
    for t, turn in enumerate(raw_turns):
        value = turn["value"]
        found = [_PLACEHOLDERS[p] for p in _PLACEHOLDER_RE.findall(value)]
        text = _strip_placeholders(value)
        if turn["from"] == "human":
            for m in found:
                names = inputs[m]
                if used_in[m] >= len(names):
                    key = MODALITIES[m].input_key
                    raise RecordError(ctx.source, index, f"conversations[{t}]: {MODALITIES[m].placeholder} number "
                                      f"{used_in[m] + 1} has no name in {key!r} ({len(names)} given)")
                media.append(media_item(m, media_name(names[used_in[m]], MODALITIES[m].input_key, index, ctx), ctx))
                used_in[m] += 1
            turns.append(Turn("human", text))
            continue
        declared = turn.get("output_modality")
        if declared in MODALITIES and declared not in found:
            found.append(declared)          # gpt turn marked by output_modality without a placeholder
        elif declared not in (None, "text", "") and declared not in MODALITIES:
            raise RecordError(ctx.source, index, f"conversations[{t}].output_modality: {declared!r}; known: "
                              f"text, {', '.join(MODALITIES)}")
        if len(found) > 1:
            raise RecordError(ctx.source, index, f"conversations[{t}]: {len(found)} output placeholders in one gpt "
                              "turn; one signal block per turn is supported")
        output = found[0] if found else None
        if output is not None:
            k = used_out[output]
            if k >= len(embeds[output]):
                spec = MODALITIES[output]
                raise RecordError(ctx.source, index, f"conversations[{t}]: output {spec.placeholder} number {k + 1} "
                                  f"has no entry in {spec.embeddings_key!r} / {spec.output_key!r}")
            caption = captions[output][k] if k < len(captions[output]) else turn.get("caption") or ""
            if not isinstance(caption, str):
                raise RecordError(ctx.source, index, f"caption of output {k + 1}: expected a string")
            embed_name = media_name(embeds[output][k], MODALITIES[output].embeddings_key, index, ctx)
            targets.append(target_item(output, embed_name, normalize_caption(caption), ctx))
            used_out[output] += 1
        if ctx.role == "enc" and output is None:
            text = normalize_caption(text)  # a comprehension answer is the caption
        turns.append(Turn("gpt", text, output))
    for m, names in inputs.items():
        if names and used_in[m] == 0:
            # names given but no placeholder in the text: the medium still belongs to the first human turn
            media += [media_item(m, media_name(n, MODALITIES[m].input_key, index, ctx), ctx) for n in names]
        elif used_in[m] < len(names):
            raise RecordError(ctx.source, index, f"{MODALITIES[m].input_key!r} names {len(names)} media but the text "
                              f"has {used_in[m]} {MODALITIES[m].placeholder}")
        if used_out[m] < len(embeds[m]):
            spec = MODALITIES[m]
            raise RecordError(ctx.source, index, f"{spec.embeddings_key!r} names {len(embeds[m])} embeddings but the "
                              f"gpt turns have {used_out[m]} {spec.placeholder}")
    media = _unique_media(media)
    for m in media:
        check_modality(m.modality, index, ctx)
    for target in targets:
        check_modality(target.modality, index, ctx)
    return Sample(dataset=ctx.dataset, source=ctx.source, index=index, turns=turns, media=media, targets=targets)


def parse_legacy(record: dict, index: int, ctx: Context) -> Sample:
    """Legacy record (t2x / llava / alpaca): turn-level input_modality / output_modality, mm_name or image_name."""
    raw_turns = _turn_list(record, "conversation", index, ctx)
    media: list[Media] = []
    targets: list[Target] = []
    turns: list[Turn] = []
    first = raw_turns[0]
    input_modality = first.get("input_modality")
    if input_modality is None and any(MODALITIES["image"].placeholder in t["value"] for t in raw_turns
                                      if t["from"] == "human"):
        input_modality = "image"            # LLaVA text carries <image> even where input_modality is absent
    if input_modality in MODALITIES:
        spec = MODALITIES[input_modality]
        key = spec.pair_key if spec.pair_key in record else "image_name"   # the legacy files say image_name
        media.append(media_item(input_modality, media_name(required_field(record, key, index, ctx), key, index, ctx), ctx))
    elif input_modality not in (None, "text"):
        raise RecordError(ctx.source, index, f"conversation[0].input_modality: {input_modality!r}; known: text, "
                          f"{', '.join(MODALITIES)}")
    for t, turn in enumerate(raw_turns):
        text = turn["value"]            # verbatim, "<image>" included: the original tokenised it as written
        if turn["from"] == "human":
            turns.append(Turn("human", text))
            continue
        output = turn.get("output_modality")
        if output in (None, "", "text"):
            turns.append(Turn("gpt", text))
            continue
        if output not in MODALITIES:
            raise RecordError(ctx.source, index, f"conversation[{t}].output_modality: {output!r}; known: text, "
                              f"{', '.join(MODALITIES)}")
        if targets:
            raise RecordError(ctx.source, index, "more than one output block but a legacy record has one mm_name")
        # The legacy reader takes the embedding from mm_name; the shipped construction script wrote the same
        # name as image_name (a defect of the released files), so that is accepted as a fallback.
        key = "mm_name" if "mm_name" in record or "image_name" not in record else "image_name"
        embed_name = media_name(required_field(record, key, index, ctx), key, index, ctx)
        caption = turn.get("caption", "")
        if not isinstance(caption, str):
            raise RecordError(ctx.source, index, f"conversation[{t}].caption: expected a string")
        targets.append(target_item(output, embed_name, normalize_caption(caption), ctx))
        turns.append(Turn("gpt", text, output))
    return Sample(dataset=ctx.dataset, source=ctx.source, index=index, turns=turns, media=media, targets=targets)
