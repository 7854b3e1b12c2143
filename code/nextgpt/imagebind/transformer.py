"""ImageBind's transformer trunks: pre-LN blocks with the parameter names of `imagebind_huge.pth`.

The counterpart of the original's models/transformer.py. A trunk's keys are `pre_transformer_layer.0.*` and
`blocks.{i}.{norm_1,attn,norm_2,mlp.fc1,mlp.fc2}.*`; tokens are (B, L, D) throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training (audio trunk, rate <= 0.1)."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm_1(x)); x + mlp(norm_2(x)). Tokens are (B, L, D)."""

    def __init__(self, dim: int, num_heads: int, add_bias_kv: bool, drop_path: float):
        super().__init__()
        self.norm_1 = nn.LayerNorm(dim, eps=1e-6)
        # bias_k / bias_v (audio): one learned key/value appended to every sequence, as the original trunks do.
        self.attn = nn.MultiheadAttention(dim, num_heads, bias=True, add_bias_kv=add_bias_kv, batch_first=True)
        self.norm_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm_1(x)
        x = x + self.drop_path(self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0])
        return x + self.drop_path(self.mlp(self.norm_2(x)))


class Trunk(nn.Module):
    """`pre_transformer_layer` (a LayerNorm for vision only) then `blocks`; drop path grows linearly per block."""

    def __init__(self, dim: int, num_blocks: int, num_heads: int, pre_layer_norm: bool, add_bias_kv: bool,
                 drop_path: float):
        super().__init__()
        # Index 0 matches the original's Sequential(LayerNorm | Identity, rearrange) -> `pre_transformer_layer.0.*`.
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(dim, eps=1e-6) if pre_layer_norm else nn.Identity())
        rates = torch.linspace(0, drop_path, num_blocks, device="cpu").tolist() if num_blocks else []
        self.blocks = nn.ModuleList(Block(dim, num_heads, add_bias_kv, rate) for rate in rates)

    def forward(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.pre_transformer_layer(tokens)
        for block in self.blocks:
            tokens = block(tokens, attn_mask=attn_mask)
        return tokens
