"""The stage-1 feature cache: ImageBind vectors (out_dim,) per medium in a store folder (nextgpt/store/: the seed's
`<out_dir>/<media file name>.npy` files, or memory-mapped shards), with the one store manifest.

Stage 1 reads these instead of running ImageBind. Items already present and valid are skipped and the encoder is
not even loaded when nothing is left to do; media are decoded in DataLoader worker processes while the model
encodes the previous batch; each batch is written as soon as it is encoded (files: atomically, on the store's
background writer), so a killed run loses at most one batch (one shard), and a rerun removes the temporary files
the kill left and finishes the job. Under a launcher (or --shard K/N) each rank encodes its own batches
(store.share_batches; media in webdataset tar shards: whole shards per rank, each read front to back by offset,
store/tars.py) and the rank completing the set merges the manifest. A killed run over shards resumes at shard
granularity: a shard whose items are all stored is not opened again, a partly done one reads only what is left.

The manifest records the checkpoint's fingerprint (name, size, sha256 of its ends) and preset: a folder refuses
features of another checkpoint here, and training refuses them (data/collate.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from nextgpt import store
from nextgpt.modalities import get as get_modality
from nextgpt.store import tars

from .model import resolve_config
from .preprocess import MediaError

KIND = "imagebind_features"


def encoder_id(checkpoint: str | Path, preset: str) -> str:
    return f"{checkpoint}#{preset}"


def encoder_fingerprint(checkpoint: str | Path, preset: str) -> str:
    return f"{store.file_fingerprint(checkpoint)}#{preset}"


def check_same_encoder(folder: str | Path, checkpoint: str | Path, preset: str) -> None:
    """Refuse a feature folder made by another ImageBind checkpoint or preset (one line naming both). Older
    manifests without a fingerprint are compared by file name and preset."""
    folder = Path(folder)
    manifest = store.read_manifest(folder)
    if manifest is None or manifest.kind != KIND:
        return
    mine = encoder_fingerprint(checkpoint, preset)
    for modality, section in manifest.modalities.items():
        if section.fingerprint:
            same = section.fingerprint == mine
        else:
            old_checkpoint, _, old_preset = section.encoder.rpartition("#")
            same = (Path(old_checkpoint).name, old_preset) == (Path(checkpoint).name, preset)
        if not same:
            found = section.fingerprint or "no fingerprint"
            raise ValueError(f"{folder}: holds {modality} features of {section.encoder} ({found}); refusing features "
                             f"of {encoder_id(checkpoint, preset)} ({mine}) (use another folder or recompute)")


class _Media(torch.utils.data.Dataset):
    """(name, preprocessed tensor or None, error or None) per medium; runs in DataLoader workers. A medium in a
    webdataset shard (`members`) is read by its offset, in the worker."""

    def __init__(self, names: list[str], paths: dict[str, Path], modality: str, members: dict[str, tars.Member]):
        from .encode import LOADERS

        self.names, self.paths, self.members, self.load = names, paths, members, LOADERS[modality]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        name = self.names[i]
        try:
            member = self.members.get(name)
            return name, self.load(tars.read_member(member) if member else self.paths[name]), None
        except MediaError as e:
            return name, None, str(e)


def _collate(batch):
    names = [n for n, t, _ in batch if t is not None]
    tensors = [t for _, t, _ in batch if t is not None]
    bad = [(n, e) for n, t, e in batch if t is None]
    return names, (torch.stack(tensors) if tensors else None), bad


def write_feature_cache(media: Sequence[tuple[str, str | Path]], modality: str, out_dir: str | Path,
                        checkpoint: str | Path, preset: str, batch_size: int = 8, device=None, layout: str = "files",
                        share: tuple[int, int] = (0, 1), skip_bad: bool = False, workers: int = 2,
                        fp16: bool | None = None, where: dict[str, str] | None = None, log=print) -> dict:
    """Encode this rank's share of the media not yet cached. `media`: (media file name, path) pairs, in a
    deterministic order; returns dict(written=, skipped=) (+ bad= when skip_bad skipped undecodable media).

    A missing or undecodable medium raises MediaError naming it (missing files are found before the model
    loads), or with skip_bad is counted, reported once and left out.
    """
    from tqdm import tqdm

    from .encode import Encoder

    get_modality(modality)
    out_dir = Path(out_dir)
    rank, world = share
    paths: dict[str, Path] = {}
    for name, path in media:
        if name in paths and Path(path) != paths[name]:
            raise ValueError(f"{name}: two different files share this media name ({paths[name]}, {path}); "
                             f"the cache is keyed by file name")
        paths[name] = Path(path)
    check_same_encoder(out_dir, checkpoint, preset)
    manifest = store.read_manifest(out_dir)
    if manifest is not None and manifest.kind != KIND:
        raise ValueError(f"{out_dir}: holds {manifest.kind}; refusing to mix in {KIND} (use another folder)")
    if manifest is not None and manifest.store != layout and manifest.modalities:
        raise ValueError(f"{out_dir / store.MANIFEST}: is a {manifest.store} store, not {layout}; convert it "
                         f"(python -m nextgpt.store convert {out_dir} --to {layout})")
    out_dim = int(resolve_config(preset)["out_embed_dim"])
    fp16 = (layout == "shards") if fp16 is None else fp16
    section = store.Section(encoder=encoder_id(checkpoint, preset), shape=[out_dim],
                            dtype="float16" if fp16 else "float32",
                            fingerprint=encoder_fingerprint(checkpoint, preset))
    old = manifest.modalities.get(modality) if manifest else None
    if old is not None and (list(old.shape) != [out_dim] or (old.dtype != section.dtype and old.count)):
        raise ValueError(f"{out_dir / store.MANIFEST}: {modality} features are {old.dtype} {tuple(old.shape)}, this "
                         f"run writes {section.dtype} ({out_dim},) (use another folder)")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Media in webdataset shards: whole shards per rank, each read front to back (store/tars.py)
    mine, members = tars.plan_batches(paths, batch_size, rank, world)
    names = [n for batch in mine for n in batch]
    done = store.done_names(out_dir, modality, layout, names, (out_dim,), dtype=section.dtype)
    todo = [[n for n in batch if n not in done] for batch in mine]
    todo = [batch for batch in todo if batch]
    tag = f"{rank}of{world}"
    if layout == "files":
        from nextgpt.store.files import remove_stale_temps

        remove_stale_temps(out_dir, names)
    else:
        store.remove_orphans(out_dir, modality, tag)
    skipped = len(names) - sum(map(len, todo))
    written, bad = 0, []
    if todo:
        absent = [paths[name] for batch in todo for name in batch
                  if name not in members and not paths[name].is_file()]
        if absent and not skip_bad:
            more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
            raise MediaError(f"{tars.missing_reason(absent[0])}{more}")
        encoder = Encoder(checkpoint, preset, device=device)
        writer = store.StoreWriter(out_dir, KIND, modality, section, layout, tag=tag, skip_bad=skip_bad)
        flat = [n for batch in todo for n in batch]
        offsets = [0]
        for batch in todo:
            offsets.append(offsets[-1] + len(batch))
        sampler = [list(range(offsets[i], offsets[i + 1])) for i in range(len(todo))]   # our batches, as indices
        loader = torch.utils.data.DataLoader(_Media(flat, paths, modality, members), batch_sampler=sampler,
                                             collate_fn=_collate, num_workers=max(0, workers))
        try:
            with tqdm(total=len(flat), desc=f"ImageBind {modality} features", unit=modality,
                      disable=rank != 0) as bar:
                for batch_names, tensors, failed in loader:
                    for name, reason in failed:
                        if not skip_bad:
                            at = f" ({where[name]})" if where and name in where else ""
                            raise MediaError(f"{reason}{at}")
                        bad.append((name, reason))
                    if tensors is not None:
                        vectors = encoder.encode_tensors(modality, tensors)       # (B, out_dim) float32
                        bad += writer.put(batch_names, vectors.numpy())
                    bar.update(len(batch_names) + len(failed))
        except BaseException:
            writer.abort()        # also on Ctrl-C: the batches already encoded reach the disk
            raise
        writer.close()
        written = writer.written
    if bad:
        log(f"warning: {modality}: skipped {len(bad)} unusable medi{'um' if len(bad) == 1 else 'a'} "
            f"(first: {bad[0][1]})")
    store.finish_share(out_dir, KIND, modality, section, layout, rank, world)
    result = dict(written=written, skipped=skipped)
    if bad:
        result["bad"] = len(bad)
    return result
