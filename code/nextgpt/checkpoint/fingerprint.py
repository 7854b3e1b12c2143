"""Fingerprints of the frozen bases a delta is trained on, so that a delta is never loaded onto another base.

A delta (input_proj, output_proj, 38 token rows, LoRA) only means something on top of the LLM and the ImageBind it
was trained with: on another Vicuna the rows and LoRA are noise, on another ImageBind the input projection is. The
fingerprint is recorded in every delta's meta.json (`base`) and compared when a delta is loaded
(checkpoint.load_delta); `train.allow_other_base=true` loads it anyway.

    llm        config.json (minus fields that do not change the model: transformers_version, _name_or_path, dtype,
               use_cache), the tokenizer file (tokenizer.model, else tokenizer.json) and the first rows of a few
               weight tensors (embed_tokens, the first layer's q_proj, the final norm, lm_head), read as float32 so
               the same weights saved as fp16 / fp32 / .bin / .safetensors give the same digest
    imagebind  the preset and a digest of the file's size, first and last 4 MiB (the 4.5 GB file is not read
               whole); recorded as absent when the file is not there (stage 1 from the feature cache)

Each part carries `digest` (16 hex digits); two bases are the same when the digests are. Reading is cheap (small
files, a few tensor slices), and results are cached per file path, size and mtime.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from nextgpt.checkpoint.layout import META_FILE, portable_path, resolve_checkpoint  # noqa: F401

VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
# (tensor-name suffix, rows read): enough to tell two trainings of one architecture apart
PROBE_TENSORS = (("embed_tokens.weight", 16), ("layers.0.self_attn.q_proj.weight", 16), ("model.norm.weight", None),
                 ("lm_head.weight", 16))
EDGE_BYTES = 4 << 20


class BaseMismatchError(ValueError):
    """A delta trained on another base; the one-line message names both."""


def _short(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _sha_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> file, from an index or the single weights files of a Hugging Face folder."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).is_file():
            weight_map = json.loads((folder / index_name).read_text()).get("weight_map", {})
            return {name: folder / shard for name, shard in weight_map.items()}
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    out: dict[str, Path] = {}
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                out.update({name: path for name in f.keys()})
        else:
            out.update({name: path for name in _torch_load(path)})
    return out


@functools.lru_cache(maxsize=8)
def _torch_load_cached(key: tuple) -> dict:
    import torch

    return torch.load(key[0], map_location="cpu", mmap=True, weights_only=True)


def _torch_load(path: Path) -> dict:
    return _torch_load_cached(_file_key(path))


def _probe(path: Path, name: str, rows: int | None) -> bytes:
    """The first `rows` rows of tensor `name` as float32 bytes, prefixed by its name and full shape."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            piece = f.get_slice(name)
            shape = list(piece.get_shape())
            tensor = piece[:rows] if rows is not None else piece[:]
    else:
        full = _torch_load(path)[name]
        shape, tensor = list(full.shape), full[:rows] if rows is not None else full
    values = tensor.to(torch.float32).contiguous().numpy().tobytes()
    return f"{name}{shape}".encode() + values


@functools.lru_cache(maxsize=16)
def _llm(key: tuple) -> dict:
    folder = Path(key[0])
    config = json.loads((folder / "config.json").read_text())
    kept = {k: v for k, v in sorted(config.items()) if k not in VOLATILE_CONFIG_KEYS}
    tokenizer_file = next((folder / n for n in TOKENIZER_FILES if (folder / n).is_file()), None)
    probes = hashlib.sha256()
    probed = []
    try:
        files = _weight_files(folder)
        for suffix, rows in PROBE_TENSORS:
            name = next((n for n in sorted(files) if n.endswith(suffix)), None)
            if name is not None:
                probes.update(_probe(files[name], name, rows))
                probed.append(name)
    except Exception:  # noqa: BLE001 - weights in a form we cannot slice (old pickles): config + tokenizer only
        probed = []
    part = {
        "path": str(folder),
        "model_type": config.get("model_type"),
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "config": _short(json.dumps(kept, sort_keys=True)),
        "tokenizer": _sha_file(tokenizer_file) if tokenizer_file else None,
        "weights": probes.hexdigest()[:16] if probed else None,
    }
    part["digest"] = _short(json.dumps([part["config"], part["tokenizer"], part["weights"]]))
    return part


def llm_fingerprint(folder: str | os.PathLike) -> dict:
    """The LLM folder's fingerprint (see the module doc). Raises FileNotFoundError without config.json."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: not found (model.llm)")
    # the cache key covers the files that feed the digest: config, tokenizer and the weight files' mtimes
    stamps = tuple(_file_key(p) for p in sorted(folder.iterdir()) if p.is_file())
    return _llm((str(folder.resolve()),) + stamps)


@functools.lru_cache(maxsize=16)
def _imagebind(key: tuple, preset: str) -> dict:
    path, size = Path(key[0]), key[1]
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            digest.update(f.read(EDGE_BYTES))
    return {"path": str(path), "preset": preset, "file": digest.hexdigest()[:16],
            "digest": _short(f"{preset}:{digest.hexdigest()[:16]}")}


def imagebind_fingerprint(path: str | os.PathLike, preset: str) -> dict:
    path = Path(path)
    if not path.is_file():
        return {"path": str(path), "preset": preset, "file": None, "digest": None}
    return _imagebind(_file_key(path), preset)


def base_fingerprint(cfg, portable: bool = True) -> dict:
    """{"llm": ..., "imagebind": ...} for cfg.model.llm / cfg.model.imagebind (+ preset); paths made portable (to
    record in a checkpoint) or as on this machine (to name in a message)."""
    shown = portable_path if portable else (lambda value: str(cfg.path(value)))
    llm = dict(llm_fingerprint(cfg.path(cfg.model.llm)), path=shown(cfg.model.llm))
    imagebind = dict(imagebind_fingerprint(cfg.path(cfg.model.imagebind), cfg.model.imagebind_preset),
                     path=shown(cfg.model.imagebind))
    return {"llm": llm, "imagebind": imagebind}


def describe(part: dict, what: str) -> str:
    """One phrase naming a base: `LLM ckpt/x (llama, hidden 64, 2 layers, digest 1a2b...)`."""
    if what == "llm":
        return (f"LLM {part.get('path')} ({part.get('model_type')}, hidden {part.get('hidden_size')}, "
                f"{part.get('num_hidden_layers')} layers, tokenizer {str(part.get('tokenizer'))[:8]}, "
                f"weights {str(part.get('weights'))[:8]})")
    return f"ImageBind {part.get('path')} (preset {part.get('preset')}, file {str(part.get('file'))[:8]})"


def check_same_base(saved: dict | None, current: dict, where: str, uses_imagebind: bool) -> None:
    """Raise BaseMismatchError when `saved` (a delta's meta.json `base`) differs from `current`.

    Deltas saved before fingerprints existed (no `base`) pass. ImageBind is compared only for deltas that hold an
    input projection (`uses_imagebind`) and only when both sides have the file's digest."""
    if not saved:
        return
    parts = ["llm"] + (["imagebind"] if uses_imagebind else [])
    for what in parts:
        theirs, ours = saved.get(what) or {}, current.get(what) or {}
        if not theirs.get("digest") or not ours.get("digest") or theirs["digest"] == ours["digest"]:
            continue
        raise BaseMismatchError(
            f"{where}: trained on {describe(theirs, what)}, but this model's base is {describe(ours, what)}; "
            "a delta is only valid on its own base (set train.allow_other_base=true to load it anyway)")


def stale_run(run_dir: str | os.PathLike, cfg) -> str | None:
    """Why the finished run in `run_dir` (its `latest` checkpoint) must not be reused with `cfg`'s base, or None.

    For steps that skip work already done (scripts/demo.py): a run trained on another base, or one whose
    meta.json records no base (made before fingerprints existed), is stale. No run there: None."""
    try:
        folder = resolve_checkpoint(run_dir)
    except FileNotFoundError:
        return None
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return f"{folder}: no readable {META_FILE}"
    if not meta.get("base"):
        return f"{folder}: records no base fingerprint (made before fingerprints existed)"
    try:
        check_same_base(meta["base"], base_fingerprint(cfg, portable=False), str(folder),
                        uses_imagebind="input_proj" in meta.get("groups", []))
    except BaseMismatchError as e:
        return str(e).split("; a delta is only valid")[0]
    return None
