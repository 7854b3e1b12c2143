"""Precompute what training regresses onto (caption embeddings) or reads instead of media (ImageBind features).

The seed's call, from code/ or from the repository root (a 4th positional decoder folder is accepted as well):
    python process_embeddings.py ../data/T_X_pair_data/cc3m/cc3m.json image ../data/embed/ [--decoder DIR]
        [--batch-size 128] [--fp16]
Every dataset of a config (what `make embeddings` / `make features` run):
    python code/process_embeddings.py --config code/config/stage_3.yaml --all        # -> cfg.data.embed_dir
    python code/process_embeddings.py --config code/config/stage_1.yaml --all --features   # -> cfg.data.feature_dir

Caption embeddings are computed with the configured decoder's own text encoder (only it and its tokenizer are
loaded): image/video (77, D) CLIP last hidden state, audio (D,) CLAP text_embeds L2-normalised; see
nextgpt/data/embeddings.py. The caption embedded is the NORMALISED caption (readers.normalize_caption), the same
string the model is trained to write. Any JSON format of the data readers works (pair, generation, t2x,
instruction_tuning, MosIT). Items are `<out_dir>/<media file name>.npy`; finished items (complete .npy of the
right shape, checked by exact name) are skipped, so a rerun does nothing and a killed run resumes (removing the
temporary files it left); each file is written atomically, a batch at a time on a background thread. `--all`
covers every catalog dataset whose file exists under cfg.data.root (the config's own data.datasets must exist), so
one call prepares stage 2 and stage 3.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python code/process_embeddings.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parent))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("positional", nargs="*", metavar="ARG",
                   help="<json> <image|video|audio> <out_dir> [<decoder dir>] (the seed's call)")
    p.add_argument("--decoder", help="diffusers pipeline folder (default: the config's model.decoders[modality])")
    p.add_argument("--batch-size", type=int, default=None, help="captions (default 128) or media (default 8) per batch")
    p.add_argument("--fp16", action="store_true", help="store float16 (the original's files); default float32")
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
                conflicts.append(f"{sample.where} ({name}: {target.caption!r} vs {items[key][0]!r})")
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


# ----------------------------------------------------------------------------------------------------------------
# Caption embeddings

def write_caption_embeddings(items: dict[str, str], modality: str, out_dir: str | Path, decoder_dir: str | Path,
                             batch_size: int = 128, fp16: bool = False, device: str | None = None,
                             overwrite: bool = False, log=print) -> dict[str, int]:
    """Embed {media name: caption} into <out_dir>/<name>.npy and update the manifest section of `modality`.
    -> {"written": n, "skipped": n}."""
    from tqdm import tqdm

    from nextgpt.data import embeddings as emb
    from nextgpt.embed_cache import ItemWriter, item_path, remove_stale_temps

    out_dir, decoder_dir = Path(out_dir), Path(decoder_dir)
    shape = emb.stored_shape(modality, decoder_dir)          # JSON configs only: no model load for a no-op rerun
    dtype = "float16" if fp16 else "float32"
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = emb.read_manifest(out_dir)
    old = sections.get(modality)
    encoder_id = str(decoder_dir.resolve())
    if old is not None and old.encoder != encoder_id and list(old.shape) == list(shape) and not overwrite:
        log(f"note: {out_dir}: existing {modality} embeddings came from {old.encoder}; items of the right shape are "
            "kept (--overwrite recomputes them)")
    todo = [n for n in items if overwrite or emb.check_npy(item_path(out_dir, n), shape) is not None]
    remove_stale_temps(out_dir, items)                       # what a killed run left for these items
    if todo:
        encoder = emb.CaptionEncoder(modality, decoder_dir, device=device)
        # Each batch is written (temp files, one fsync pass, renames, one folder fsync) on the writer's thread
        # while the next batch is encoded; an error there stops the run at the next batch, naming the file.
        with tqdm(total=len(todo), desc=f"{modality} caption embeddings", unit="caption") as bar, \
                ItemWriter(out_dir, dtype) as writer:
            for start in range(0, len(todo), batch_size):
                names = todo[start:start + batch_size]
                writer.put(names, encoder.encode([items[n] for n in names]))      # (B, *shape) float32
                bar.update(len(names))
    sections = emb.read_manifest(out_dir)                    # re-read: another modality may have been written
    sections[modality] = emb.Section(encoder=encoder_id, shape=list(shape), dtype=dtype,
                                     count=emb.count_items(out_dir, modality))
    emb.write_manifest(out_dir, sections)
    log(f"{modality}: {len(todo)} written, {len(items) - len(todo)} already done -> {out_dir} "
        f"(shape {shape}, {dtype}, decoder {decoder_dir})")
    return {"written": len(todo), "skipped": len(items) - len(todo)}


def _run_captions(samples, modalities, cfg, args, out_dir_override: str | None, log) -> None:
    from nextgpt.modalities import MODALITIES

    for modality in modalities:
        items: dict = {}
        conflicts: list[str] = []
        _caption_items(samples, modality, items, conflicts)
        if conflicts:
            log(f"warning: {len(conflicts)} {modality} item(s) named again with another caption; the first caption "
                f"is embedded (first: {conflicts[0]})")
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
                                     fp16=args.fp16, device=args.device, overwrite=args.overwrite, log=log)


def _run_features(samples, modalities, cfg, args, out_dir: Path, log) -> None:
    from nextgpt.imagebind.features import write_feature_cache

    checkpoint = Path(args.imagebind) if args.imagebind else cfg.path(cfg.model.imagebind)
    preset = args.preset or cfg.model.imagebind_preset
    for modality in modalities:
        items: dict = {}
        _media_items(samples, modality, items)
        if not items:
            continue
        missing = [(n, p, w) for n, (p, w) in items.items() if not Path(p).is_file()]
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
                                     batch_size=args.batch_size or 8, device=args.device)
        log(f"{modality} features: {result.get('written', 0)} written, {result.get('skipped', 0)} already done "
            f"-> {out_dir}")


def run(args, log=print) -> None:
    from nextgpt.modalities import MODALITIES

    cfg = _load_config(args)
    if args.all:
        if args.positional or args.decoder:
            raise ValueError("--all takes no positional arguments and no --decoder (decoders come from the config)")
        samples = _catalog_samples(cfg, args.datasets, log)
        modalities = list(cfg.model.modalities)
        if args.features:
            _run_features(samples, modalities, cfg, args, cfg.path(cfg.data.feature_dir), log)
        else:
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
    if args.features:
        samples = _file_samples(json_path, "enc", None)
        _run_features(samples, [modality], cfg, args, Path(out_dir), log)
    else:
        samples = _file_samples(json_path, "dec", out_dir)
        _run_captions(samples, [modality], cfg, args, out_dir, log)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from nextgpt.config import ConfigError

    try:
        run(args)
    except (ValueError, FileNotFoundError, OSError, ConfigError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
