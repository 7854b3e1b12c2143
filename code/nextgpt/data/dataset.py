"""Map-style datasets of encoded samples, and the loader a stage trains from.

    datasets = build_datasets(cfg, tokenizer, token_ids, cfg.data.datasets)   # {name: NextGPTDataset}
    loader, sampler = build_loader(cfg, tokenizer, token_ids, rank, world_size)

Records are read (and checked) once at build time; each item is tokenised lazily by
`nextgpt.data.conversation.encode` (the model engineer's template code). A sample whose signal block does not fit
`cfg.model.max_length` (`TruncatedSignalError`) is counted and replaced by the next sample of the same dataset that
fits, so batch sizes, the sampler's plan and resume positions stay exact. Any other `EncodeError` (e.g. reserved
tokens in the text) is a data error: raised, or skipped the same way when cfg.data.skip_bad_records is set.
Skips are reported per dataset, not per record: one warning line at the first skip (naming that record), then one
count line per pass over the dataset that skipped more; when no sample fits at all, only the error is printed, with
the count and the first record.

Length grouping (`lengths`) uses the true template token counts, tokenised lazily in one batched fast-tokenizer
call per dataset (`token_lengths`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Dataset

from nextgpt.cli import ignore_stop_signals
from nextgpt.data.types import Encoded, Sample


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
        self.first_skip: str | None = None           # the first skipped record and why, for the summaries
        self._reported = 0                           # len(skipped) when the last warning line was printed
        self._requests = 0                           # __getitem__ calls, to report once per pass
        self._lengths: list[int] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Encoded:
        from nextgpt.data.conversation import EncodeError, TruncatedSignalError, encode

        n = len(self.samples)
        self._requests += 1
        for step in range(n):
            i = (index + step) % n
            if i in self.skipped:
                continue
            try:
                encoded = encode(self.samples[i], self.tokenizer, self.token_ids, self.max_length)
            except EncodeError as e:
                if not (isinstance(e, TruncatedSignalError) or self.skip_bad):
                    raise
                self.skipped.add(i)
                if self.first_skip is None:
                    where = self.samples[i].where
                    self.first_skip = str(e) if where in str(e) else f"{where}: {e}"
                continue
            self._report()
            return encoded
        raise ValueError(f"dataset {self.name}: no sample can be encoded within max_length {self.max_length} "
                         f"({len(self.skipped)} of {n} skipped; first: {self.first_skip})")

    def _report(self) -> None:
        """One warning at the first skip, then a count line at the end of each pass that skipped more."""
        count = len(self.skipped)
        if count == self._reported:
            return
        if self._reported == 0:
            self.log(f"warning: {self.name}: {count} sample(s) skipped so far, first: {self.first_skip}; later "
                     "skips are counted and reported once per pass")
        elif self._requests % len(self.samples) == 0:
            self.log(f"warning: {self.name}: {count} of {len(self.samples)} samples skipped so far "
                     f"(first: {self.first_skip})")
        else:
            return
        self._reported = count

    @property
    def lengths(self) -> list[int]:
        """Token count of each sample's encoded sequence (template included, capped at max_length), for
        length-grouped sampling; computed on first use (one batched tokenizer call) and kept."""
        if self._lengths is None:
            self._lengths = token_lengths(self.samples, self.tokenizer, self.token_ids, self.max_length)
        return self._lengths

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
        train, held_out = NextGPTDataset(self.name, keep, *args), NextGPTDataset(f"{self.name}/eval", out, *args)
        if self._lengths is not None:               # already tokenised: no need to do it again
            train._lengths = [x for i, x in enumerate(self._lengths) if i not in held]
            held_out._lengths = [x for i, x in enumerate(self._lengths) if i in held]
        return train, held_out


def token_lengths(samples: list[Sample], tokenizer, token_ids, max_length: int, chunk: int = 20000) -> list[int]:
    """Length of each sample as `conversation.encode` builds it, from ONE batched tokenizer call per `chunk`
    samples (the fast tokenizer encodes a batch in Rust) instead of encode()'s per-chunk Python calls.

    The template's pieces are counted as encode() joins them: BOS; "### Human:" <Img> soft </Img> per medium
    (3 ids each) and the first question + "\n### Assistant: "; "Human: " + later questions + the same; each answer
    + "\n###", with its signal block's ids. Where encode() strips whitespace next to an added token the count
    may differ by a token; only the order matters for grouping. Capped at prefix + max_length (encode() cuts the
    ids after the prompt prefix to max_length, as the original did)."""
    from nextgpt.data.conversation import template_of

    template = template_of(token_ids)          # model.template's strings (vicuna_v0 or the tokenizer's chat)
    HUMAN_PREFIX, LATER_HUMAN = template.first_human, template.later_human
    ASSISTANT, TURN_END = template.assistant, template.turn_end

    backend = getattr(tokenizer, "backend_tokenizer", None)      # the Rust tokenizer of a fast tokenizer

    def count(texts: list[str]) -> list[int]:
        if not texts:
            return []
        if backend is not None:      # ~2x faster than tokenizer(texts): no conversion of the ids to Python lists
            return [len(encoding) for encoding in backend.encode_batch(texts, add_special_tokens=False)]
        return [len(x) for x in tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]]

    prefix_plain, prefix_media, turn_end_after_signal = count([HUMAN_PREFIX, HUMAN_PREFIX.rstrip(), TURN_END.strip()])
    out: list[int] = []
    for start in range(0, len(samples), chunk):
        texts: list[str] = []
        fixed: list[int] = []        # per sample: template ids not in `texts`
        prefixes: list[int] = []     # per sample: the prompt prefix that max_length does not count
        owners: list[int] = []       # per text: the sample (index into this chunk) it belongs to
        for k, sample in enumerate(samples[start:start + chunk]):
            total = prefix = 1                                               # BOS
            for i, turn in enumerate(sample.turns):
                if turn.role == "human":
                    if i == 0 and sample.media:
                        total += prefix_media + 3 * len(sample.media)        # <Img> soft </Img> per medium
                        prefix = total - 1                                   # up to the last soft token
                        texts.append(turn.text.lstrip() + ASSISTANT)
                    elif i == 0:
                        total += prefix_plain
                        prefix = total
                        texts.append(turn.text + ASSISTANT)
                    else:
                        texts.append(LATER_HUMAN + turn.text + ASSISTANT)
                elif turn.output_modality in token_ids.signal:
                    total += len(token_ids.signal[turn.output_modality]) + turn_end_after_signal
                    texts.append(turn.text.rstrip())
                else:
                    texts.append(turn.text + TURN_END)
                owners.append(k)
            fixed.append(total)
            prefixes.append(prefix)
        for k, n in zip(owners, count(texts)):
            fixed[k] += n
        out += [min(n, prefix + max_length) for n, prefix in zip(fixed, prefixes)]
    return out


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


def feature_fingerprint(cfg) -> str | None:
    """The configured ImageBind checkpoint's fingerprint (nextgpt/store/), which the feature store must match;
    None when the checkpoint is not here (nothing to compare with: stage 1 then relies on the cache alone)."""
    checkpoint = cfg.path(cfg.model.imagebind)
    if not checkpoint.is_file():
        return None
    from nextgpt.imagebind.features import encoder_fingerprint

    return encoder_fingerprint(checkpoint, cfg.model.imagebind_preset)


def build_loader(cfg, tokenizer, token_ids, rank: int = 0, world_size: int = 1, names: list[str] | None = None,
                 datasets: dict[str, NextGPTDataset] | None = None, log=_warn, pin_memory: bool = False):
    """(DataLoader, MixtureSampler) over cfg.data.datasets: the stage's mixture, seeded by cfg.train.seed,
    micro-batches of cfg.train.micro_batch_size per rank, padded by Collator. The sampler carries the resume
    state (state_dict / load_state_dict). pin_memory: the batches go to a GPU (the run's device decision)."""
    from torch.utils.data import DataLoader

    from nextgpt.data.collate import Collator
    from nextgpt.data.sampler import MixtureSampler

    datasets = datasets if datasets is not None else build_datasets(cfg, tokenizer, token_ids, names, log=log)
    parts = list(datasets.values())
    sampler = MixtureSampler(parts, batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed, rank=rank,
                             world_size=world_size, group_by_length=cfg.data.group_by_length,
                             mode=cfg.data.mixture)
    feature_dir = cfg.path(cfg.data.feature_dir) if cfg.data.feature_dir else None
    collator = Collator(token_ids, feature_dir=feature_dir, caption_shapes=caption_shapes(cfg),
                        caption_mode=cfg.data.caption_embeds, feature_fingerprint=feature_fingerprint(cfg),
                        skip_bad=cfg.data.skip_bad_records)

    # Workers ignore Ctrl-C / SIGTERM: the training process decides when to stop (it may need one more batch to
    # finish the step it saves); they exit with it (torch's worker watchdog).
    loader = DataLoader(ConcatDataset(parts), batch_sampler=sampler, collate_fn=collator,
                        num_workers=cfg.data.num_workers, pin_memory=pin_memory,
                        persistent_workers=cfg.data.num_workers > 0,
                        worker_init_fn=ignore_stop_signals if cfg.data.num_workers > 0 else None)
    return loader, sampler
