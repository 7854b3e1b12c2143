"""What a stage trains: the parameter groups of a NextGPT (input_proj, output_proj.<modality>, lora, token_rows) and
the one function that freezes everything else and logs the trainable counts per group."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch import nn

from nextgpt.model import llm as llm_utils

if TYPE_CHECKING:
    from nextgpt.model.nextgpt import NextGPT

logger = logging.getLogger("nextgpt")


def trainable_groups(model: NextGPT) -> dict[str, list[nn.Parameter]]:
    """Parameters by group: input_proj, output_proj.<modality>, lora, token_rows."""
    groups = {"input_proj": list(model.input_proj.parameters())}
    for modality, projector in model.output_proj.items():
        groups[f"output_proj.{modality}"] = list(projector.parameters())
    groups["lora"] = [p for _, p in llm_utils.lora_parameters(model.llm)]
    if model.token_rows == "new":
        rows = [llm_utils.token_rows_parameter(model.llm, name) for name in llm_utils.TOKEN_MATRICES]
        if any(p is None for p in rows):
            raise ValueError("token_rows=new but the LLM has no PEFT trainable-token layers")
        groups["token_rows"] = rows
    elif model.token_rows == "all":
        groups["token_rows"] = [llm_utils.base_token_weight(model.llm, name) for name in llm_utils.TOKEN_MATRICES]
    else:
        groups["token_rows"] = []
    return groups


def set_trainable(model: NextGPT, cfg=None) -> dict[str, int]:
    """Freeze everything, then enable what cfg.train.trainable and cfg.train.token_rows name.

    -> trainable parameter count per group (input_proj, output_proj.<m>, lora, token_rows) plus "total";
    the counts (and the frozen rest) are logged.
    """
    cfg = cfg or model.cfg
    if cfg.train.token_rows != model.token_rows:
        raise ValueError(f"train.token_rows={cfg.train.token_rows} but the model was built for {model.token_rows}")
    trainable = set(cfg.train.trainable)
    if "lora" in trainable and not llm_utils.has_lora(model.llm):
        raise ValueError("train.trainable lists lora but the model was built without LoRA (model.lora.enabled)")
    groups = trainable_groups(model)
    model.requires_grad_(False)
    on = {"token_rows"} if cfg.train.token_rows != "none" else set()
    on |= {g for g in groups if g.split(".")[0] in trainable}
    counts = {}
    for group, parameters in groups.items():
        for p in parameters:
            p.requires_grad_(group in on)
        counts[group] = sum(p.numel() for p in parameters) if group in on else 0
    counts["total"] = sum(counts.values())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    model.delta_groups |= {g for g in on if groups[g]}
    for group, count in counts.items():
        logger.info("trainable %-20s %14s", group, f"{count:,}")
    logger.info("frozen    %-20s %14s", "everything else", f"{frozen:,}")
    return counts
