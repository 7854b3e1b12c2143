"""Readers for every NExT-GPT data format -> `Sample` (nextgpt.data.types).

Three record shapes cover all the released files; the shape is told from the record's keys:

  pair           {image_name|video_name|audio_name, caption}                 cc3m.json, webvid.json, audiocap.json
  conversations  {conversations: [{from, value}], input_<m>?, <m>_captions?, <m>_caption_embeddings?, output_<m>?}
                 with <image>/<video>/<audio> placeholders in the text       *_comprehension.json, *_generation.json,
                 *_instruction_tuning.json, mosit_instruction_tuning.json, preprocessed_llava.json, preprocessed_alpaca.json
  conversation   {conversation: [{from, value, input_modality?, output_modality?, caption?}], mm_name?, image_name?}
                 (legacy)                                                    *_t2x.json, llava.json, alpaca.json

How a record becomes a Sample depends on the catalog role:
  pair, enc          [human: cfg.train.prompt, gpt: caption], one Media (the encoder puts it at the start of turn 0)
  pair, dec          [human: caption, gpt: caption + signal block], one Target (<embed_dir>/<media name>.npy)
  conversation(s)    the file's own turns; input placeholders / `input_modality` -> Media; output placeholders /
                     gpt `output_modality` -> Turn.output_modality + one Target per signal block.

Caption normalisation (`normalize_caption`, exactly the original's process_caption: lower-case; each of "()*#:;~
-> space; runs of 2+ whitespace characters -> one space (a single newline or tab stays); trailing newlines and
then spaces on both ends removed (a leading newline stays)) is applied to every CAPTION: the caption of a pair record (both as the text and as
the target), the answer of a comprehension record, and every caption an embedding is computed from
(`<m>_captions`, a legacy gpt turn's `caption`). `process_embeddings.py` embeds `Target.caption`, i.e. the same
normalised string the model is trained to write. This fixes the original's defect §7.11 (it trained on the
normalised caption but embedded the raw one). Free-form conversation text (instructions, chat answers) is
kept as written. Legacy `conversation` records keep their text verbatim, LLaVA's literal "<image>" included, as the
original's build_one_instance_stage_3 fed it to the tokenizer; new-layout `conversations` records lose their
placeholders, which mark where the media go (the medium itself is placed at the start of the first human turn).

Bad records raise `RecordError` (a ValueError) naming file, record index and the reason; with `skip_bad` they are
collected in `ReadResult.errors` instead and the record is left out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nextgpt.data.types import Media, Sample, Target, Turn
from nextgpt.embed_cache import item_path
from nextgpt.modalities import MODALITIES

ROLES = ("enc", "dec", "instruction")
_CAPTION_PUNCTUATION = re.compile(r"[\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")
_PLACEHOLDERS = {m.placeholder: m.name for m in MODALITIES.values()}
_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in _PLACEHOLDERS))


def normalize_caption(text: str) -> str:
    """The original process_caption, step for step: lower-case, `"()*#:;~` -> space, runs of 2+ whitespace ->
    one space (so a single "\\n" or "\\t" stays), trailing "\\n" removed, then spaces (only) stripped on both ends
    (so a leading "\\n" stays)."""
    text = _WHITESPACE_RUN.sub(" ", _CAPTION_PUNCTUATION.sub(" ", text.lower()))
    return text.rstrip("\n").strip(" ")


class RecordError(ValueError):
    """One bad record: `<file> record <index>: <reason>`."""

    def __init__(self, source: str | Path, index: int, reason: str):
        self.source, self.index, self.reason = str(source), index, reason
        super().__init__(f"{source} record {index}: {reason}")


@dataclass
class ReadResult:
    samples: list[Sample]
    errors: list[RecordError] = field(default_factory=list)
    records: int = 0                        # records in the file (good + bad)


@dataclass(frozen=True)
class Context:
    """What a record needs besides itself."""
    dataset: str
    source: str
    role: str                               # enc | dec | instruction
    prompt: str                             # stage-1 instruction for pair records in the enc role
    embed_dir: Path
    media_dirs: dict[str, Path]
    modality: str | None = None             # expected modality of pair / comprehension / generation records


def load_records(path: str | Path) -> list[Any]:
    """The JSON list of a data file (a missing file, bad JSON or a non-list top level -> one-line error)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: data file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def record_format(record: Any, role: str | None = None) -> str:
    """'pair' | 'conversations' | 'conversation' (see the module docstring); ValueError when none fits.

    A record naming a medium (image_name ...) without a conversation is a pair record in the enc / dec roles, so
    a missing caption is reported as exactly that."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    if "conversations" in record:
        return "conversations"
    if "conversation" in record:
        return "conversation"
    named = any(m.pair_key in record for m in MODALITIES.values())
    if named and ("caption" in record or role in ("enc", "dec")):
        return "pair"
    if role == "instruction":
        raise ValueError(f"missing field 'conversations' (new layout) or 'conversation' (legacy); keys {sorted(record)}")
    pair_keys = "/".join(m.pair_key for m in MODALITIES.values())
    raise ValueError(f"unknown record format (keys {sorted(record)}); expected 'conversations', 'conversation' "
                     f"or {pair_keys} + 'caption'")


def read_file(path: str | Path, *, dataset: str, role: str, embed_dir: str | Path, prompt: str = "",
              media_dirs: dict[str, Path] | None = None, modality: str | None = None,
              skip_bad: bool = False) -> ReadResult:
    """Every record of one JSON file as a Sample. Bad records raise RecordError, or are collected with skip_bad."""
    from nextgpt.data.catalog import default_media_dirs, spelled_path

    if role not in ROLES:
        raise ValueError(f"role {role!r}; allowed: {', '.join(ROLES)}")
    path = spelled_path(path)           # a command-line path may say T-X_pair_data for T_X_pair_data or back
    dirs = default_media_dirs(path)
    dirs.update({m: Path(d) for m, d in (media_dirs or {}).items()})
    ctx = Context(dataset=dataset, source=str(path), role=role, prompt=prompt, embed_dir=Path(embed_dir),
                  media_dirs=dirs, modality=modality)
    records = load_records(path)
    result = ReadResult(samples=[], records=len(records))
    for index, record in enumerate(records):
        try:
            result.samples.append(parse_record(record, index, ctx))
        except RecordError as e:
            if not skip_bad:
                raise
            result.errors.append(e)
    return result


def read_entry(entry, prompt: str = "", skip_bad: bool = False) -> ReadResult:
    """read_file for a catalog entry (nextgpt.data.catalog.CatalogEntry)."""
    return read_file(entry.file, dataset=entry.name, role=entry.role, embed_dir=entry.embed_dir, prompt=prompt,
                     media_dirs=entry.media_dirs, modality=entry.modality, skip_bad=skip_bad)


def read_dataset(cfg, name: str, skip_bad: bool | None = None, log=print) -> list[Sample]:
    """Samples of catalog dataset `name` under cfg.data.root. Skipped records (cfg.data.skip_bad_records) are
    counted in one warning line."""
    from nextgpt.data.catalog import resolve

    entry = resolve(cfg, name)
    skip = cfg.data.skip_bad_records if skip_bad is None else skip_bad
    result = read_entry(entry, prompt=cfg.train.prompt, skip_bad=skip)
    if result.errors:
        log(f"warning: {name}: skipped {len(result.errors)} of {result.records} bad records "
            f"(first: {result.errors[0]})")
    if not result.samples:
        raise ValueError(f"{entry.file}: dataset {name} has no usable records")
    return result.samples


# ----------------------------------------------------------------------------------------------------------------
# One record

def parse_record(record: Any, index: int, ctx: Context) -> Sample:
    try:
        kind = record_format(record, ctx.role)
    except ValueError as e:
        raise RecordError(ctx.source, index, str(e)) from None
    parse = {"pair": _parse_pair, "conversations": _parse_conversations, "conversation": _parse_legacy}[kind]
    return parse(record, index, ctx)


def _text(value: Any, what: str, index: int, ctx: Context, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RecordError(ctx.source, index, f"{what}: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(ctx.source, index, f"{what}: empty")
    return value


def _field(record: dict, key: str, index: int, ctx: Context) -> Any:
    if key not in record:
        raise RecordError(ctx.source, index, f"missing field {key!r}")
    return record[key]


def _media_name(value: Any, what: str, index: int, ctx: Context) -> str:
    name = _text(value, what, index, ctx).strip()
    if Path(name).name in ("", ".", ".."):
        raise RecordError(ctx.source, index, f"{what}: {name!r} is not a file name")
    return name


def _media(modality: str, name: str, ctx: Context) -> Media:
    return Media(modality=modality, path=str(ctx.media_dirs[modality] / name), name=Path(name).name)


def _target(modality: str, embed_name: str, caption: str, ctx: Context) -> Target:
    # Embedding names appear with and without ".npy" (generation files: "x.jpg.npy"; t2x mm_name: "x.wav");
    # strip exactly one ".npy" suffix (the original's strip('.npy') mangled names, defect §7.17).
    name = Path(embed_name).name
    if name.endswith(".npy"):
        name = name[: -len(".npy")]
    return Target(modality=modality, embed_path=str(item_path(ctx.embed_dir, name)), caption=caption)


def _check_modality(found: str, index: int, ctx: Context) -> None:
    if ctx.modality is not None and ctx.role in ("enc", "dec") and found != ctx.modality:
        raise RecordError(ctx.source, index, f"{found} record in the {ctx.modality} dataset {ctx.dataset}")


def _parse_pair(record: dict, index: int, ctx: Context) -> Sample:
    present = [m for m in MODALITIES.values() if m.pair_key in record]
    if ctx.modality is not None and ctx.modality in MODALITIES:
        want = MODALITIES[ctx.modality]
        if want not in present:
            raise RecordError(ctx.source, index, f"missing field {want.pair_key!r}")
        modality = want
    elif len(present) == 1:
        modality = present[0]
    else:
        raise RecordError(ctx.source, index, f"ambiguous pair record: {', '.join(m.pair_key for m in present)}")
    name = _media_name(record[modality.pair_key], modality.pair_key, index, ctx)
    caption = normalize_caption(_text(_field(record, "caption", index, ctx), "caption", index, ctx))
    if not caption.strip():
        raise RecordError(ctx.source, index, "caption: empty after normalisation")
    base = dict(dataset=ctx.dataset, source=ctx.source, index=index)
    if ctx.role == "enc":
        return Sample(**base, turns=[Turn("human", ctx.prompt), Turn("gpt", caption)],
                      media=[_media(modality.name, name, ctx)])
    if ctx.role == "dec":
        return Sample(**base, turns=[Turn("human", caption), Turn("gpt", caption, modality.name)],
                      targets=[_target(modality.name, name, caption, ctx)])
    raise RecordError(ctx.source, index, "a caption pair record cannot be used as instruction data "
                                         "(catalog role must be enc or dec)")


def _as_list(value: Any, what: str, index: int, ctx: Context) -> list[str]:
    """A field that holds one name/caption or a list of them."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [_text(v, what, index, ctx, allow_empty=True) for v in items]


def _strip_placeholders(text: str) -> str:
    """Remove <image>/<video>/<audio> and the whitespace (e.g. the newline) around each; text without one is
    kept as written (a comprehension answer is the raw caption, normalised as the original's process_caption)."""
    if not _PLACEHOLDER_RE.search(text):
        return text
    return re.sub(r"\s*(" + _PLACEHOLDER_RE.pattern + r")\s*", " ", text).strip()


def _turn_list(record: dict, key: str, index: int, ctx: Context) -> list[dict]:
    turns = _field(record, key, index, ctx)
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
        _text(turn["value"], f"{key}[{t}].value", index, ctx, allow_empty=True)
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


def _parse_conversations(record: dict, index: int, ctx: Context) -> Sample:
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
                media.append(_media(m, _media_name(names[used_in[m]], MODALITIES[m].input_key, index, ctx), ctx))
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
            embed_name = _media_name(embeds[output][k], MODALITIES[output].embeddings_key, index, ctx)
            targets.append(_target(output, embed_name, normalize_caption(caption), ctx))
            used_out[output] += 1
        if ctx.role == "enc" and output is None:
            text = normalize_caption(text)  # a comprehension answer is the caption
        turns.append(Turn("gpt", text, output))
    for m, names in inputs.items():
        if names and used_in[m] == 0:
            # names given but no placeholder in the text: the medium still belongs to the first human turn
            media += [_media(m, _media_name(n, MODALITIES[m].input_key, index, ctx), ctx) for n in names]
        elif used_in[m] < len(names):
            raise RecordError(ctx.source, index, f"{MODALITIES[m].input_key!r} names {len(names)} media but the text "
                              f"has {used_in[m]} {MODALITIES[m].placeholder}")
        if used_out[m] < len(embeds[m]):
            spec = MODALITIES[m]
            raise RecordError(ctx.source, index, f"{spec.embeddings_key!r} names {len(embeds[m])} embeddings but the "
                              f"gpt turns have {used_out[m]} {spec.placeholder}")
    media = _unique_media(media)
    for m in media:
        _check_modality(m.modality, index, ctx)
    for target in targets:
        _check_modality(target.modality, index, ctx)
    return Sample(dataset=ctx.dataset, source=ctx.source, index=index, turns=turns, media=media, targets=targets)


def _parse_legacy(record: dict, index: int, ctx: Context) -> Sample:
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
        media.append(_media(input_modality, _media_name(_field(record, key, index, ctx), key, index, ctx), ctx))
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
        embed_name = _media_name(_field(record, key, index, ctx), key, index, ctx)
        caption = turn.get("caption", "")
        if not isinstance(caption, str):
            raise RecordError(ctx.source, index, f"conversation[{t}].caption: expected a string")
        targets.append(_target(output, embed_name, normalize_caption(caption), ctx))
        turns.append(Turn("gpt", text, output))
    return Sample(dataset=ctx.dataset, source=ctx.source, index=index, turns=turns, media=media, targets=targets)
