"""ImageBind's head and postprocessor pieces: token selection, the text head, L2 normalisation, logit scale.

The counterpart of the original's models/helpers.py (SelectElement, SelectEOSAndProject, Normalize,
LearnableLogitScaling); model.py assembles them into `modality_heads` / `modality_postprocessors`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SelectToken(nn.Module):
    def __init__(self, index: int = 0):
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.index, ...]


class TextHead(nn.Module):
    """Picks each sequence's end-of-text token, then LayerNorm + projection (`proj.0`, `proj.1`)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, out_dim, bias=False))

    def forward(self, tokens: torch.Tensor, eos_positions: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens[torch.arange(tokens.shape[0], device=tokens.device), eos_positions])


class L2Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1, p=2)


class LogitScale(nn.Module):
    """x * min(exp(log_logit_scale), 100); learnable for text, a fixed buffer (log 20) for audio."""

    def __init__(self, init: float, learnable: bool, max_scale: float = 100.0):
        super().__init__()
        value = torch.ones([]) * math.log(init)
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)
        self.max_scale = max_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clip(self.log_logit_scale.exp(), max=self.max_scale) * x
