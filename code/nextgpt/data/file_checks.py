"""The single-file checks of data validation (validate.py runs them per record, app.py per upload):

    check_media(path, modality, decode)            a medium exists and, with decode, goes through the loader training
                                                   uses (nextgpt.imagebind.encode.LOADERS)
    check_values(path, shape, dtype, full)         a caption embedding / ImageBind feature (.npy file or shard row)
                                                   is complete, of the manifest's dtype and finite
    expected_shapes(cfg, report, dtypes)           the caption-embedding shape each configured decoder needs

Each returns None when the file is usable, else (kind, reason) with kind MISSING or CORRUPT and a one-line reason
that names the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nextgpt.data.embeddings import KIND, check_npy, storage_shape
from nextgpt.modalities import MODALITIES, conditioning_shape
from nextgpt.store.manifest import read_manifest
from nextgpt.store import tars

MISSING, CORRUPT = "missing", "corrupt"


def check_media(path: str | Path, modality: str, decode: bool = True) -> tuple[str, str] | None:
    """None when the medium is usable, else (kind, reason). decode=False: existence only."""
    path = Path(path)
    member = None
    if not path.is_file():
        try:
            member = tars.locate(path)            # a member of the folder's webdataset shards, read by offset
        except ValueError as e:                    # the shard index is unreadable or a shard changed since
            return CORRUPT, str(e)
        if member is None:
            return MISSING, f"{path}: media file missing" + (
                f" (not in the shard index {path.parent / tars.INDEX_JSON})" if tars.is_tar_backed(path.parent) else "")
        if member.size == 0:
            return CORRUPT, f"{member}: empty member ({path})"
    elif path.stat().st_size == 0:
        return CORRUPT, f"{path}: empty file"
    if not decode:
        return None
    from nextgpt.imagebind.encode import LOADERS

    try:
        # the exact decoding + transforms training uses (a shard member: its bytes, read by offset)
        LOADERS[modality](tars.read_member(member) if member else str(path))
    except (ValueError, OSError, RuntimeError, EOFError, StopIteration, IndexError, MemoryError) as e:
        # what PIL / soundfile / PyAV / MediaError raise on a bad file: this file cannot be trained on
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        label = str(member or path)               # a shard member is named `<shard>:<member>`
        return CORRUPT, reason if reason.startswith(label) else f"{label}: cannot decode ({reason})"
    return None


def check_values(path: str | Path, shape: tuple[int, ...] | None, dtype: str | None, full: bool,
                 what: str = "caption embedding") -> tuple[str, str] | None:
    """None when the .npy at `path` is usable, else (kind, reason). Always: complete file of `shape` (header and
    size). full=True also reads the values: of the dtype the manifest names and all finite (a NaN or inf vector
    would poison every step it is in; float16 stores overflow to inf)."""
    from nextgpt import store

    try:
        sharded = store.open_reader(Path(path).parent).layout == "shards"
    except ValueError:
        sharded = False
    if sharded:          # <folder>/<name>.npy names a row of a memory-mapped shard (nextgpt/store/)
        reason = store.check_item(path, shape, values=full)
        if reason is None:
            return None
        return (MISSING, f"{path}: {what} missing") if reason == "missing" else (CORRUPT, f"{path}: {reason}")
    reason = check_npy(path, shape)
    if reason == "missing":
        return MISSING, f"{path}: {what} missing"
    if reason is not None:
        return CORRUPT, f"{path}: {reason}"
    if full:
        try:
            array = np.load(path, allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError) as e:
            return CORRUPT, f"{path}: unreadable .npy ({e})"
        if dtype is not None and array.dtype != np.dtype(dtype):
            return CORRUPT, f"{path}: dtype {array.dtype}, the manifest says {dtype}"
        if not np.issubdtype(array.dtype, np.floating):
            return CORRUPT, f"{path}: dtype {array.dtype}, expected floating point"
        finite = np.isfinite(array)
        if not finite.all():
            return CORRUPT, f"{path}: {int(finite.size - finite.sum())} non-finite value(s) (NaN/inf)"
    return None


def expected_shapes(cfg, report, dtypes: dict[str, str] | None = None) -> dict[str, tuple[int, ...] | None]:
    """modality -> on-disk caption-embedding shape the configured decoder needs (None: unknown, not checked).
    `dtypes` (when given) is filled with modality -> the dtype the embedding manifest names."""
    embed_dir = cfg.path(cfg.data.embed_dir)
    try:
        manifest = read_manifest(embed_dir, KIND)
        sections = manifest.modalities if manifest else {}
    except ValueError as e:
        report.errors.append(str(e))
        sections = {}
    if dtypes is not None:
        dtypes.update({m: section.dtype for m, section in sections.items()})
    shapes: dict[str, tuple[int, ...] | None] = {}
    for m in MODALITIES:
        decoder = cfg.model.decoders.get(m)
        try:
            shapes[m] = storage_shape(m, conditioning_shape(m, cfg.path(decoder))) if decoder else None
        except (FileNotFoundError, ValueError) as e:
            shapes[m] = tuple(sections[m].shape) if m in sections else None
            how = f"using the embedding manifest's {shapes[m]}" if shapes[m] else "shapes are not checked"
            report.notes.append(f"{m} decoder: {e}; {how}")
        section = sections.get(m)
        if section is not None and shapes[m] is not None and tuple(section.shape) != shapes[m]:
            report.errors.append(f"{embed_dir / 'manifest.json'}: {m} embeddings have shape {tuple(section.shape)} "
                                 f"(from {section.encoder}) but the configured decoder needs {shapes[m]}; rerun "
                                 "process_embeddings.py with this config")
    return shapes
