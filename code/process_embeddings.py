"""Precompute what training regresses onto (caption embeddings) or reads instead of media (ImageBind features).

The seed's call, from code/ or from the repository root (a 4th positional decoder folder is accepted as well):
    python process_embeddings.py ../data/T_X_pair_data/cc3m/cc3m.json image ../data/embed/ [--decoder DIR]
        [--batch-size 128] [--fp16]
Every dataset of a config (what `make embeddings` / `make features` run):
    python code/process_embeddings.py --config code/config/stage_3.yaml --all        # -> cfg.data.embed_dir
    python code/process_embeddings.py --config code/config/stage_1.yaml --all --features   # -> cfg.data.feature_dir
Many processes, GPUs or nodes (each rank takes a disjoint, deterministic share of the batches and writes its own
outputs; the rank that completes the set merges the one manifest; a killed rank's share is resumed by the next run):
    deepspeed --num_gpus 8 code/process_embeddings.py --config ... --all [--features]   # or torchrun, or a hostfile
    python code/process_embeddings.py --config ... --all --shard 3/16                    # a scheduler's array job
Media in webdataset tar shards (scripts/prepare_data.py --tars: the media folder holds a shard index, no files)
are read in place: ranks take whole shards (shard k to rank k % N), each read front to back by offset in the
DataLoader workers, batches cut within a shard; a killed run skips the shards already done and the items done in
the one it was in (nextgpt/store/tars.py).
Store layout: --store files (the seed's <name>.npy, default: data.store) | shards (a few memory-mapped files + an
index, float16 unless --fp32; see nextgpt/store/, which also converts a folder between the two).

Caption embeddings are computed with the configured decoder's own text encoder (only it and its tokenizer are
loaded): image/video (77, D) CLIP last hidden state, audio (D,) CLAP text_embeds L2-normalised; see
nextgpt/data/embeddings.py. The caption embedded is the NORMALISED caption (records.normalize_caption), the same
string the model is trained to write. Any JSON format of the data readers works (pair, generation, t2x,
instruction_tuning, MosIT). Items are `<out_dir>/<media file name>.npy`; finished items (complete .npy of the
right shape, made from the same caption text: its hash is recorded with every item) are skipped, so a rerun does
nothing, an edited caption is recomputed and a killed run resumes (removing the temporary files it left); each file
is written atomically, a batch at a time on a background thread. Every vector is finite before it is written (else
one line naming the item, or a counted skip under data.skip_bad_records); media are decoded in DataLoader workers.
`--all` covers every catalog dataset whose file exists under cfg.data.root (the config's own data.datasets must
exist), so one call prepares stage 2 and stage 3. The precompute itself: nextgpt/data/precompute.py (captions),
nextgpt/imagebind/features.py (features).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nextgpt import cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("positional", nargs="*", metavar="ARG",
                   help="<json> <image|video|audio> <out_dir> [<decoder dir>] (the seed's call)")
    p.add_argument("--decoder", help="diffusers pipeline folder (default: the config's model.decoders[modality])")
    p.add_argument("--batch-size", type=int, default=None, help="captions (default 128) or media (default 8) per batch")
    p.add_argument("--fp16", action="store_true", help="store float16 (the original's files); default float32 for "
                   "the files layout, float16 for shards")
    p.add_argument("--fp32", action="store_true", help="store float32 in shards too")
    p.add_argument("--store", choices=("files", "shards"), help="store layout (default: the config's data.store)")
    p.add_argument("--shard", metavar="K/N", help="compute share K of N (0-based) without a launcher; default: the "
                   "launcher's RANK / WORLD_SIZE, else all")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding media (--features)")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)   # the deepspeed launcher passes it
    p.add_argument("--config", help="config YAML (default: code/config/base.yaml, for decoder / ImageBind paths)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable)")
    p.add_argument("--all", action="store_true", help="every dataset of the config's catalog under data.root")
    p.add_argument("--datasets", nargs="+", metavar="NAME", help="with --all: only these catalog datasets")
    p.add_argument("--features", action="store_true", help="ImageBind features of the media instead")
    p.add_argument("--imagebind", help="ImageBind checkpoint (default: the config's model.imagebind)")
    p.add_argument("--preset", help="ImageBind preset (default: the config's model.imagebind_preset)")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="recompute items that already exist")
    return p


def _load_config(args):
    from nextgpt.config import REPO_ROOT, load

    return load(args.config or REPO_ROOT / "code" / "config" / "base.yaml", args.overrides)


# ----------------------------------------------------------------------------------------------------------------
# Collect the work: caption items {name: (caption, where)} or media items {name: (path, where)} per output folder

def _caption_items(samples, modality: str, items: dict, conflicts: list) -> None:
    for sample in samples:
        for target in sample.targets:
            if target.modality != modality:
                continue
            path = Path(target.embed_path)
            name = path.name[: -len(".npy")]
            if not target.caption.strip():
                raise ValueError(f"{sample.where}: no caption to embed for {name} (empty {modality} caption)")
            key = (path.parent, name)
            if key in items and items[key][0] != target.caption:
                conflicts.append(f"{name} is named by {items[key][1]} with caption {items[key][0]!r} and by "
                                 f"{sample.where} with caption {target.caption!r}")
                continue
            items.setdefault(key, (target.caption, sample.where))


def _media_items(samples, modality: str, items: dict) -> None:
    for sample in samples:
        for medium in sample.media:
            if medium.modality != modality:
                continue
            old = items.get(medium.name)
            if old is not None and old[0] != medium.path:
                raise ValueError(f"{sample.where}: media name {medium.name} also names {old[0]} ({old[1]}); the "
                                 "feature cache is keyed by file name")
            items.setdefault(medium.name, (medium.path, sample.where))


def _file_samples(path: str, role: str, embed_dir: str | None):
    from nextgpt.data.readers import read_file

    return read_file(path, dataset=Path(path).stem, role=role, embed_dir=embed_dir or ".").samples


def _catalog_samples(cfg, names: list[str] | None, log) -> list:
    """Samples of the catalog datasets to process (readers' errors propagate unless data.skip_bad_records)."""
    from nextgpt.data.catalog import names as catalog_names, resolve
    from nextgpt.data.readers import read_entry

    wanted = names or catalog_names(cfg)
    samples = []
    for name in wanted:
        entry = resolve(cfg, name, require_file=False)
        if not entry.file.is_file():
            if names or name in cfg.data.datasets:
                resolve(cfg, name)      # raises, listing every path tried
            log(f"skip {name}: no file under {cfg.path(cfg.data.root)}")
            continue
        result = read_entry(entry, prompt=cfg.train.prompt, skip_bad=cfg.data.skip_bad_records)
        if result.errors:
            log(f"warning: {name}: skipped {len(result.errors)} bad records (first: {result.errors[0]})")
        samples += result.samples
    return samples


def _run_captions(samples, modalities, cfg, args, out_dir_override: str | None, log) -> None:
    from nextgpt.data.precompute import write_caption_embeddings
    from nextgpt.modalities import MODALITIES

    for modality in modalities:
        items: dict = {}
        conflicts: list[str] = []
        _caption_items(samples, modality, items, conflicts)
        if conflicts:
            # One embedding per media name: training could not tell which caption a target was made from.
            more = f" ({len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
            raise ValueError(f"{conflicts[0]}{more}; one caption embedding per media name (give the records "
                             "different file names or the same caption)")
        if not items:
            if out_dir_override is not None:
                raise ValueError(f"no {modality} caption targets in {args.positional[0]} (a generation / instruction "
                                 f"/ pair file with {MODALITIES[modality].pair_key} or <{modality}> outputs)")
            continue
        decoder = args.decoder or cfg.model.decoders.get(modality)
        if not decoder:
            raise ValueError(f"no decoder for {modality}: pass --decoder or set model.decoders.{modality}")
        decoder_dir = Path(decoder) if args.decoder else cfg.path(decoder)
        by_dir: dict[Path, dict[str, str]] = {}
        for (folder, name), (caption, _) in items.items():
            by_dir.setdefault(folder, {})[name] = caption
        for folder, group in by_dir.items():
            write_caption_embeddings(group, modality, folder, decoder_dir, batch_size=args.batch_size or 128,
                                     fp16=_fp16(args), device=args.device, overwrite=args.overwrite, log=log,
                                     layout=_layout(cfg, args), share=args.share,
                                     skip_bad=cfg.data.skip_bad_records)


def _layout(cfg, args) -> str:
    return args.store or getattr(cfg.data, "store", "files")


def _fp16(args) -> bool | None:
    if args.fp16 and args.fp32:
        raise ValueError("--fp16 and --fp32 both given")
    return True if args.fp16 else False if args.fp32 else None


def _device(args) -> str | None:
    """--device, else under a launcher on a GPU machine the rank's own GPU (LOCAL_RANK): nextgpt.runtime's rule."""
    import os

    if args.device or args.share[1] == 1:
        return args.device
    from nextgpt.runtime import pick_device

    device = pick_device(local_rank=int(os.environ.get("LOCAL_RANK", args.local_rank or 0)))[0]
    return str(device) if device.type == "cuda" else None


def _run_features(samples, modalities, cfg, args, out_dir: Path, log) -> None:
    from nextgpt.imagebind.features import write_feature_cache
    from nextgpt.store.tars import locate_many

    checkpoint = Path(args.imagebind) if args.imagebind else cfg.path(cfg.model.imagebind)
    preset = args.preset or cfg.model.imagebind_preset
    for modality in modalities:
        items: dict = {}
        _media_items(samples, modality, items)
        if not items:
            continue
        # a medium is a file, or a member of its folder's webdataset shards (nextgpt/store/tars.py)
        missing = [(n, p, w) for (n, (p, w)), member in zip(items.items(), locate_many([p for p, _ in items.values()]))
                   if member is None and not Path(p).is_file()]
        if missing:
            name, path, where = missing[0]
            if not cfg.data.skip_bad_records:
                raise FileNotFoundError(f"{path}: media file missing ({where}); {len(missing)} {modality} file(s) "
                                        "missing in all (set data.skip_bad_records=true to skip them)")
            log(f"warning: skipping {len(missing)} missing {modality} file(s) (first: {path}, {where})")
            for n, _, _ in missing:
                items.pop(n)
        media = [(name, path) for name, (path, _) in items.items()]
        result = write_feature_cache(media, modality, out_dir, checkpoint, preset,
                                     batch_size=args.batch_size or 8, device=_device(args),
                                     layout=_layout(cfg, args), share=args.share, skip_bad=cfg.data.skip_bad_records,
                                     workers=args.workers, fp16=_fp16(args),
                                     where={n: w for n, (_, w) in items.items()}, log=log)
        who = f" (share {args.share[0]}/{args.share[1]})" if args.share[1] > 1 else ""
        log(f"{modality} features: {result.get('written', 0)} written, {result.get('skipped', 0)} already done{who} "
            f"-> {out_dir}")


def _prove_shared(cfg, args, key: str, folder: Path) -> None:
    """Under a launcher the ranks split the items and the one that completes the set merges the manifest, so they
    must all write one folder (nextgpt.training.peers.prove_shared), checked in a gloo group made for this check alone:
    the precompute itself needs no collective (a rank killed mid-way leaves the others running to the end)."""
    import os
    from datetime import timedelta

    if args.shard or args.share[1] == 1 or "MASTER_ADDR" not in os.environ:
        return  # one process, or a scheduler's array job (--shard K/N): no rank 0 to compare with
    import torch.distributed as dist

    from nextgpt.training.peers import prove_shared

    dist.init_process_group("gloo", timeout=timedelta(seconds=cfg.train.dist_timeout))
    try:
        prove_shared({key: folder}, args.share[0])
    finally:
        dist.destroy_process_group()


def run(args, log=print) -> None:
    from nextgpt.modalities import MODALITIES
    from nextgpt.store import parse_share

    cfg = _load_config(args)
    args.share = parse_share(args.shard)
    if args.device is None:
        args.device = _device(args)
    if args.all:
        if args.positional or args.decoder:
            raise ValueError("--all takes no positional arguments and no --decoder (decoders come from the config)")
        samples = _catalog_samples(cfg, args.datasets, log)
        modalities = list(cfg.model.modalities)
        if args.features:
            _prove_shared(cfg, args, "data.feature_dir", cfg.path(cfg.data.feature_dir))
            _run_features(samples, modalities, cfg, args, cfg.path(cfg.data.feature_dir), log)
        else:
            _prove_shared(cfg, args, "data.embed_dir", cfg.path(cfg.data.embed_dir))
            _run_captions(samples, modalities, cfg, args, None, log)
        return
    if args.datasets:
        raise ValueError("--datasets needs --all")
    if len(args.positional) not in (3, 4):
        raise ValueError("expected <json> <image|video|audio> <out_dir> [<decoder dir>], or --config CFG --all")
    json_path, modality, out_dir = args.positional[:3]
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r}; known: {', '.join(MODALITIES)}")
    if len(args.positional) == 4:
        if args.decoder and args.decoder != args.positional[3]:
            raise ValueError("decoder given twice (4th argument and --decoder)")
        args.decoder = args.positional[3]
    _prove_shared(cfg, args, "the output folder", Path(out_dir))
    if args.features:
        samples = _file_samples(json_path, "enc", None)
        _run_features(samples, [modality], cfg, args, Path(out_dir), log)
    else:
        samples = _file_samples(json_path, "dec", out_dir)
        _run_captions(samples, [modality], cfg, args, out_dir, log)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from nextgpt.training.stop import interrupt_on_signals

    def body() -> None:
        # Ctrl-C / SIGTERM: what is written stays (a rerun skips it), no temporary file is left (exit 130 / 143).
        with interrupt_on_signals("the items written so far are kept; rerun the same command to finish"):
            run(args)

    return cli.run(body, "process_embeddings")  # one `error:` line, exit 2 (nextgpt.cli)


if __name__ == "__main__":
    raise SystemExit(main())
