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
    meta.json           stage, step, token ids, library versions, sha256 of every file (written last)

Internally every delta tensor has one name (the "delta state"): the keys above plus `lora.<PEFT key>` for LoRA.
The original's pytorch_model.pt maps onto the same names through LEGACY_KEY_MAP, the one explicit key map used
for both import and export (reference §3.3).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from nextgpt.io import atomic_dir, atomic_write_bytes, atomic_write_text
from nextgpt.model import llm as llm_utils

logger = logging.getLogger("nextgpt")

DELTA_FILE = "delta.safetensors"
ADAPTER_DIR = "adapter"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
LATEST_FILE = "latest"
LEGACY_FILE = "pytorch_model.pt"

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


# ----------------------------------------------------------------------------------------------------------------
# The delta state of a model

def group_of(key: str) -> str:
    """input_proj | output_proj.<modality> | token_rows | lora"""
    head = key.split(".")
    return f"output_proj.{head[1]}" if head[0] == "output_proj" else head[0]


def expected_keys(model) -> dict[str, tuple[int, ...]]:
    """Every delta-state key the model has a place for -> its shape (token rows: the full matrix shape)."""
    keys = {f"input_proj.{k}": tuple(v.shape) for k, v in model.input_proj.state_dict().items()}
    for modality, projector in model.output_proj.items():
        keys |= {f"output_proj.{modality}.{k}": tuple(v.shape) for k, v in projector.state_dict().items()}
    for name in llm_utils.TOKEN_MATRICES:
        keys[f"token_rows.{name}"] = tuple(llm_utils.base_token_weight(model.llm, name).shape)
    if llm_utils.has_lora(model.llm):
        keys |= {f"lora.{k}": tuple(v.shape) for k, v in llm_utils.lora_state_dict(model.llm).items()}
    return keys


def delta_state(model, groups: set[str] | None = None, full_token_matrices: bool | None = None) -> dict:
    """{delta-state key: CPU tensor} for `groups` (default: model.delta_groups; token rows always)."""
    groups = set(model.delta_groups if groups is None else groups) | {"token_rows"}
    full = model.full_token_matrices if full_token_matrices is None else full_token_matrices
    state: dict[str, torch.Tensor] = {}
    if "input_proj" in groups:
        state |= {f"input_proj.{k}": v for k, v in model.input_proj.state_dict().items()}
    for modality, projector in model.output_proj.items():
        if f"output_proj.{modality}" in groups:
            state |= {f"output_proj.{modality}.{k}": v for k, v in projector.state_dict().items()}
    new_ids = torch.tensor(model.token_ids.new_token_ids)
    for name in llm_utils.TOKEN_MATRICES:
        matrix = llm_utils.effective_token_matrix(model.llm, name)
        state[f"token_rows.{name}"] = matrix if full else matrix[new_ids.to(matrix.device)]
    if "lora" in groups and llm_utils.has_lora(model.llm):
        state |= {f"lora.{k}": v for k, v in llm_utils.lora_state_dict(model.llm).items()}
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _allowed(group: str, allow_missing) -> bool:
    return group in allow_missing or group.split(".")[0] in allow_missing


def apply_delta_state(model, state: dict[str, torch.Tensor], where: str, allow_missing=()) -> set[str]:
    """Strictly load a delta state into the model -> the groups loaded.

    Unexpected keys, wrong shapes, and missing keys of groups not named in allow_missing are errors that list them
    (a group named in allow_missing may be absent as a whole, never in part).
    """
    expected = expected_keys(model)
    new_rows = len(model.token_ids.new_token_ids)
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{where}: {len(unexpected)} unexpected key(s) (the model has no place for them): "
                         f"{', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
    bad_shapes = []
    for key, value in state.items():
        shape = expected[key]
        if key.startswith("token_rows."):
            ok = tuple(value.shape) in (shape, (new_rows, shape[1]))
        else:
            ok = tuple(value.shape) == shape
        if not ok:
            bad_shapes.append(f"{key} {tuple(value.shape)} (model: {shape})")
    if bad_shapes:
        raise ValueError(f"{where}: shape mismatch: {'; '.join(bad_shapes[:20])}")
    missing = sorted(set(expected) - set(state))
    present_groups = {group_of(k) for k in state}
    not_allowed = [k for k in missing if group_of(k) in present_groups or not _allowed(group_of(k), allow_missing)]
    if not_allowed:
        raise ValueError(f"{where}: {len(not_allowed)} missing key(s): {', '.join(not_allowed[:20])}"
                         f"{' ...' if len(not_allowed) > 20 else ''}")

    with torch.no_grad():
        input_state = {k[len("input_proj."):]: v for k, v in state.items() if k.startswith("input_proj.")}
        if input_state:
            model.input_proj.load_state_dict(input_state, strict=True)
        for modality, projector in model.output_proj.items():
            prefix = f"output_proj.{modality}."
            projector_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if projector_state:
                projector.load_state_dict(projector_state, strict=True)
        for name in llm_utils.TOKEN_MATRICES:
            value = state.get(f"token_rows.{name}")
            if value is not None:
                llm_utils.set_token_matrix(model.llm, name, value, model.token_ids)
                if value.shape[0] != new_rows:
                    model.full_token_matrices = True
        lora_state = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
        if lora_state:
            llm_utils.load_lora_state_dict(model.llm, lora_state)
    model.delta_groups |= present_groups
    return present_groups


# ----------------------------------------------------------------------------------------------------------------
# Delta folders

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    elif (out_dir / ADAPTER_DIR).exists():
        shutil.rmtree(out_dir / ADAPTER_DIR)
    if model.tokenizer is not None:
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer.") as tmp:
            model.tokenizer.save_pretrained(tmp)
            for f in Path(tmp).iterdir():
                os.replace(f, out_dir / f.name)
    atomic_write_text(out_dir / CONFIG_FILE, cfg.dump())
    files = {str(p.relative_to(out_dir)): _sha256(p) for p in sorted(out_dir.rglob("*"))
             if p.is_file() and p.name != META_FILE and not p.name.startswith(".")}
    record = {
        "stage": cfg.train.stage,
        **(meta or {}),
        "groups": sorted({group_of(k) for k in state}),
        "token_rows": model.token_rows,
        "full_token_matrices": bool(model.full_token_matrices),
        "new_token_ids": list(model.token_ids.new_token_ids),
        "versions": _versions(),
        "files": files,
    }
    atomic_write_text(out_dir / META_FILE, json.dumps(record, indent=2) + "\n")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A delta folder: `path` itself, or the sub-folder named in `<path>/latest`."""
    path = Path(path)
    if (path / DELTA_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        name = latest.read_text().strip()
        target = path / name
        if not name or not (target / DELTA_FILE).is_file():
            raise FileNotFoundError(f"{latest}: names {name!r}, which holds no {DELTA_FILE}")
        return target
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    raise FileNotFoundError(f"{path}: neither a delta folder ({DELTA_FILE}) nor a run folder with '{LATEST_FILE}'")


def _reason(error: BaseException) -> str:
    """The first line of a library's message (torch's unpickling errors run to a dozen lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:          # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: unreadable ({_reason(e)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors.torch.load_file with every failure as one line naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # a bad header raises SafetensorError
        raise ValueError(f"{path}: unreadable safetensors file ({_reason(e)})") from None


def load_delta(model, path: str | os.PathLike, allow_missing=()) -> dict:
    """Strictly load a delta folder (or the one `<path>/latest` names) -> its meta.json (plus "path").

    allow_missing: groups that may be absent (input_proj, output_proj[.<modality>], token_rows, lora), e.g. the
    ones a new stage is about to train; anything else missing is an error, as is any unexpected key.
    """
    folder = resolve_checkpoint(path)
    meta_path = folder / META_FILE
    meta = _read_json(meta_path) if meta_path.is_file() else {}
    for name, digest in meta.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise ValueError(f"{folder}: {name} listed in {META_FILE} is missing")
        if _sha256(file) != digest:
            raise ValueError(f"{file}: sha256 differs from {META_FILE} (corrupt or modified)")
    saved_ids = meta.get("new_token_ids")
    if saved_ids is not None and list(saved_ids) != list(model.token_ids.new_token_ids):
        raise ValueError(f"{folder}: saved with new-token ids {saved_ids[:3]}..., the model's tokenizer gives "
                         f"{model.token_ids.new_token_ids[:3]}... (a different tokenizer)")
    state = _load_safetensors(folder / DELTA_FILE)
    adapter = folder / ADAPTER_DIR
    if adapter.is_dir():
        state |= _read_adapter(model, adapter)
    groups = apply_delta_state(model, state, str(folder), allow_missing)
    logger.info("loaded delta %s (%s)", folder, ", ".join(sorted(groups)))
    return {**meta, "path": str(folder), "loaded": sorted(groups)}


def _read_adapter(model, adapter: Path) -> dict[str, torch.Tensor]:
    """adapter/ -> {"lora.<key>": tensor}, after checking its LoRA settings match the model's."""
    if not llm_utils.has_lora(model.llm):
        raise ValueError(f"{adapter}: the checkpoint has a LoRA adapter but the model has no LoRA "
                         "(set model.lora.enabled: true)")
    saved = _read_json(adapter / "adapter_config.json")
    ours = model.llm.peft_config["default"]
    for field, theirs, mine in (("r", saved.get("r"), ours.r), ("lora_alpha", saved.get("lora_alpha"), ours.lora_alpha),
                                ("target_modules", sorted(saved.get("target_modules") or []),
                                 sorted(ours.target_modules or []))):
        if theirs != mine:
            raise ValueError(f"{adapter}: LoRA {field}={theirs} but the model is configured with {mine}")
    weights = _load_safetensors(adapter / "adapter_model.safetensors")
    return {f"lora.{k}": v for k, v in weights.items() if "lora_" in k}


# ----------------------------------------------------------------------------------------------------------------
# The original pytorch_model.pt

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
            raise ValueError(f"{where}: not a readable torch checkpoint ({_reason(e)})") from None
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


def load_checkpoint(model, path: str | os.PathLike, allow_missing=()) -> set[str]:
    """A delta folder (or run folder with `latest`) or an original pytorch_model.pt -> groups loaded."""
    path = Path(path)
    if path.is_file() or path.suffix in (".pt", ".pth", ".bin"):
        return import_legacy(model, path, allow_missing)
    if not (path / DELTA_FILE).exists() and not (path / LATEST_FILE).exists() and (path / LEGACY_FILE).is_file():
        return import_legacy(model, path / LEGACY_FILE, allow_missing)
    return set(load_delta(model, path, allow_missing)["loaded"])


def init_from(model, cfg=None) -> set[str]:
    """Load cfg.train.init_from (if set) before training: groups this stage trains may be missing."""
    cfg = cfg or model.cfg
    if not cfg.train.init_from:
        return set()
    trained = set(cfg.train.trainable) | ({"token_rows"} if cfg.train.token_rows != "none" else set())
    return load_checkpoint(model, cfg.path(cfg.train.init_from), allow_missing=trained)
