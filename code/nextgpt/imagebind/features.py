"""The stage-1 feature cache: `<out_dir>/<media file name>.npy` (out_dim,) float32 per medium + manifest.json.

Stage 1 reads these instead of running ImageBind. Items already present and valid are skipped and the encoder is
not even loaded when nothing is left to do; each batch is written (atomically, through EmbedCache's background
writer, while the next batch is encoded) as soon as it is encoded, so a killed run loses at most one batch, and
a rerun removes the temporary files the kill left (EmbedCache.todo) and finishes the job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from nextgpt.embed_cache import EmbedCache, read_manifest
from nextgpt.modalities import get as get_modality

from .model import resolve_config
from .preprocess import MediaError

KIND = "imagebind_features"


def encoder_id(checkpoint: str | Path, preset: str) -> str:
    return f"{checkpoint}#{preset}"


def _check_same_encoder(out_dir: Path, checkpoint: str | Path, preset: str) -> None:
    # EmbedCache refuses another kind or shape; features of another checkpoint / preset with the same width
    # would mix silently, so refuse those too (compared by file name: the same file may be named by another path).
    old = read_manifest(out_dir)
    if old is None or old.kind != KIND:
        return
    old_checkpoint, _, old_preset = old.encoder.rpartition("#")
    if (Path(old_checkpoint).name, old_preset) != (Path(checkpoint).name, preset):
        raise ValueError(f"{out_dir}: holds features of {old.encoder}; refusing to add features of "
                         f"{encoder_id(checkpoint, preset)} (use another folder)")


def write_feature_cache(media: Sequence[tuple[str, str | Path]], modality: str, out_dir: str | Path,
                        checkpoint: str | Path, preset: str, batch_size: int = 8, device=None) -> dict:
    """Encode the media not yet cached. `media`: (media file name, path) pairs; returns dict(written=, skipped=).

    A missing or unusable medium raises MediaError naming it (missing files are found before the model loads).
    """
    from tqdm import tqdm

    from .encode import Encoder

    get_modality(modality)
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {}
    for name, path in media:
        if name in paths and Path(path) != paths[name]:
            raise ValueError(f"{name}: two different files share this media name ({paths[name]}, {path}); "
                             f"the cache is keyed by file name")
        paths[name] = Path(path)
    _check_same_encoder(out_dir, checkpoint, preset)
    out_dim = int(resolve_config(preset)["out_embed_dim"])
    cache = EmbedCache(out_dir, KIND, encoder_id(checkpoint, preset), shape=(out_dim,), dtype="float32")
    todo = cache.todo(list(paths))
    skipped = len(paths) - len(todo)
    if not todo:
        manifest = read_manifest(out_dir)
        if manifest is None or manifest.count != sum(1 for p in out_dir.glob("*.npy") if not p.name.startswith(".")):
            cache.close()
        return dict(written=0, skipped=skipped)

    absent = [paths[name] for name in todo if not paths[name].is_file()]
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise MediaError(f"{absent[0]}: missing{more}")

    encoder = Encoder(checkpoint, preset, device=device)
    written = 0
    with tqdm(total=len(todo), desc=f"ImageBind {modality} features", unit=modality) as bar:
        batches = encoder.iter_encode([paths[name] for name in todo], modality, batch_size=batch_size)
        try:
            for start, vectors in zip(range(0, len(todo), batch_size), batches):
                names = todo[start:start + batch_size]
                cache.put_batch(names, vectors.numpy())       # written on the cache's thread meanwhile
                written += len(names)
                bar.update(len(vectors))
        finally:
            cache.flush()             # also on Ctrl-C: the batches already encoded reach the disk
    cache.close()
    return dict(written=written, skipped=skipped)
