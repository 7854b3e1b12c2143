"""Input projection (ImageBind -> one soft LLM token) and the output projectors (signal tokens -> decoder
conditioning), one per modality in an nn.ModuleDict keyed by modality name.

Output projector modes (cfg.model.output_proj.mode):
  transformer  the original's TextFcLayer (code/model/layers.py), same parameter names (fc, tfm, model, query_embs) so
               its checkpoints map 1:1: Linear(D_llm->d) -> nn.Transformer(pre-norm, batch_first, no masks) with
               learned queries as the decoder input -> Linear(d->D_out).
  linear       Linear(D_llm->D_out) on every signal token, then a learned Linear over the token axis (N -> T).
               (The original's linear mode has no forward branch in TextFcLayer and crashes.)
  qformer      transformers' Blip2QFormerModel: learned queries cross-attend to the projected signal tokens
               (the original loaded bert-base-uncased for this; we build it from config, nothing downloaded).
Every mode maps (B, N, D_llm) hidden states + (B, N, D_llm) input embeddings of the N signal tokens to
(B, T, D_out), with (T, D_out) = the decoder's conditioning shape.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def build_input_proj(imagebind_dim: int, hidden_size: int) -> nn.Linear:
    """(N, imagebind_dim) ImageBind feature -> (N, hidden_size): one soft token per input medium."""
    return nn.Linear(imagebind_dim, hidden_size)


class TransformerProjector(nn.Module):
    """The original TextFcLayer in `transformer` mode."""

    # A batch of zero signal blocks goes through (every parameter gets an exact-zero gradient at no FLOPs): what
    # NextGPT.project_nothing runs when a micro-batch lacks this modality.
    takes_empty_batch = True

    def __init__(self, in_dim: int, out_dim: int, num_input_tokens: int, num_output_tokens: int, d_model: int = 512,
                 num_encoder_layers: int = 4, num_decoder_layers: int = 4, num_heads: int = 4,
                 dim_feedforward: int = 2048, dropout: float = 0.0):
        super().__init__()
        self.num_input_tokens, self.num_output_tokens, self.out_dim = num_input_tokens, num_output_tokens, out_dim
        self.fc = nn.Linear(in_dim, d_model)
        with warnings.catch_warnings():      # "enable_nested_tensor ... norm_first": a fast path we do not use
            warnings.filterwarnings("ignore", message="enable_nested_tensor")
            self.tfm = nn.Transformer(d_model=d_model, nhead=num_heads, num_encoder_layers=num_encoder_layers,
                                      num_decoder_layers=num_decoder_layers, dim_feedforward=dim_feedforward,
                                      dropout=dropout, batch_first=True, norm_first=True)
        self.model = nn.Linear(d_model, out_dim)
        self.query_embs = nn.Parameter(torch.randn(1, num_output_tokens, d_model))   # std-1 init, as the original

    def forward(self, hidden: torch.Tensor, input_embeds: torch.Tensor) -> torch.Tensor:
        # (B, N, D_llm) -> (B, N, d) -> encoder; queries (B, T, d) -> decoder -> (B, T, D_out)
        x = self.fc(hidden + input_embeds)
        x = self.tfm(x, self.query_embs.expand(x.shape[0], -1, -1))
        return self.model(x)


class LinearProjector(nn.Module):
    """Per-token Linear(D_llm -> D_out), then Linear over tokens (N -> T)."""

    takes_empty_batch = True

    def __init__(self, in_dim: int, out_dim: int, num_input_tokens: int, num_output_tokens: int, **_unused):
        super().__init__()
        self.num_input_tokens, self.num_output_tokens, self.out_dim = num_input_tokens, num_output_tokens, out_dim
        self.fc = nn.Linear(in_dim, out_dim)
        self.token_map = nn.Linear(num_input_tokens, num_output_tokens)

    def forward(self, hidden: torch.Tensor, input_embeds: torch.Tensor) -> torch.Tensor:
        x = self.fc(hidden + input_embeds)                              # (B, N, D_out)
        return self.token_map(x.transpose(1, 2)).transpose(1, 2)        # (B, T, D_out)


class QFormerProjector(nn.Module):
    """Linear(D_llm -> d) -> Blip2QFormerModel (queries cross-attend in every layer) -> Linear(d -> D_out)."""

    takes_empty_batch = False       # transformers' Blip2 attention cannot reshape zero rows (view(..., -1, ...))

    def __init__(self, in_dim: int, out_dim: int, num_input_tokens: int, num_output_tokens: int, d_model: int = 768,
                 num_encoder_layers: int = 2, num_decoder_layers: int = 2, num_heads: int = 12,
                 dim_feedforward: int = 3072, dropout: float = 0.0):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        self.num_input_tokens, self.num_output_tokens, self.out_dim = num_input_tokens, num_output_tokens, out_dim
        config = Blip2QFormerConfig(hidden_size=d_model, num_hidden_layers=num_decoder_layers,
                                    num_attention_heads=num_heads, intermediate_size=dim_feedforward,
                                    hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                    cross_attention_frequency=1, encoder_hidden_size=d_model)
        self.fc = nn.Linear(in_dim, d_model)
        self.qformer = Blip2QFormerModel(config)
        self.query_tokens = nn.Parameter(torch.randn(1, num_output_tokens, d_model) * 0.02)
        self.model = nn.Linear(d_model, out_dim)

    def forward(self, hidden: torch.Tensor, input_embeds: torch.Tensor) -> torch.Tensor:
        x = self.fc(hidden + input_embeds)                              # (B, N, d)
        queries = self.query_tokens.expand(x.shape[0], -1, -1).to(x.dtype)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=x).last_hidden_state   # (B, T, d)
        return self.model(out.to(x.dtype))


PROJECTORS = {"transformer": TransformerProjector, "linear": LinearProjector, "qformer": QFormerProjector}


def build_output_proj(mode: str, in_dim: int, num_input_tokens: int, shape: tuple[int, int], settings) -> nn.Module:
    """One output projector. shape: (T, D_out) of the decoder; settings: cfg.model.output_proj."""
    cls = PROJECTORS[mode]  # model.output_proj.mode is a Literal of these keys
    tokens, dim = shape
    return cls(in_dim, dim, num_input_tokens, tokens, d_model=settings.d_model,
               num_encoder_layers=settings.num_encoder_layers, num_decoder_layers=settings.num_decoder_layers,
               num_heads=settings.num_heads, dim_feedforward=settings.dim_feedforward, dropout=settings.dropout)
