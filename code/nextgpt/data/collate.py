"""list[Encoded] -> the batch dict NextGPT.forward consumes.

    input_ids        LongTensor (B, L)   right-padded with token_ids.pad to the longest sample of THIS batch
    labels           LongTensor (B, L)   -100 on padding and unsupervised positions (not shifted)
    attention_mask   LongTensor (B, L)   1 on tokens, 0 on padding
    media_positions  LongTensor (N, 2)   (row, position) of each input medium's soft token, row-major
    media_modalities list[str] (N)       media_names list[str] (N)       media_paths list[str] (N)
    media_features   FloatTensor (N, F)  from <feature_dir>/<media name>.npy when EVERY medium of the batch is
                                         cached there, else None (the model then encodes media_paths live)
    signal_blocks    {modality: LongTensor (n_m, 2)}: (row, start) of each signal block, ordered by (row, position),
                     as conversation.encode recorded them (only modalities present in the batch)
    caption_embeds   {modality: FloatTensor (n_m, T_m, D_m)}: one row per signal block of that modality, same order
                     as signal_blocks[modality]; pooled decoders (AudioLDM) are stored (D,) and viewed (n, 1, D)
    target_paths     {modality: list[str] (n_m)}: each block's target medium (Target.media_path), same order
    target_keys      {modality: list[int] (n_m)}: a stable key of each target (its sample's file, record and block)
                     that seeds its noise draw in the denoising loss (model/denoising.py)
    samples          list[Sample] (B), for error messages
    skipped          list[str]: one line per record left out of this batch (skip_bad only; empty otherwise)

Every vector is checked where it is read (store.StoreReader.get: a real floating dtype, the manifest's dtype and
shape, finite) and every caption embedding against the shape its decoder consumes; a bad one is one line naming
the file (or shard row) and the sample's file + record. With skip_bad (data.skip_bad_records) that record is left
out of the batch instead and named in `skipped` (train.py logs and counts them); a batch with no good record left
is an error. The number of signal blocks in the token ids must equal the sample's targets.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from nextgpt.data.embeddings import storage_shape
from nextgpt.data.types import Encoded
from nextgpt import store
from nextgpt.store import tars
from nextgpt.store.manifest import read_manifest
from nextgpt.tokens import IGNORE, signal_blocks


def stack_signal_blocks(rows: list[list[tuple[str, int]]]) -> dict[str, torch.Tensor]:
    """Per-row [(modality, start)] -> {modality: LongTensor (n_m, 2) of (row, start)}, in (row, position) order."""
    out: dict[str, list[tuple[int, int]]] = {}
    for row, blocks in enumerate(rows):
        for modality, start in sorted(blocks, key=lambda b: b[1]):
            out.setdefault(modality, []).append((row, int(start)))
    return {m: torch.tensor(v, dtype=torch.long).reshape(-1, 2) for m, v in out.items()}


def target_key(source: str, index: int, block: int) -> int:
    """A stable 32-bit key of one target (sample file, record, block): the part of its noise seed that names it."""
    return zlib.crc32(f"{source}\0{index}\0{block}".encode())


class Collator:
    def __init__(self, token_ids, feature_dir: str | Path | None = None,
                 caption_shapes: dict[str, tuple[int, int]] | None = None,
                 feature_shape: tuple[int, ...] | None = None, caption_mode: str = "precomputed",
                 feature_fingerprint: str | None = None, skip_bad: bool = False):
        """caption_shapes: modality -> (T, D) the decoder consumes (nextgpt.modalities.conditioning_shape);
        feature_shape: expected ImageBind feature shape, default: the feature cache manifest's;
        caption_mode: precomputed (caption_embeds read from the store, checked against the caption's hash) |
        online (caption_texts {modality: [caption]} instead: model/caption_encoder.py embeds them in the step);
        feature_fingerprint: the configured ImageBind's (imagebind.features.encoder_fingerprint): features made
        by another checkpoint are refused; skip_bad: a record whose cached vector fails its read check is left out
        (named in batch["skipped"]) instead of failing the run."""
        self.token_ids, self.caption_mode, self.skip_bad = token_ids, caption_mode, skip_bad
        self.feature_dir = Path(feature_dir) if feature_dir else None
        self.caption_shapes = {m: tuple(s) for m, s in (caption_shapes or {}).items()}
        self.feature_shape = tuple(feature_shape) if feature_shape else None
        if self.feature_shape is None and self.feature_dir is not None and self.feature_dir.is_dir():
            manifest = read_manifest(self.feature_dir)
            if manifest is not None:
                self.feature_shape = tuple(manifest.section().shape)
        if feature_fingerprint and self.feature_dir is not None and self.feature_dir.is_dir():
            from nextgpt.imagebind.features import KIND

            reader = store.StoreReader(self.feature_dir, KIND)
            for modality in (reader.manifest.modalities if reader.manifest else {}):
                reader.check(modality, fingerprint=feature_fingerprint)

    def __call__(self, batch: list[Encoded]) -> dict:
        if not batch:
            raise ValueError("collate: empty batch")
        # Read (and check) every cached vector first: under skip_bad a record that fails is left out here.
        kept: list[tuple[Encoded, list[torch.Tensor], list[np.ndarray] | None]] = []
        skipped: list[str] = []
        reader = self._feature_reader(batch)
        for enc in batch:
            try:
                kept.append((enc, self._caption_embeds(enc), self._features(enc, reader)))
            except (FileNotFoundError, ValueError) as e:
                if not self.skip_bad:
                    raise
                skipped.append(str(e))                   # names the file and the record
        if not kept:
            raise ValueError(f"collate: no good record left in the batch (data.skip_bad_records): {'; '.join(skipped)}")
        batch = [enc for enc, _, _ in kept]
        length = max(len(e.input_ids) for e in batch)
        size = (len(batch), length)
        input_ids = torch.full(size, self.token_ids.pad, dtype=torch.long)
        labels = torch.full(size, IGNORE, dtype=torch.long)
        attention_mask = torch.zeros(size, dtype=torch.long)
        positions: list[tuple[int, int]] = []
        modalities: list[str] = []
        names: list[str] = []
        paths: list[str] = []
        embeds: dict[str, list[torch.Tensor]] = {}
        texts: dict[str, list[str]] = {}             # online caption embeddings: the captions, same order
        blocks: list[list[tuple[str, int]]] = []
        target_paths: dict[str, list[str]] = {}
        target_keys: dict[str, list[int]] = {}
        features: list[np.ndarray] = []
        for row, (enc, captions, cached) in enumerate(kept):
            sample = enc.sample
            n = len(enc.input_ids)
            if len(enc.labels) != n:
                raise ValueError(f"{sample.where}: {n} input ids but {len(enc.labels)} labels")
            input_ids[row, :n] = torch.tensor(enc.input_ids, dtype=torch.long)
            labels[row, :n] = torch.tensor(enc.labels, dtype=torch.long)
            attention_mask[row, :n] = 1
            if len(enc.media_positions) != len(sample.media):
                raise ValueError(f"{sample.where}: {len(sample.media)} media but {len(enc.media_positions)} "
                                 "soft-token positions")
            for position, medium in zip(enc.media_positions, sample.media):
                positions.append((row, int(position)))
                modalities.append(medium.modality)
                names.append(medium.name)
                paths.append(medium.path)
            blocks.append(self._blocks(enc))
            for block, (target, embed) in enumerate(zip(sample.targets, captions or [None] * len(sample.targets))):
                target_paths.setdefault(target.modality, []).append(target.media_path)
                target_keys.setdefault(target.modality, []).append(target_key(sample.source, sample.index, block))
                if self.caption_mode == "online":
                    texts.setdefault(target.modality, []).append(target.caption)
                else:
                    embeds.setdefault(target.modality, []).append(embed)
            features += cached or []
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "media_positions": torch.tensor(positions, dtype=torch.long).reshape(-1, 2),
            "media_modalities": modalities,
            "media_names": names,
            "media_paths": paths,
            "media_features": self._stack_features(features, names, batch),
            "signal_blocks": stack_signal_blocks(blocks),
            "caption_embeds": {m: torch.stack(v) for m, v in embeds.items()},
            **({"caption_texts": texts} if self.caption_mode == "online" else {}),
            "target_paths": target_paths,
            "target_keys": target_keys,
            "samples": [e.sample for e in batch],
            "skipped": skipped,
        }

    # ------------------------------------------------------------------------------------------------------------
    def _blocks(self, enc: Encoded) -> list[tuple[str, int]]:
        """The sample's signal blocks (recorded by encode, or scanned once for a hand-made Encoded), checked: each
        holds its modality's ids, and they match the sample's caption-embedding targets in number per modality."""
        blocks = enc.signal_blocks
        if blocks is None:
            blocks = signal_blocks(enc.input_ids, self.token_ids, enc.sample.where)
        for modality, start in blocks:
            signal = self.token_ids.signal[modality]
            if list(enc.input_ids[start:start + len(signal)]) != signal:
                raise ValueError(f"{enc.sample.where}: no {modality} signal block at position {start}")
        for m in self.token_ids.signal:
            found = sum(1 for b, _ in blocks if b == m)
            targets = sum(1 for t in enc.sample.targets if t.modality == m)
            if found != targets:
                raise ValueError(f"{enc.sample.where}: {found} {m} signal block(s) in the tokens but {targets} "
                                 f"{m} caption embedding(s)")
        return blocks

    def _caption_embeds(self, enc: Encoded) -> list[torch.Tensor]:
        """One (T, D) tensor per target of the sample (precomputed mode; online: none are read)."""
        if self.caption_mode == "online":
            return []
        return [self._caption_embed(target, enc.sample) for target in enc.sample.targets]

    def _caption_embed(self, target, sample) -> torch.Tensor:
        """(T, D) float32 tensor of one target (pooled: (1, D))."""
        expected = self.caption_shapes.get(target.modality)
        folder, name = store.split_item_path(target.embed_path)
        try:       # either store layout; stale, non-finite, complex / string / other-dtype items raise, named
            array = store.open_reader(folder).get(name, caption=target.caption)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{e} (caption embedding of {sample.where})") from None
        if expected is not None:
            want = storage_shape(target.modality, expected)
            if tuple(array.shape) not in (want, tuple(expected)):
                raise ValueError(f"{target.embed_path}: shape {tuple(array.shape)}, the {target.modality} decoder "
                                 f"needs {want} (caption embedding of {sample.where})")
        tensor = torch.from_numpy(array)
        return tensor.reshape(1, -1) if tensor.dim() == 1 else tensor

    def _feature_reader(self, batch: list[Encoded]):
        """The feature store when EVERY medium of the batch is cached there (else None: encoded live)."""
        if self.feature_dir is None:
            return None
        names = [m.name for e in batch for m in e.sample.media]
        reader = store.open_reader(self.feature_dir)             # files or memory-mapped shards
        return reader if names and all(reader.has(n) for n in names) else None

    def _features(self, enc: Encoded, reader) -> list[np.ndarray] | None:
        """(F,) cached ImageBind feature of each medium of the sample, checked; None when they are encoded live
        (after checking the media files exist, so a dangling name fails here with the sample named rather than
        deep inside the encoder)."""
        if reader is None:
            for medium in enc.sample.media:
                if not tars.media_exists(medium.path):     # a file, or a member of its folder's shards
                    raise FileNotFoundError(f"{medium.path}: media file missing and no cached feature "
                                            f"({enc.sample.where})")
            return None
        arrays = []
        for medium in enc.sample.media:
            try:
                array = reader.get(medium.name)
                if self.feature_shape is not None and tuple(array.shape) != self.feature_shape:
                    raise ValueError(f"{store.item_path(self.feature_dir, medium.name)}: shape {array.shape}, "
                                     f"expected {self.feature_shape}")
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"{e} (ImageBind feature of {enc.sample.where})") from None
            arrays.append(array)
        return arrays

    def _stack_features(self, arrays: list[np.ndarray], names: list[str], batch: list[Encoded]
                        ) -> torch.Tensor | None:
        """(N, F) float32 when the media were read from the cache, else None."""
        if not names or len(arrays) != len(names):
            return None
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"{self.feature_dir}: features of different shapes {sorted(shapes)} in one batch")
        return torch.from_numpy(np.stack(arrays))
