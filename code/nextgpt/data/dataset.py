"""Map-style datasets of encoded samples, and the loader a stage trains from.

    datasets = build_datasets(cfg, tokenizer, token_ids, cfg.data.datasets)   # {name: NextGPTDataset}
    loader, sampler = build_loader(cfg, tokenizer, token_ids, rank, world_size)

Records are read (and checked) once at build time; each item is tokenised lazily by
`nextgpt.data.conversation.encode` (the model engineer's template code). A sample whose signal block does not fit
`cfg.model.max_length` (`TruncatedSignalError`) is counted, reported in one warning line, and replaced by the next
sample of the same dataset that fits, so batch sizes, the sampler's plan and resume positions stay exact. Any other
`EncodeError` (e.g. reserved tokens in the text) is a data error: raised, or skipped the same way when
cfg.data.skip_bad_records is set.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Dataset

from nextgpt.data.types import Encoded, Sample
from nextgpt.modalities import MODALITIES


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class NextGPTDataset(Dataset):
    def __init__(self, name: str, samples: list[Sample], tokenizer, token_ids, max_length: int, log=_warn,
                 skip_bad: bool = False):
        if not samples:
            raise ValueError(f"dataset {name}: no samples")
        self.name, self.samples = name, samples
        self.tokenizer, self.token_ids, self.max_length = tokenizer, token_ids, max_length
        self.log, self.skip_bad = log, skip_bad
        self.skipped: set[int] = set()     # indices whose signal block would be truncated (this process)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Encoded:
        from nextgpt.data.conversation import EncodeError, TruncatedSignalError, encode

        n = len(self.samples)
        for step in range(n):
            i = (index + step) % n
            if i in self.skipped:
                continue
            try:
                return encode(self.samples[i], self.tokenizer, self.token_ids, self.max_length)
            except EncodeError as e:
                if not (isinstance(e, TruncatedSignalError) or self.skip_bad):
                    raise
                self.skipped.add(i)
                self.log(f"warning: {self.name}: skipping {self.samples[i].where} ({e}); "
                         f"{len(self.skipped)} skipped so far")
        raise ValueError(f"dataset {self.name}: no sample can be encoded within max_length {self.max_length}")

    @property
    def lengths(self) -> list[int]:
        """Cheap length estimates for length-grouped sampling (no tokenisation): words + template tokens +
        signal tokens + soft tokens. Only their order matters."""
        out = []
        for s in self.samples:
            words = sum(len(t.text.split()) for t in s.turns)
            signal = sum(MODALITIES[t.modality].num_signal_tokens for t in s.targets)
            out.append(words + 8 * len(s.turns) + signal + 3 * len(s.media))
        return out

    def split(self, fraction: float, seed: int) -> tuple["NextGPTDataset", "NextGPTDataset"]:
        """(train, held-out) with round(fraction * len) held-out samples chosen by `seed` (at least one of each)."""
        import numpy as np

        n = len(self.samples)
        k = min(max(1, round(fraction * n)), n - 1) if n > 1 else 0
        if k == 0:
            raise ValueError(f"dataset {self.name}: {n} sample(s) cannot be split for evaluation")
        held = set(np.random.default_rng([seed, n]).permutation(n)[:k].tolist())
        keep = [s for i, s in enumerate(self.samples) if i not in held]
        out = [s for i, s in enumerate(self.samples) if i in held]
        args = (self.tokenizer, self.token_ids, self.max_length, self.log, self.skip_bad)
        return NextGPTDataset(self.name, keep, *args), NextGPTDataset(f"{self.name}/eval", out, *args)


def build_datasets(cfg, tokenizer, token_ids, names: list[str] | None = None, log=_warn) -> dict[str, NextGPTDataset]:
    """{name: NextGPTDataset} for the catalog names (default: cfg.data.datasets), in the given order."""
    from nextgpt.data.readers import read_dataset

    names = list(cfg.data.datasets if names is None else names)
    if not names:
        raise ValueError("no datasets configured (data.datasets is empty)")
    out = {}
    for name in names:
        samples = read_dataset(cfg, name, log=log)
        out[name] = NextGPTDataset(name, samples, tokenizer, token_ids, cfg.model.max_length, log=log,
                                   skip_bad=cfg.data.skip_bad_records)
    return out


def caption_shapes(cfg) -> dict[str, tuple[int, int]]:
    """modality -> (T, D) the configured decoder consumes, for every modality whose decoder folder exists."""
    from nextgpt.modalities import conditioning_shape

    shapes = {}
    for m in cfg.model.modalities:
        folder = cfg.model.decoders.get(m)
        if folder and Path(cfg.path(folder)).is_dir():
            shapes[m] = conditioning_shape(m, cfg.path(folder))
    return shapes


def build_loader(cfg, tokenizer, token_ids, rank: int = 0, world_size: int = 1, names: list[str] | None = None,
                 datasets: dict[str, NextGPTDataset] | None = None, log=_warn):
    """(DataLoader, MixtureSampler) over cfg.data.datasets: the stage's mixture, seeded by cfg.train.seed,
    micro-batches of cfg.train.micro_batch_size per rank, padded by Collator. The sampler carries the resume
    state (state_dict / load_state_dict)."""
    from torch.utils.data import DataLoader

    from nextgpt.data.collate import Collator
    from nextgpt.data.sampler import MixtureSampler

    datasets = datasets if datasets is not None else build_datasets(cfg, tokenizer, token_ids, names, log=log)
    parts = list(datasets.values())
    sampler = MixtureSampler(parts, batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed, rank=rank,
                             world_size=world_size, group_by_length=cfg.data.group_by_length,
                             mode=cfg.data.mixture)
    feature_dir = cfg.path(cfg.data.feature_dir) if cfg.data.feature_dir else None
    collator = Collator(token_ids, feature_dir=feature_dir, caption_shapes=caption_shapes(cfg))
    loader = DataLoader(ConcatDataset(parts), batch_sampler=sampler, collate_fn=collator,
                        num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=cfg.data.num_workers > 0)
    return loader, sampler
