"""ImageBind's modality preprocessors: patch stems, CLS token + positions, and the text embeddings.

The counterpart of the original's models/multimodal_preprocessors.py; attribute names (`rgbt_stem.proj.*`,
`cls_token`, `pos_embedding_helper.pos_embed`, `token_embedding`, `pos_embed`, `mask`) equal the released file's.
"""

from __future__ import annotations

import torch
from torch import nn


class PadIm2Video(nn.Module):
    """Images (B, C, H, W) become 2-frame videos (B, C, 2, H, W) by repetition; videos pass through."""

    def __init__(self, frames: int):
        super().__init__()
        self.frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.ndim != 5:
            raise ValueError(f"vision input must be (B, C, H, W) or (B, C, T, H, W), got {tuple(x.shape)}")
        if x.shape[2] == 1:
            x = x.repeat(1, 1, self.frames, 1, 1)
        return x


class PatchStem(nn.Module):
    """Convolutional patchifier: `proj` then flatten to tokens (B, N, D), then `norm_layer` if any."""

    def __init__(self, proj: nn.Module, norm_layer: nn.Module | None = None):
        super().__init__()
        self.proj = proj
        self.norm_layer = norm_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm_layer(tokens) if self.norm_layer is not None else tokens


class PositionEmbedding(nn.Module):
    """Learned positions for 1 CLS + N patches; lives in `pos_embedding_helper.pos_embed` like the original."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)


class PatchPreprocessor(nn.Module):
    """Stem + CLS token + positions. The input grid is fixed (224x224 images, 128x204 spectrograms)."""

    def __init__(self, stem: PatchStem, num_patches: int, dim: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.rgbt_stem = stem
        self.pos_embedding_helper = PositionEmbedding(1 + num_patches, dim)
        self.num_patches = num_patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.rgbt_stem(x)                                         # (B, N, D)
        if patches.shape[1] != self.num_patches:
            # The original interpolates positions for other grids; NExT-GPT never feeds any.
            raise ValueError(f"input {tuple(x.shape)} gives {patches.shape[1]} patches; this model expects "
                             f"{self.num_patches} (224x224 frames / 128x204 spectrograms)")
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), patches], dim=1)
        return tokens + self.pos_embedding_helper.pos_embed                 # (B, 1 + N, D)


class TextPreprocessor(nn.Module):
    """Token + position embeddings; the causal mask is a (persistent) buffer, as in the released file."""

    def __init__(self, vocab_size: int, context_length: int, dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.pos_embed = nn.Parameter(torch.empty(1, context_length, dim))
        nn.init.normal_(self.pos_embed, std=0.01)
        self.register_buffer("mask", torch.full((context_length, context_length), float("-inf")).triu_(1))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(text) + self.pos_embed                   # (B, 77, D)
