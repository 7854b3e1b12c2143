"""Media files -> ImageBind embeddings, batched: `Encoder(checkpoint, preset).encode(paths, "video")`.

Only the vision and audio towers are loaded (the text tower is 350 M parameters NExT-GPT never uses). bf16 on
CUDA, fp32 on CPU unless told otherwise; results always come back as float32 on the CPU.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from nextgpt.modalities import get as get_modality
from nextgpt.runtime import pick_device

from . import preprocess, preprocess_audio, preprocess_video
from .model import ImageBindModel, load_imagebind, resolve_config

# NExT-GPT modality -> preprocessing of one file (the ImageBind tower comes from the modality table).
LOADERS: dict[str, Callable[[str | Path], torch.Tensor]] = {
    "image": preprocess.load_image,        # (3, 224, 224)
    "video": preprocess_video.load_video,        # (15, 3, 2, 224, 224)
    "audio": preprocess_audio.load_audio,        # (3, 1, 128, 204)
}


def preprocessed_batches(paths: Sequence[str | Path], modality: str, batch_size: int, workers: int = 2
                         ) -> Iterator[torch.Tensor]:
    """Stacked preprocessed batches (B, ...) in order; files are decoded by `workers` threads, one batch ahead
    of the model (PIL, PyAV and torch release the GIL while decoding / resizing)."""
    load = LOADERS[modality]
    chunks = [list(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)]
    if workers <= 0:
        for chunk in chunks:
            yield torch.stack([load(p) for p in chunk])
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = [pool.submit(load, p) for p in chunks[0]] if chunks else []
        for index in range(len(chunks)):
            current = pending
            pending = [pool.submit(load, p) for p in chunks[index + 1]] if index + 1 < len(chunks) else []
            try:
                yield torch.stack([future.result() for future in current])
            except BaseException:
                for future in pending:
                    future.cancel()
                raise


class LazyEncoder:
    """The ImageBind a model is given for batches without cached features: an Encoder made on its first encode, so a
    run that reads cached features never loads ImageBind. Not an nn.Module: never in a state_dict or a delta."""

    def __init__(self, checkpoint: str | Path, preset: str = "huge", device=None, dtype=None):
        self.checkpoint, self.preset, self.device, self.dtype = str(checkpoint), preset, device, dtype
        self.encoder: Encoder | None = None

    def encode(self, paths: Sequence[str | Path], modality: str) -> torch.Tensor:        # -> (N, out_dim) float32
        if self.encoder is None:
            self.encoder = Encoder(self.checkpoint, self.preset, device=self.device, dtype=self.dtype)
        return self.encoder.encode(paths, modality)


class Encoder:
    """A loaded, frozen ImageBind (vision + audio) that turns media files into (N, out_dim) float32 vectors."""

    def __init__(self, checkpoint: str | Path, preset: str = "huge", device=None, dtype=None):
        # device / dtype: the script's decision (None: nextgpt.runtime.pick_device's rule)
        self.device, self.dtype, _ = pick_device(device, dtype)
        self.checkpoint, self.preset = str(checkpoint), preset
        self.out_dim = int(resolve_config(preset)["out_embed_dim"])
        self.model = load_imagebind(checkpoint, preset, device=self.device, dtype=self.dtype,
                                    modalities=("vision", "audio"))

    @classmethod
    def from_model(cls, model: ImageBindModel, device=None, dtype=None, name: str = "in-memory") -> "Encoder":
        """Wrap an already built model (benchmarks with random weights; tests)."""
        encoder = cls.__new__(cls)
        encoder.device, encoder.dtype, _ = pick_device(device, dtype)
        encoder.checkpoint, encoder.preset, encoder.out_dim = name, name, model.out_dim
        encoder.model = model.to(device=encoder.device, dtype=encoder.dtype).eval().requires_grad_(False)
        return encoder

    @torch.no_grad()
    def encode_tensors(self, modality: str, batch: torch.Tensor) -> torch.Tensor:
        """Preprocessed (B, ...) -> (B, out_dim) float32 on the CPU."""
        tower = get_modality(modality).imagebind_key
        batch = batch.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return self.model.encode(tower, batch).float().cpu()

    def iter_encode(self, paths: Sequence[str | Path], modality: str, batch_size: int = 8, workers: int = 2
                    ) -> Iterator[torch.Tensor]:
        """(b, out_dim) per batch of `paths`, in order; lets callers save progress batch by batch."""
        get_modality(modality)
        for batch in preprocessed_batches(paths, modality, batch_size, workers):
            yield self.encode_tensors(modality, batch)

    def encode(self, paths: Sequence[str | Path], modality: str, batch_size: int = 8, workers: int = 2
               ) -> torch.Tensor:
        """Media files of one modality -> (N, out_dim) float32. An unusable file raises MediaError naming it."""
        if not paths:
            return torch.zeros(0, self.out_dim)
        return torch.cat(list(self.iter_encode(paths, modality, batch_size, workers)))
