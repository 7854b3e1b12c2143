"""A folder of per-item vectors: `<dir>/<media file name>.npy` plus `manifest.json`.

Used for caption embeddings (process_embeddings.py; stage 2/3 targets) and ImageBind features (--features;
stage-1 cache). Items already present and valid are skipped, so a rerun after a kill finishes the job; every
file is written atomically, so a kill never leaves a truncated `.npy` behind that a later run would accept.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nextgpt.io import atomic_save_npy, atomic_write_text

MANIFEST = "manifest.json"


@dataclass
class Manifest:
    kind: str                 # "caption_embeddings" | "imagebind_features"
    encoder: str              # decoder folder / ImageBind checkpoint + preset that produced the vectors
    shape: list[int]          # per item, e.g. [77, 768], [512], [1024]
    dtype: str                # float16 | float32
    count: int = 0            # items present when the manifest was written


def item_path(cache_dir: str | Path, name: str) -> Path:
    """Cache file of a media file name, e.g. 001312382.jpg -> <dir>/001312382.jpg.npy."""
    return Path(cache_dir) / f"{Path(name).name}.npy"


def read_manifest(cache_dir: str | Path) -> Manifest | None:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return Manifest(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path}: not a valid manifest ({e})") from None


def load_item(path: str | Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Load one `.npy`; a missing, truncated or wrong-shaped file raises ValueError naming the file."""
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: unreadable or truncated .npy ({e})") from None
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise ValueError(f"{path}: shape {tuple(array.shape)}, expected {tuple(shape)}")
    return array


def is_valid(path: Path, shape: tuple[int, ...]) -> bool:
    try:
        load_item(path, shape)
        return True
    except (FileNotFoundError, ValueError):
        return False


class EmbedCache:
    """Write side: `todo(names)` -> names still to compute; `put(name, array)`; `close()` writes the manifest."""

    def __init__(self, cache_dir: str | Path, kind: str, encoder: str, shape: tuple[int, ...], dtype: str):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(kind=kind, encoder=encoder, shape=list(shape), dtype=dtype)
        old = read_manifest(self.dir)
        if old is not None and (old.kind, old.shape) != (kind, list(shape)):
            raise ValueError(f"{self.dir}: holds {old.kind} of shape {old.shape} from {old.encoder}; refusing to "
                             f"mix in {kind} of shape {list(shape)} (use another folder)")

    def todo(self, names: list[str]) -> list[str]:
        shape = tuple(self.manifest.shape)
        return [n for n in dict.fromkeys(names) if not is_valid(item_path(self.dir, n), shape)]

    def put(self, name: str, array: np.ndarray) -> None:
        if tuple(array.shape) != tuple(self.manifest.shape):
            raise ValueError(f"{name}: computed shape {tuple(array.shape)}, expected {tuple(self.manifest.shape)}")
        path = item_path(self.dir, name)
        try:
            atomic_save_npy(path, array.astype(self.manifest.dtype, copy=False))
        except OSError as e:
            raise OSError(f"{path}: write failed ({e.strerror or e})") from None

    def close(self) -> Manifest:
        self.manifest.count = sum(1 for p in self.dir.glob("*.npy") if not p.name.startswith("."))
        atomic_write_text(self.dir / MANIFEST, json.dumps(asdict(self.manifest), indent=2) + "\n")
        return self.manifest
