"""The DeepSpeed engine of a training run: the trainable parameters (one learning rate, or one group per module
with train.module_lr), the optimizer the JSON names (or bitsandbytes' AdamW8bit), deepspeed.initialize.

Nothing happens at import; deepspeed and bitsandbytes are imported inside build_engine.
"""

from __future__ import annotations

from typing import Any

import torch


def param_groups(model: torch.nn.Module, cfg: Any, ds_config: dict[str, Any]) -> list:
    """The trainable parameters, as one list, or (with train.module_lr) one optimizer group per module group
    (input_proj, output_proj, lora, token_rows) with its own lr. The scheduler then gets per-group peak / floor
    lists (DeepSpeed's WarmupLR takes a list per group), floors scaled like the peaks: every group follows the same
    warm-up and decay shape at its own height."""
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
    out = [{"params": ps, "lr": cfg.train.module_lr.get(name, cfg.train.lr), "name": name}
           for name, ps in groups.items() if ps]
    scheduler = ds_config.get("scheduler", {}).get("params", {})
    if "warmup_max_lr" in scheduler:
        scale = [g["lr"] / cfg.train.lr if cfg.train.lr else 1.0 for g in out]
        scheduler["warmup_max_lr"] = [g["lr"] for g in out]
        scheduler["warmup_min_lr"] = [float(scheduler.get("warmup_min_lr", 0.0)) * k for k in scale]
    return out


def build_engine(model: torch.nn.Module, cfg: Any, ds_config: dict[str, Any]):
    """deepspeed.initialize over the parameters that train (per-module lr groups: param_groups); with
    train.optimizer_8bit, bitsandbytes' AdamW8bit replaces the JSON's optimizer (the JSON's scheduler stays)."""
    import deepspeed

    params = param_groups(model, cfg, ds_config)
    optimizer = None
    if cfg.train.optimizer_8bit:
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                                 eps=cfg.train.eps, weight_decay=cfg.train.weight_decay)
        ds_config.pop("optimizer", None)
        ds_config["zero_allow_untested_optimizer"] = True
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                           config=ds_config)
    return engine
