"""The sharded caption-embedding precompute behind code/process_embeddings.py (its ImageBind-feature twin is
nextgpt/imagebind/features.py): each rank embeds its share of the batches with the decoder's own text encoder,
skips what is already stored from the same caption, writes through nextgpt.store.StoreWriter, and the share that
completes the set merges the one manifest."""

from __future__ import annotations

from pathlib import Path

from nextgpt import store


def write_caption_embeddings(items: dict[str, str], modality: str, out_dir: str | Path, decoder_dir: str | Path,
                             batch_size: int = 128, fp16: bool | None = None, device: str | None = None,
                             overwrite: bool = False, log=print, layout: str = "files",
                             share: tuple[int, int] = (0, 1), skip_bad: bool = False) -> dict[str, int]:
    """Embed {media name: caption} into the store at out_dir (this rank's share of the batches) and, when the
    set of shares is complete, merge the manifest section of `modality`. fp16: None = the layout's default
    (files float32, shards float16). -> {"written": n, "skipped": n, "bad": n} for this share."""
    from tqdm import tqdm

    from nextgpt.data import embeddings as emb
    from nextgpt.store.files import remove_stale_temps

    out_dir, decoder_dir = Path(out_dir), Path(decoder_dir)
    rank, world = share
    shape = emb.stored_shape(modality, decoder_dir)          # JSON configs only: no model load for a no-op rerun
    fp16 = (layout == "shards") if fp16 is None else fp16
    section = store.Section(encoder=str(decoder_dir.resolve()), shape=list(shape),
                            dtype="float16" if fp16 else "float32", fingerprint=emb.decoder_fingerprint(decoder_dir),
                            hashed=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_section(out_dir, store.KINDS[0], modality, section, layout, overwrite)
    hashes = {n: store.caption_hash(c) for n, c in items.items()}
    mine = store.share_batches(list(items), batch_size, rank, world)
    names = [n for batch in mine for n in batch]
    done = set() if overwrite else store.done_names(out_dir, modality, layout, names, shape, hashes,
                                                                section.dtype)
    todo = [[n for n in batch if n not in done] for batch in mine]
    todo = [batch for batch in todo if batch]
    tag = f"{rank}of{world}"
    if layout == "files":
        remove_stale_temps(out_dir, names)                   # what a killed run left for these items
    else:
        store.remove_orphans(out_dir, modality, tag)
    written, bad = 0, []
    if todo:
        encoder = emb.CaptionEncoder(modality, decoder_dir, device=device)
        writer = store.StoreWriter(out_dir, store.KINDS[0], modality, section, layout, tag=tag, skip_bad=skip_bad)
        # Files: each batch is written (temp files, one fsync pass, renames, one folder fsync, then its caption
        # hashes) on the writer's thread while the next batch is encoded; shards: a shard per SHARD_BYTES.
        try:
            with tqdm(total=sum(map(len, todo)), desc=f"{modality} caption embeddings", unit="caption",
                      disable=rank != 0) as bar:
                for batch in todo:
                    vectors = encoder.encode([items[n] for n in batch])     # (B, *shape) float32
                    bad += writer.put(batch, vectors, [hashes[n] for n in batch])
                    bar.update(len(batch))
        except BaseException:
            writer.abort()           # keep what was computed (also on Ctrl-C); the rerun skips it
            raise
        writer.close()
        written = writer.written
    if bad:
        log(f"warning: {modality}: skipped {len(bad)} non-finite caption embedding(s) (first: {bad[0][1]})")
    merged = store.finish_share(out_dir, store.KINDS[0], modality, section, layout, rank, world)
    skipped = len(names) - sum(map(len, todo))
    who = f" (share {rank}/{world})" if world > 1 else ""
    log(f"{modality}: {written} written, {skipped} already done{who} -> {out_dir} (shape {shape}, {section.dtype}, "
        f"{layout}, decoder {decoder_dir})" + ("" if merged or world == 1 else "; other shares still to finish"))
    return {"written": written, "skipped": skipped, "bad": len(bad)}


def check_section(folder: Path, kind: str, modality: str, section, layout: str, overwrite: bool) -> None:
    """Refuse to mix items of another encoder, dtype or layout into a store folder (one line naming it)."""
    manifest = store.read_manifest(folder)
    if manifest is None:
        return
    where = folder / store.MANIFEST
    if manifest.kind != kind:
        raise ValueError(f"{where}: holds {manifest.kind}; refusing to add {kind} (use another folder)")
    if manifest.store != layout and manifest.modalities:
        raise ValueError(f"{where}: is a {manifest.store} store, not {layout}; convert it (python -m nextgpt.store "
                         f"convert {folder} --to {layout}) or pass --store {manifest.store}")
    old = manifest.modalities.get(modality)
    if old is None or overwrite:
        return
    if old.fingerprint and section.fingerprint and old.fingerprint != section.fingerprint:
        raise ValueError(f"{where}: {modality} items came from {old.encoder} ({old.fingerprint}), not "
                         f"{section.encoder} ({section.fingerprint}); --overwrite recomputes them")
    if old.dtype != section.dtype and old.count:
        raise ValueError(f"{where}: {modality} items are {old.dtype}, this run writes {section.dtype}; --overwrite "
                         "rewrites them (or pass the same --fp16 / --fp32)")
