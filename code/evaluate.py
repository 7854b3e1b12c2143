"""Evaluate NExT-GPT checkpoints on the held-out split: did further training improve the model?

    python code/evaluate.py --config code/config/eval.yaml --ckpt base ckpt/delta_ckpt/nextgpt/7b_tiva_v0/stage_3
    python code/evaluate.py --config code/config/stage_3.yaml --set data.eval_fraction=0.01 --ckpt runs/mine
    python code/evaluate.py --config code/config/tiny/eval.yaml --ckpt base ckpt/tiny/delta/stage_1 \\
        ckpt/tiny/delta/stage_2 ckpt/tiny/delta/stage_3 --out runs/eval/tiny --limit 8     # = make eval CONFIG=tiny

--ckpt takes any number of: a delta folder, a run folder (its `latest`), an original pytorch_model.pt, or
`base` / `none` (the base model with freshly initialised projectors, seeded by train.seed). Parts a checkpoint
does not hold (a stage-1 delta has no output projectors) stay as freshly initialised; the report says what loaded.

Held-out split: data.eval_datasets, else the data.eval_fraction share of data.datasets that train.py holds out with
the same seed (`--set data.eval_fraction=0.1`). Each record becomes one request (see nextgpt/eval/run.py); per
checkpoint the tool measures held-out loss / token accuracy, BLEU-4 and CIDEr-D of media->text replies, the
signal-token emission rate per requested modality (and for text answers), l2 / cosine of the projector output to
the caption embedding, and, for up to --decode media per modality decoded by the diffusion decoders, the ImageBind
score (and the CLIP score for images with --clip DIR).

Writes to --out (default runs/eval/<config name>): metrics.json, report.md (one row per checkpoint, thumbnails),
plots/<metric>.png across checkpoints, <checkpoint>/media/*.png|mp4|wav and <checkpoint>/replies.jsonl.
Deterministic under --seed (greedy replies unless --sample; decoders seeded).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from nextgpt import cli
from nextgpt import config as config_lib

BASE_NAMES = ("base", "none")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_config_args(parser)
    parser.add_argument("--ckpt", nargs="+", required=True, metavar="CKPT",
                        help="delta folder | run folder | pytorch_model.pt | base (repeatable, in report order)")
    parser.add_argument("--out", help="output folder (default runs/eval/<config name>)")
    parser.add_argument("--seed", type=int, help="seed for replies and decoders (default: inference.seed)")
    parser.add_argument("--limit", type=int, default=0, help="held-out records per dataset (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests generated together (default 8)")
    parser.add_argument("--decode", type=int, default=4,
                        help="generated media decoded and ImageBind-scored per modality and checkpoint (default 4)")
    parser.add_argument("--sample", action="store_true", help="sample replies as inference.* says (default greedy)")
    parser.add_argument("--imagebind-tokenizer", metavar="PATH",
                        help="CLIP BPE for ImageBind's text tower: a tokenizer folder or bpe_simple_vocab_16e6.txt.gz "
                             "(default: the image decoder's tokenizer/ folder)")
    parser.add_argument("--clip", metavar="DIR", help="a transformers CLIP model folder: also report the CLIP score")
    parser.add_argument("--no-loss", action="store_true", help="skip the teacher-forced held-out loss")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available, bf16)")
    return parser.parse_args(argv)


def _slug(text: str, taken: set[str]) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "checkpoint"
    candidate, n = slug, 1
    while candidate in taken:
        n += 1
        candidate = f"{slug}_{n}"
    taken.add(candidate)
    return candidate


def describe(value: str) -> dict:
    """--ckpt value -> {"name", "path", "kind", "stage", "step"}; FileNotFoundError naming a bad path (cheap)."""
    if value.lower() in BASE_NAMES:
        return {"name": "base", "path": "", "kind": "base", "stage": None, "step": None}
    from nextgpt.checkpoint.load import checkpoint_info

    info = checkpoint_info(value)
    path = Path(info.path)
    name = "/".join(path.parts[-2:]) if info.kind == "delta" else str(Path(value))
    return {"name": name, "path": info.path, "kind": info.kind, "stage": info.stage, "step": info.step}


def load(cfg, entry: dict, device, dtype):
    """Base model (projectors seeded by train.seed) + the checkpoint; groups it lacks stay as initialised."""
    import torch

    from nextgpt.checkpoint import delta as checkpoint_lib
    from nextgpt.model.nextgpt import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, device=device, dtype=dtype)
    loaded: set[str] = set()
    if entry["kind"] != "base":
        loaded = checkpoint_lib.load_checkpoint(model, entry["path"], allow_missing=("input_proj", "output_proj",
                                                                                     "lora"))
    return model.eval(), sorted(loaded)


def check_decoders(cfg, items, decode: int) -> None:
    """Every modality that will be decoded has its decoder folder: one error before any model is loaded."""
    if not decode:
        return
    for modality in sorted({item.requested for item in items if item.kind == "generate"}):
        folder = cfg.model.decoders.get(modality)
        if not folder or not (cfg.path(folder) / "model_index.json").is_file():
            raise FileNotFoundError(f"{cfg.path(folder) if folder else '<unset>'}: the {modality} decoder is missing "
                                    f"(model.decoders.{modality}; `make check-ckpt`, or --decode 0)")


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    cfg = config_lib.from_args(args)
    for name, value in (("--limit", args.limit), ("--decode", args.decode)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    seed = cfg.inference.seed if args.seed is None else args.seed
    out_dir = Path(args.out) if args.out else cfg.path("runs/eval") / Path(cfg.source or "config").stem
    entries = [describe(value) for value in args.ckpt]          # every path checked before any model loads
    taken: set[str] = set()
    for entry in entries:
        entry["slug"] = _slug(entry["name"], taken)

    import torch

    from nextgpt.eval import run as evaluation
    from nextgpt.eval.report import table, write_report
    from nextgpt.runtime import pick_device
    from nextgpt.tokens import load_tokenizer

    tokenizer, token_ids = load_tokenizer(cfg.path(cfg.model.llm))
    datasets = evaluation.held_out_datasets(cfg, tokenizer, token_ids)
    if args.limit:
        datasets = {name: _first(d, args.limit) for name, d in datasets.items()}
    items = evaluation.build_items(cfg, datasets)
    check_decoders(cfg, items, args.decode)
    counts: dict[str, int] = {}
    for item in items:
        counts[f"{item.kind}:{item.requested}"] = counts.get(f"{item.kind}:{item.requested}", 0) + 1
    print(f"held-out: {len(items)} requests ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}) from "
          f"{', '.join(datasets)}", flush=True)
    device, dtype, reason = pick_device(args.device)
    print(f"device: {reason}", flush=True)

    decoders = scorer = clip = None
    if args.decode:
        from nextgpt.eval.embedders import ClipScorer, ImageBindScorer
        from nextgpt.model.decoders import Decoders

        decoders = Decoders(cfg, device=device, dtype=dtype, seed=seed)
        source = Path(args.imagebind_tokenizer) if args.imagebind_tokenizer else \
            cfg.path(cfg.model.decoders.get("image", "")) / "tokenizer"
        scorer = ImageBindScorer(cfg.path(cfg.model.imagebind), cfg.model.imagebind_preset, source, device=device,
                                 dtype=dtype)
        clip = ClipScorer(args.clip, device=device) if args.clip else None
    options = evaluation.Options(seed=seed, batch_size=args.batch_size, sample=args.sample, decode=args.decode)
    features = evaluation.FeatureMemo()          # the inputs' ImageBind features, encoded once for all checkpoints
    runs = []
    from tqdm import tqdm

    for entry in tqdm(entries, desc="checkpoints", dynamic_ncols=True):
        start = time.time()
        model, loaded = load(cfg, entry, device, dtype)
        features.attach(model)
        torch.manual_seed(seed)
        metrics, records = evaluation.evaluate_model(
            model, items, cfg, options, media_dir=out_dir / entry["slug"] / "media", decoders=decoders,
            scorer=scorer, clip=clip, datasets=None if args.no_loss else datasets)
        runs.append({**entry, "loaded": loaded, "metrics": metrics, "records": records,
                     "seconds": round(time.time() - start, 1)})
        tqdm.write(f"{entry['name']}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    context = {"config": cfg.source, "seed": seed, "sample": args.sample, "device": reason, "requests": counts,
               "limit": args.limit, "decode": args.decode}
    paths = write_report(out_dir, runs, context)
    print(table(runs), flush=True)
    print(f"wrote {paths['report']} and {paths['metrics']}", flush=True)
    return 0


def _first(dataset, limit: int):
    """The first `limit` records of a held-out dataset (the same ones for every checkpoint)."""
    from nextgpt.data.dataset import NextGPTDataset

    if len(dataset) <= limit:
        return dataset
    return NextGPTDataset(dataset.name, dataset.samples[:limit], dataset.tokenizer, dataset.token_ids,
                          dataset.max_length, log=dataset.log, skip_bad=dataset.skip_bad)


def main(argv: list[str] | None = None) -> int:
    return cli.run(lambda: _main(argv), "evaluate")


if __name__ == "__main__":
    from nextgpt.cli import run as run_cli  # any failure: one `error:` line, the traceback in a log it names

    raise SystemExit(run_cli(main, "evaluate"))
