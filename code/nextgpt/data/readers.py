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

Caption normalisation (records.normalize_caption) is applied to every CAPTION; records.py says where and why.

Bad records raise `RecordError` (a ValueError) naming file, record index and the reason; with `skip_bad` they are
collected in `ReadResult.errors` instead and the record is left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nextgpt.data.conversation_records import parse_conversations, parse_legacy
from nextgpt.data.records import (Context, RecordError, media_item, media_name, normalize_caption, required_field,
                                  target_item, text_value)
from nextgpt.data.types import Sample, Turn
from nextgpt.modalities import MODALITIES

ROLES = ("enc", "dec", "instruction")


@dataclass
class ReadResult:
    samples: list[Sample]
    errors: list[RecordError] = field(default_factory=list)
    records: int = 0                        # records in the file (good + bad)


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
    parse = {"pair": _parse_pair, "conversations": parse_conversations, "conversation": parse_legacy}[kind]
    return parse(record, index, ctx)


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
    name = media_name(record[modality.pair_key], modality.pair_key, index, ctx)
    caption = normalize_caption(text_value(required_field(record, "caption", index, ctx), "caption", index, ctx))
    if not caption.strip():
        raise RecordError(ctx.source, index, "caption: empty after normalisation")
    base = dict(dataset=ctx.dataset, source=ctx.source, index=index)
    if ctx.role == "enc":
        return Sample(**base, turns=[Turn("human", ctx.prompt), Turn("gpt", caption)],
                      media=[media_item(modality.name, name, ctx)])
    if ctx.role == "dec":
        return Sample(**base, turns=[Turn("human", caption), Turn("gpt", caption, modality.name)],
                      targets=[target_item(modality.name, name, caption, ctx)])
    raise RecordError(ctx.source, index, "a caption pair record cannot be used as instruction data "
                                         "(catalog role must be enc or dec)")

