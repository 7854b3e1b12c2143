"""Online caption embeddings (`data.caption_embeds: online`): no precompute, the targets are made in the step.

    attach(model, cfg, device, dtype)      # train.py, once after build_model; a no-op for `precomputed`

The collator then carries `caption_texts` {modality: [caption]} (same order as the signal blocks) instead of
reading `caption_embeds` from the store; a forward pre-hook on the model fills batch["caption_embeds"]
{modality: (n, T, D)} (pooled decoders: (n, 1, D)) before NextGPT.forward reads it, so the training step and the
evaluation step both get them and forward itself is unchanged. Per modality ONE batched call of the decoder's own
text encoder (data/embeddings.CaptionEncoder: only the text encoder and its tokenizer are loaded, never the UNet /
VAE) under no_grad, in the training dtype, on the training device: the same computation process_embeddings runs,
so the vectors equal the precomputed ones (fp32: within 1e-5, tests/e2e/test_store.py).

The encoders are held by the hook, not registered as submodules: they stay out of DeepSpeed's parameter groups,
checkpoints and the trainable-parameter count.
"""

from __future__ import annotations

from pathlib import Path

import torch


class OnlineCaptionEmbeds:
    """{modality: [caption]} -> {modality: (n, T, D) tensor} with the configured decoders' text encoders."""

    def __init__(self, decoders: dict[str, str | Path], device, dtype: torch.dtype = torch.float32):
        from nextgpt.data.embeddings import CaptionEncoder

        self.encoders = {m: CaptionEncoder(m, folder, device=str(device), dtype=dtype)
                         for m, folder in decoders.items()}

    def __call__(self, texts: dict[str, list[str]]) -> dict[str, torch.Tensor]:
        out = {}
        for modality, captions in texts.items():
            if modality not in self.encoders:
                raise ValueError(f"online caption embeddings: no decoder configured for {modality} "
                                 f"(model.decoders.{modality})")
            embeds = self.encoders[modality].encode_tensor(captions)       # (n, T, D) or pooled (n, D)
            out[modality] = embeds.unsqueeze(1) if embeds.dim() == 2 else embeds
        return out

    def fill(self, batch: dict) -> dict:
        """batch["caption_embeds"] from batch["caption_texts"] (in place; returns the batch)."""
        texts = batch.get("caption_texts")
        if texts:
            batch["caption_embeds"] = self(texts)
        return batch


def attach(model: torch.nn.Module, cfg, device, dtype: torch.dtype) -> OnlineCaptionEmbeds | None:
    """For data.caption_embeds == online: load the text encoders of the configured modalities' decoders and fill
    each batch's caption_embeds in a forward pre-hook on `model`. -> the encoder set, or None (precomputed)."""
    if cfg.data.caption_embeds != "online":
        return None
    decoders = {m: cfg.path(cfg.model.decoders[m]) for m in cfg.model.modalities if cfg.model.decoders.get(m)}
    online = OnlineCaptionEmbeds(decoders, device, dtype)

    def hook(module, args):
        if args and isinstance(args[0], dict):
            online.fill(args[0])

    model.register_forward_pre_hook(hook)
    return online
