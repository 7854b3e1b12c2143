"""What every NExT-GPT record reader shares: the caption normalisation, RecordError, the read Context, and the
checked accessors for a record's fields, media names and embedding targets (readers.py reads files and pair
records, conversation_records.py the conversation formats).

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextgpt.data.types import Media, Target
from nextgpt.store.files import item_path

_CAPTION_PUNCTUATION = re.compile(r"[\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")


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


def text_value(value: Any, what: str, index: int, ctx: Context, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RecordError(ctx.source, index, f"{what}: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(ctx.source, index, f"{what}: empty")
    return value


def required_field(record: dict, key: str, index: int, ctx: Context) -> Any:
    if key not in record:
        raise RecordError(ctx.source, index, f"missing field {key!r}")
    return record[key]


def media_name(value: Any, what: str, index: int, ctx: Context) -> str:
    name = text_value(value, what, index, ctx).strip()
    if Path(name).name in ("", ".", ".."):
        raise RecordError(ctx.source, index, f"{what}: {name!r} is not a file name")
    return name


def media_item(modality: str, name: str, ctx: Context) -> Media:
    return Media(modality=modality, path=str(ctx.media_dirs[modality] / name), name=Path(name).name)


def target_item(modality: str, embed_name: str, caption: str, ctx: Context) -> Target:
    # Embedding names appear with and without ".npy" (generation files: "x.jpg.npy"; t2x mm_name: "x.wav");
    # strip exactly one ".npy" suffix (the original's strip('.npy') mangled names, defect §7.17).
    name = Path(embed_name).name
    if name.endswith(".npy"):
        name = name[: -len(".npy")]
    return Target(modality=modality, embed_path=str(item_path(ctx.embed_dir, name)), caption=caption,
                  media_path=str(ctx.media_dirs[modality] / name) if modality in ctx.media_dirs else "")


def check_modality(found: str, index: int, ctx: Context) -> None:
    if ctx.modality is not None and ctx.role in ("enc", "dec") and found != ctx.modality:
        raise RecordError(ctx.source, index, f"{found} record in the {ctx.modality} dataset {ctx.dataset}")
