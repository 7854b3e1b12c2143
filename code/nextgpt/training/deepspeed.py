"""The DeepSpeed engine of a training run: the trainable parameters (one learning rate, or one group per module
with train.module_lr), the run's JSON built once from the config after the data (build_ds_config; nothing changes
it later), the optimizer the JSON names (or bitsandbytes' AdamW8bit), deepspeed.initialize.

Nothing happens at import; deepspeed and bitsandbytes are imported inside build_engine.
"""

from __future__ import annotations

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
