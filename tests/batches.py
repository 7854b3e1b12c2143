"""Hand-made batches for the model tests (tests/unit/model/test_model.py, tests/e2e/test_generate_overfit.py): the
collate contract with random ImageBind features and caption embeddings, without the data pipeline."""

from __future__ import annotations

import torch

from nextgpt.data.collate import stack_signal_blocks
from nextgpt.data.conversation import encode
from nextgpt.data.types import Sample


def make_batch(model, samples, seed=0, max_length=256):
    """The collate contract (input_ids, labels, attention_mask, media_*, caption_embeds, samples) with random
    ImageBind features and caption embeddings of the decoders' shapes."""
    generator = torch.Generator().manual_seed(seed)
    encoded = [encode(s, model.tokenizer, model.token_ids, max_length, prompt="generate a caption") for s in samples]
    length = max(len(e.input_ids) for e in encoded)
    batch_size = len(encoded)
    input_ids = torch.full((batch_size, length), model.token_ids.pad)
    labels = torch.full((batch_size, length), -100)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    positions, media, embeds = [], [], {}
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = torch.tensor(e.input_ids), \
            torch.tensor(e.labels), 1
        positions += [(row, p) for p in e.media_positions]
        media += e.sample.media
        for target in e.sample.targets:
            shape = model.conditioning_shapes[target.modality]
            embeds.setdefault(target.modality, []).append(torch.randn(shape, generator=generator))
    return {
        "input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
        "media_positions": torch.tensor(positions, dtype=torch.long).reshape(-1, 2),
        "media_modalities": [m.modality for m in media], "media_names": [m.name for m in media],
        "media_paths": [m.path for m in media],
        "media_features": torch.randn(len(media), 16, generator=generator) if media else None,
        "signal_blocks": stack_signal_blocks([e.signal_blocks for e in encoded]),
        "caption_embeds": {m: torch.stack(v) for m, v in embeds.items()},
        "samples": list(samples),
    }


def sample(turns, media=(), targets=(), index=0):
    return Sample("test", "test.json", index, list(turns), list(media), list(targets))
