"""Vicuna-7B v0 = LLaMA-7B + the lmsys/vicuna-7b-delta-v0 delta, applied here without FastChat.

    hf download lmsys/vicuna-7b-delta-v0 --local-dir ckpt/vicuna-7b-delta-v0
    python scripts/prepare_vicuna.py --base <llama-7b-hf> --delta ckpt/vicuna-7b-delta-v0 \
        --out ckpt/pretrained_ckpt/vicuna_ckpt/7b_v0

The arithmetic of FastChat's `fastchat.model.apply_delta` (the step NExT-GPT's README names): every weight is
base + delta, both in float16 (`--dtype`), so the sum is rounded to float16 once, as FastChat's in-place fp16
addition on the CPU does; `embed_tokens` / `lm_head` of the delta have one row more than LLaMA's (32001: a pad
row), and the base is added into their top-left block. The output takes the delta's config, tokenizer files and
shard layout (for v0: `pytorch_model-0000N-of-00002.bin`, what `make check-ckpt` expects). One shard of each
folder is in memory at a time (the files are memory-mapped), so a 7B merge needs a few GB of RAM, not 30.
The output folder is written under a temporary name and renamed when complete.

Exit status: 0 done, 2 bad input (one line: `error: <what>, <which file / tensor>`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from nextgpt import cli

WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Matrices whose delta may have more rows than the base (Vicuna v0 adds a pad token: 32001 vs 32000).
GROWN = ("embed_tokens.weight", "lm_head.weight")


class DeltaError(ValueError):
    """Bad input; the message names the file or tensor."""


def weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> shard file of a Hugging Face model folder (index + shards, or one weights file)."""
    for index_name in INDEX_NAMES:
        index_path = folder / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DeltaError(f"unreadable weight index ({type(e).__name__}: {e}), {index_path}") from None
            return {name: folder / shard for name, shard in weight_map.items()}
    singles = [folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()]
    shards = sorted(folder.glob("pytorch_model-*-of-*.bin")) + sorted(folder.glob("model-*-of-*.safetensors"))
    files = singles[:1] or shards
    if not files:
        raise DeltaError(f"no model weights (model.safetensors, pytorch_model.bin, an index or shards), {folder}")
    return {name: path for path in files for name in _names(path)}


def _names(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    return list(_load(path))


def _load(path: Path) -> dict:
    """One shard as name -> tensor (memory-mapped where the format allows)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable shard: say which
        raise DeltaError(f"unreadable weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}), "
                         f"{path}") from None
    if not isinstance(state, dict):
        raise DeltaError(f"expected a state dict, got {type(state).__name__}, {path}")
    return state


class _Shards:
    """Tensors by name from one folder's shards, keeping only the most recently opened shard in memory."""

    def __init__(self, files: dict[str, Path]):
        self.files, self.path, self.state = files, None, {}

    def __getitem__(self, name: str):
        path = self.files[name]
        if path != self.path:
            self.path, self.state = path, _load(path)
        return self.state[name]


def merge_tensor(name: str, base, delta, dtype):
    """base + delta in `dtype` (rounded once, as FastChat's in-place addition); `GROWN` matrices add the base into
    the delta's top-left block. (rows, cols) -> the delta's shape."""
    import torch

    out = delta.to(dtype).to(torch.float32)
    base = base.to(dtype).to(torch.float32)
    if tuple(base.shape) == tuple(out.shape):
        out += base
    elif name.endswith(GROWN) and base.ndim == out.ndim == 2 and base.shape[0] <= out.shape[0] \
            and base.shape[1] == out.shape[1]:
        out[:base.shape[0]] += base
    else:
        raise DeltaError(f"shape mismatch: base {tuple(base.shape)} vs delta {tuple(out.shape)}, tensor {name}")
    return out.to(dtype)


def apply_delta(base: Path, delta: Path, out: Path, dtype_name: str = "float16", log=print) -> int:
    """Write `out` = base + delta (a complete Hugging Face folder). -> number of tensors merged."""
    import torch

    from nextgpt.io import atomic_dir

    dtype = getattr(torch, dtype_name)
    for folder, what in ((base, "--base"), (delta, "--delta")):
        if not folder.is_dir():
            raise DeltaError(f"{what} folder not found, {folder}")
    base_files, delta_files = weight_files(base), weight_files(delta)
    missing = sorted(set(delta_files) - set(base_files))
    extra = sorted(set(base_files) - set(delta_files))
    if missing or extra:
        shown = ", ".join(missing[:3] + extra[:3])
        raise DeltaError(f"base and delta hold different tensors ({len(missing)} only in the delta, {len(extra)} "
                         f"only in the base: {shown}), {base} vs {delta}")
    base_shards = _Shards(base_files)
    count = 0
    with atomic_dir(out) as tmp:
        # the delta's non-weight files: config, generation config, tokenizer (with its [PAD] for v0), index
        for item in sorted(delta.iterdir()):
            if item.is_file() and item.suffix not in WEIGHT_SUFFIXES:
                shutil.copy2(item, tmp / item.name)
        by_shard: dict[Path, list[str]] = {}
        for name, path in delta_files.items():
            by_shard.setdefault(path, []).append(name)
        # base shards hold the tensors in the same order as the delta's (both are LLaMA-7B layouts), so visiting
        # the delta's shards in order opens each base shard about once
        for path in sorted(by_shard):
            state = _load(path)
            merged = {name: merge_tensor(name, base_shards[name], state[name], dtype) for name in by_shard[path]}
            if path.suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file(merged, str(tmp / path.name), metadata={"format": "pt"})
            else:
                torch.save(merged, tmp / path.name)
            count += len(merged)
            log(f"[vicuna] {path.name}: {len(merged)} tensors")
            del state, merged
    return count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, type=Path, help="LLaMA-7B in Hugging Face format")
    p.add_argument("--delta", required=True, type=Path, help="the Vicuna delta folder (lmsys/vicuna-7b-delta-v0)")
    p.add_argument("--out", required=True, type=Path, help="where Vicuna goes (model.llm)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="dtype of the addition and the output (FastChat: float16)")
    args = p.parse_args(argv)

    def body() -> int:
        count = apply_delta(args.base, args.delta, args.out, args.dtype)
        print(f"[vicuna] {count} tensors merged -> {args.out}")
        return 0

    return cli.run(body, "prepare_vicuna")  # any failure: one `error:` line (exit 2), the traceback in a log


if __name__ == "__main__":
    raise SystemExit(main())
