"""The original NExT-GPT checkpoint layout: one `pytorch_model.pt` (the released `7b_tiva_v0` file) holding the
projectors as `llama_proj.*` / `gen_text_hidden_fcs*.0.*`, the whole resized embedding and lm_head matrices, and
in stage 3 the LoRA weights under PEFT-wrapped names.

It maps onto our delta-state names (nextgpt.checkpoint.delta) through LEGACY_KEY_MAP, the one explicit key map used for
both import and export; loading is as strict as for our delta folders.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import torch

from nextgpt.checkpoint.layout import LEGACY_FILE
from nextgpt.checkpoint.delta_state import apply_delta_state, delta_state
from nextgpt.io import atomic_write_bytes, first_line
from nextgpt.model import llm as llm_utils

logger = logging.getLogger("nextgpt")

# (original pytorch_model.pt name, our delta-state name). "{rest}" is any dotted remainder, the same on both sides.
# Embedding keys come in two spellings: without LoRA (stages 1-2) and PEFT-wrapped (stage 3); export picks the one
# that matches whether the model has LoRA.
LEGACY_KEY_MAP: list[tuple[str, str]] = [
    ("llama_proj.{rest}", "input_proj.{rest}"),
    ("gen_text_hidden_fcs.0.{rest}", "output_proj.image.{rest}"),
    ("gen_text_hidden_fcs_video.0.{rest}", "output_proj.video.{rest}"),
    ("gen_text_hidden_fcs_audio.0.{rest}", "output_proj.audio.{rest}"),
    ("llama_model.model.embed_tokens.weight", "token_rows.embed_tokens"),
    ("llama_model.lm_head.weight", "token_rows.lm_head"),
    ("llama_model.base_model.model.model.embed_tokens.weight", "token_rows.embed_tokens"),
    ("llama_model.base_model.model.lm_head.weight", "token_rows.lm_head"),
    ("llama_model.base_model.model.{rest}.lora_A.default.weight", "lora.base_model.model.{rest}.lora_A.weight"),
    ("llama_model.base_model.model.{rest}.lora_B.default.weight", "lora.base_model.model.{rest}.lora_B.weight"),
]
_LORA_LEGACY_EMBEDDINGS = {"token_rows.embed_tokens": "llama_model.base_model.model.model.embed_tokens.weight",
                           "token_rows.lm_head": "llama_model.base_model.model.lm_head.weight"}


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{rest}"), "(?P<rest>.+)") + "$")


def _translate(name: str, source: int) -> list[str]:
    """Every name `name` maps to, going from side `source` (0 legacy, 1 ours) to the other side."""
    out = []
    for pair in LEGACY_KEY_MAP:
        match = _pattern(pair[source]).match(name)
        if match:
            out.append(pair[1 - source].format(**match.groupdict()))
    return out


def legacy_to_delta_state(legacy: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Rename the original's keys through LEGACY_KEY_MAP; unknown keys and duplicates are errors."""
    state: dict[str, torch.Tensor] = {}
    unknown, duplicate = [], []
    for key, value in legacy.items():
        names = _translate(key, 0)
        if not names:
            unknown.append(key)
            continue
        if names[0] in state:
            duplicate.append(names[0])
        state[names[0]] = value.detach() if isinstance(value, torch.Tensor) else value
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} key(s) outside the NExT-GPT layout: {', '.join(unknown[:20])}")
    if duplicate:
        raise ValueError(f"{where}: several keys map onto {', '.join(sorted(set(duplicate)))}")
    return state


def import_legacy(model, source: str | os.PathLike | dict, allow_missing=()) -> set[str]:
    """Load an original pytorch_model.pt (stage 1/2 keys, or stage-3 PEFT-wrapped names) strictly -> groups."""
    if isinstance(source, dict):
        legacy, where = source, "legacy state dict"
    else:
        where = str(source)
        try:
            legacy = torch.load(where, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"{where}: not found") from None
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
            # a torn zip -> RuntimeError, a cut pickle -> EOFError, random bytes -> UnpicklingError
            raise ValueError(f"{where}: not a readable torch checkpoint ({first_line(e)})") from None
        if not isinstance(legacy, dict):
            raise ValueError(f"{where}: expected a dict of tensors, got {type(legacy).__name__}")
    state = legacy_to_delta_state(legacy, where)
    groups = apply_delta_state(model, state, where, allow_missing)
    logger.info("imported original checkpoint %s (%s)", where, ", ".join(sorted(groups)))
    return groups


def legacy_state(model, dtype: torch.dtype | None = torch.float16) -> "OrderedDict[str, torch.Tensor]":
    """The model's delta in the original's key layout: every projector, whole token matrices, LoRA when on."""
    groups = {"input_proj", "token_rows", "lora"} | {f"output_proj.{m}" for m in model.output_proj}
    state = delta_state(model, groups, full_token_matrices=True)
    lora = llm_utils.has_lora(model.llm)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        names = _translate(key, 1)
        if key in _LORA_LEGACY_EMBEDDINGS:
            names = [_LORA_LEGACY_EMBEDDINGS[key]] if lora else [n for n in names
                                                                 if n not in _LORA_LEGACY_EMBEDDINGS.values()]
        if not names:
            raise ValueError(f"{key} has no place in the original layout (only image/video/audio projectors "
                             "in transformer mode export)")
        out[names[0]] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return out


def export_legacy(model, path: str | os.PathLike, dtype: torch.dtype | None = torch.float16) -> Path:
    """Write the original's pytorch_model.pt layout (atomic), e.g. for --export-legacy."""
    path = Path(path)
    if path.is_dir() or path.suffix == "":
        path = path / LEGACY_FILE
    buffer = io.BytesIO()
    torch.save(legacy_state(model, dtype), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path
