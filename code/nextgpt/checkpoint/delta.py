"""Delta checkpoints: only what is not in the pretrained Vicuna / ImageBind / decoders, loaded strictly.

A delta folder holds
    delta.safetensors   input_proj.*, output_proj.<modality>.*, token_rows.embed_tokens, token_rows.lm_head
                        (the 38 new rows (38, D), or whole (V, D) matrices for token_rows=all or after a whole
                        matrix was loaded); only the groups trained in this run or loaded into the model
                        (model.delta_groups), plus the token rows always (the resize draws them at random)
    adapter/            LoRA in PEFT format (PeftModel.from_pretrained on the resized Vicuna loads it), when LoRA
                        is on and trained or loaded
    tokenizer files     tokenizer.json, tokenizer_config.json, ... (with the 38 tokens)
    config.yaml         the resolved config
    meta.json           stage, step, token ids, base fingerprint (nextgpt.checkpoint.fingerprint: load_delta refuses another
                        base unless train.allow_other_base), library versions, sha256 of every file (written last)

Internally every delta tensor has one name (the "delta state"): the keys above plus `lora.<PEFT key>` for LoRA.
The original's pytorch_model.pt maps onto the same names (nextgpt.checkpoint.legacy); load_checkpoint takes either.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from nextgpt.checkpoint.adapter_card import finish_adapter
from nextgpt.checkpoint.delta_state import apply_delta_state, delta_state, group_of
from nextgpt.checkpoint.fingerprint import BaseMismatchError, base_fingerprint, check_same_base
from nextgpt.checkpoint.layout import (ADAPTER_DIR, CONFIG_FILE, DELTA_FILE, LATEST_FILE, LEGACY_FILE,  # noqa: F401
                                       META_FILE, locate, resolve_checkpoint)
from nextgpt.checkpoint.legacy import import_legacy
from nextgpt.io import atomic_dir, atomic_write_bytes, atomic_write_text, first_line, read_json, sha256_file
from nextgpt.model import llm as llm_utils

logger = logging.getLogger("nextgpt")

# ----------------------------------------------------------------------------------------------------------------
# Delta folders

def _versions() -> dict[str, str]:
    import platform

    import peft
    import safetensors
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "safetensors": safetensors.__version__}


def save_delta(model, out_dir: str | os.PathLike, cfg=None, meta: dict | None = None, atomic: bool = False) -> Path:
    """Write the delta folder (see module doc) into out_dir.

    Every file is written atomically and meta.json last. atomic=True writes the whole folder under a temporary
    name and renames it into place (replacing an old one); leave it False when out_dir is already the temporary
    folder of a caller's atomic_dir (e.g. a training checkpoint that also holds state/).
    """
    out_dir = Path(out_dir)
    if atomic:
        with atomic_dir(out_dir) as tmp:
            _write_delta(model, tmp, cfg, meta)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_delta(model, out_dir, cfg, meta)
    return out_dir


def _write_delta(model, out_dir: Path, cfg, meta: dict | None) -> None:
    from safetensors.torch import save

    cfg = cfg or model.cfg
    state = delta_state(model)
    lora = {k: v for k, v in state.items() if k.startswith("lora.")}
    tensors = {k: v for k, v in state.items() if not k.startswith("lora.")}
    atomic_write_bytes(out_dir / DELTA_FILE, save(tensors, metadata={"format": "nextgpt-delta"}))
    if lora:
        with atomic_dir(out_dir / ADAPTER_DIR) as tmp:
            model.llm.save_pretrained(str(tmp), save_embedding_layers=False)
            # a model card and no absolute paths (nextgpt.checkpoint.adapter_card)
            finish_adapter(tmp, cfg, cfg.train.stage, len(model.tokenizer) if model.tokenizer is not None else 0,
                           len(model.token_ids.new_token_ids))
    elif (out_dir / ADAPTER_DIR).exists():
        shutil.rmtree(out_dir / ADAPTER_DIR)
    if model.tokenizer is not None:
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer.") as tmp:
            model.tokenizer.save_pretrained(tmp)
            for f in Path(tmp).iterdir():
                os.replace(f, out_dir / f.name)
    atomic_write_text(out_dir / CONFIG_FILE, cfg.dump())
    files = {str(p.relative_to(out_dir)): sha256_file(p) for p in sorted(out_dir.rglob("*"))
             if p.is_file() and p.name != META_FILE and not p.name.startswith(".")}
    record = {
        "stage": cfg.train.stage,
        **(meta or {}),
        "groups": sorted({group_of(k) for k in state}),
        "token_rows": model.token_rows,
        "full_token_matrices": bool(model.full_token_matrices),
        "new_token_ids": list(model.token_ids.new_token_ids),
        "base": base_fingerprint(cfg),          # what load_delta compares (nextgpt.checkpoint.fingerprint)
        "versions": _versions(),
        "files": files,
    }
    atomic_write_text(out_dir / META_FILE, json.dumps(record, indent=2) + "\n")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors.torch.load_file with every failure as one line naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # a bad header raises SafetensorError
        raise ValueError(f"{path}: unreadable safetensors file ({first_line(e)})") from None


def load_delta(model, path: str | os.PathLike, allow_missing=()) -> dict:
    """Strictly load a delta folder (or the one `<path>/latest` names) -> its meta.json (plus "path").

    allow_missing: groups that may be absent (input_proj, output_proj[.<modality>], token_rows, lora), e.g. the
    ones a new stage is about to train; anything else missing is an error, as is any unexpected key.
    """
    folder = resolve_checkpoint(path)
    meta_path = folder / META_FILE
    meta = read_json(meta_path, kind=dict) if meta_path.is_file() else {}
    for name, digest in meta.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise ValueError(f"{folder}: {name} listed in {META_FILE} is missing")
        if sha256_file(file) != digest:
            raise ValueError(f"{file}: sha256 differs from {META_FILE} (corrupt or modified)")
    saved_ids = meta.get("new_token_ids")
    if saved_ids is not None and list(saved_ids) != list(model.token_ids.new_token_ids):
        raise ValueError(f"{folder}: saved with new-token ids {saved_ids[:3]}..., the model's tokenizer gives "
                         f"{model.token_ids.new_token_ids[:3]}... (a different tokenizer)")
    _check_base(model, meta, folder)
    state = _load_safetensors(folder / DELTA_FILE)
    adapter = folder / ADAPTER_DIR
    if adapter.is_dir():
        state |= _read_adapter(model, adapter)
    groups = apply_delta_state(model, state, str(folder), allow_missing)
    logger.info("loaded delta %s (%s)", folder, ", ".join(sorted(groups)))
    return {**meta, "path": str(folder), "loaded": sorted(groups)}


def _check_base(model, meta: dict, folder: Path) -> None:
    """A delta is only valid on the base it was trained on: a different LLM (or ImageBind, for a delta holding an
    input projection) is a one-line error naming both, unless train.allow_other_base."""
    cfg = getattr(model, "cfg", None)
    if not meta.get("base") or cfg is None:
        return
    try:
        check_same_base(meta["base"], base_fingerprint(cfg, portable=False), str(folder),
                        uses_imagebind="input_proj" in meta.get("groups", []))
    except BaseMismatchError as e:
        if not cfg.train.allow_other_base:
            raise
        logger.warning("%s (loaded: train.allow_other_base=true)", e)


def _read_adapter(model, adapter: Path) -> dict[str, torch.Tensor]:
    """adapter/ -> {"lora.<key>": tensor}, after checking its LoRA settings match the model's."""
    if not llm_utils.has_lora(model.llm):
        raise ValueError(f"{adapter}: the checkpoint has a LoRA adapter but the model has no LoRA "
                         "(set model.lora.enabled: true)")
    saved = read_json(adapter / "adapter_config.json", kind=dict)
    ours = model.llm.peft_config["default"]
    for field, theirs, mine in (("r", saved.get("r"), ours.r), ("lora_alpha", saved.get("lora_alpha"), ours.lora_alpha),
                                ("target_modules", sorted(saved.get("target_modules") or []),
                                 sorted(ours.target_modules or []))):
        if theirs != mine:
            raise ValueError(f"{adapter}: LoRA {field}={theirs} but the model is configured with {mine}")
    weights = _load_safetensors(adapter / "adapter_model.safetensors")
    return {f"lora.{k}": v for k, v in weights.items() if "lora_" in k}


def load_checkpoint(model, path: str | os.PathLike, allow_missing=()) -> set[str]:
    """A delta folder (or run folder with `latest`) or an original pytorch_model.pt -> groups loaded."""
    kind, where = locate(path)
    if kind == "legacy":
        return import_legacy(model, where, allow_missing)
    return set(load_delta(model, where, allow_missing)["loaded"])


def init_from(model, cfg=None, log=logger.info) -> set[str]:
    """Load cfg.train.init_from (if set: a delta folder, a run folder's `latest` or an original pytorch_model.pt)
    before training -> the groups loaded; groups this stage trains may be missing."""
    cfg = cfg or model.cfg
    if not cfg.train.init_from:
        return set()
    source = cfg.path(cfg.train.init_from)
    trained = set(cfg.train.trainable) | ({"token_rows"} if cfg.train.token_rows != "none" else set())
    loaded = load_checkpoint(model, source, allow_missing=trained)
    log(f"init_from {source}: {', '.join(sorted(loaded))}")
    if (source / LATEST_FILE).is_file() and not (source / "done.json").is_file():
        log(f"warning: {source} has no done.json: starting from an unfinished run's latest checkpoint")
    return loaded
