"""The DeepSpeed engine of a training run: the trainable parameters (one learning rate, or one group per module
with train.module_lr), the run's JSON built once from the config after the data (build_ds_config; nothing changes
it later), the optimizer the JSON names (or bitsandbytes' AdamW8bit), deepspeed.initialize; which
DeepSpeed ops a JSON makes DeepSpeed compile at first use (ops_to_compile), refused at start without their tools
(check_compiled_ops).

Nothing happens at import; deepspeed and bitsandbytes are imported inside build_engine.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from nextgpt import runtime


def param_groups(model: torch.nn.Module, cfg: Any) -> list:
    """The trainable parameters, as one list, or (with train.module_lr) one optimizer group per module group
    (input_proj, output_proj, lora, token_rows) with its own lr (build_ds_config gives the scheduler the matching
    per-group lists)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not cfg.train.module_lr:
        return trainable
    from nextgpt.model.trainable import trainable_groups

    groups: dict[str, list] = {}
    for name, parameters in trainable_groups(model).items():
        groups.setdefault(name.split(".")[0], []).extend(p for p in parameters if p.requires_grad)
    seen = {id(p) for ps in groups.values() for p in ps}
    if rest := [p for p in trainable if id(p) not in seen]:
        raise ValueError(f"{len(rest)} trainable tensor(s) outside input_proj/output_proj/lora/token_rows")
    return [{"params": ps, "lr": cfg.train.module_lr.get(name, cfg.train.lr), "name": name}
            for name, ps in groups.items() if ps]


def build_ds_config(ds_file: dict[str, Any], cfg: Any, world_size: int, total_steps: int, params: list,
                    ds_path: str | Path = "the DeepSpeed config") -> dict[str, Any]:
    """THE DeepSpeed JSON of a run, built once from the config after the data (total_steps is known then) and never
    changed afterwards: a new dict from `ds_file` (runtime.load_ds_config: the file, checked against the YAML) with
    every "auto" filled (runtime.fill_ds_config); with per-module lr groups (`params` from param_groups) the
    scheduler's peak / floor as per-group lists (DeepSpeed's WarmupLR takes a list per group), floors scaled like
    the peaks, so every group follows the same warm-up and decay shape at its own height; with
    train.optimizer_8bit no "optimizer" section (bitsandbytes' AdamW8bit comes from build_engine)."""
    ds = runtime.fill_ds_config(ds_file, cfg, world_size, total_steps, ds_path)
    scheduler = ds.get("scheduler", {}).get("params", {})
    if cfg.train.module_lr and "warmup_max_lr" in scheduler:
        scale = [g["lr"] / cfg.train.lr if cfg.train.lr else 1.0 for g in params]
        scheduler["warmup_max_lr"] = [g["lr"] for g in params]
        scheduler["warmup_min_lr"] = [float(scheduler.get("warmup_min_lr", 0.0)) * k for k in scale]
    if cfg.train.optimizer_8bit:
        ds.pop("optimizer", None)
        ds["zero_allow_untested_optimizer"] = True
    return ds


def build_engine(model: torch.nn.Module, cfg: Any, ds_config: dict[str, Any], params: list):
    """deepspeed.initialize over `params` (param_groups) with the run's JSON (build_ds_config; read, not changed);
    with train.optimizer_8bit, bitsandbytes' AdamW8bit instead of the JSON's optimizer (the JSON's scheduler
    stays)."""
    import deepspeed

    optimizer = None
    if cfg.train.optimizer_8bit:
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                                 eps=cfg.train.eps, weight_decay=cfg.train.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                           config=ds_config)
    return engine


# What DeepSpeed builds at first use (the PyPI wheel ships no compiled op: git_version_info.installed_ops all
# False), read from engine.get_optimizer_configuration / _configure_basic_optimizer (deepspeed 0.19): an Adam(W)
# without "torch_adam" becomes FusedAdam (CUDA: nvcc + ninja; the CPU accelerator's build: a C++ compiler), with
# optimizer offload DeepSpeedCPUAdam (C++); Lamb and Lion are fused ops too; NVMe offload needs async_io (libaio).
def ops_to_compile(ds_config: dict[str, Any], cuda: bool = True) -> list[tuple[str, list[str]]]:
    """[(DeepSpeed op, the tools its build needs)] that this dsconfig makes DeepSpeed JIT-compile at start."""
    zero = ds_config.get("zero_optimization", {}) or {}
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    optimizer = ds_config.get("optimizer") or {}
    name, params = str(optimizer.get("type", "")).lower(), optimizer.get("params", {}) or {}
    device_build = ["nvcc", "ninja"] if cuda else ["c++", "ninja"]
    ops: list[tuple[str, list[str]]] = []
    if name in ("adam", "adamw") and not params.get("torch_adam", False):
        ops.append(("cpu_adam", ["c++", "ninja"]) if offload in ("cpu", "nvme") else ("fused_adam", device_build))
    elif name == "lamb":
        ops.append(("fused_lamb", device_build))
    elif name == "lion":
        ops.append(("cpu_lion", ["c++", "ninja"]) if offload in ("cpu", "nvme") else ("fused_lion", device_build))
    elif name == "adagrad" and offload in ("cpu", "nvme"):
        ops.append(("cpu_adagrad", ["c++", "ninja"]))
    if "nvme" in (offload, (zero.get("offload_param") or {}).get("device", "none")):
        ops.append(("async_io", ["c++", "ninja"]))
    return ops


def check_compiled_ops(ds_config: dict[str, Any], ds_path: Path, cuda: bool) -> list[str]:
    """At start, before anything loads: a ValueError (one line) when the dsconfig makes DeepSpeed build an op whose
    tools are not on PATH (the build would fail minutes later, deep inside deepspeed.initialize); else a note per
    op that will be built (about a minute at the first start, then loaded from TORCH_EXTENSIONS_DIR)."""
    from deepspeed.git_version_info import installed_ops

    notes = []
    for op, tools in ops_to_compile(ds_config, cuda):
        if installed_ops.get(op):
            continue                                     # prebuilt into this DeepSpeed install
        if missing := [tool for tool in tools if shutil.which(tool) is None]:
            raise ValueError(f"DeepSpeed builds its {op} op at first use with {' + '.join(tools)}, and "
                             f"{' and '.join(missing)} is not on PATH: install it, or use a dsconfig that compiles "
                             f"nothing (code/dsconfig/README.md), {ds_path}")
        notes.append(f"{ds_path.name}: DeepSpeed builds its {op} op at first use ({' + '.join(tools)} found)")
    return notes
