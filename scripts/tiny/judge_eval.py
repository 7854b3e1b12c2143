"""Judged evaluation on the toy world: do the generated media show what was asked? (`make eval CONFIG=tiny`)

    (a) ceiling      each decoder fed the true caption embedding (its own text encoder's) -> media -> the judge
    (b) end to end   per checkpoint: "Can you show me a picture of <caption>" -> reply -> signal tokens ->
                     output_proj -> decoder -> media -> the judge; plus signal-token emission where asked and none on
                     text-only questions
    captioning       per checkpoint: a freshly rendered toy medium + "What is the image about?" -> the attributes
                     the reply names
    ImageBind        matched vs mismatched: score(medium, its caption) > score(medium, another caption's)

Per modality and attribute, the share of requests judged right, apart for the colour x shape combinations held out
of decoder and stage training (toyworld.HELD_OUT). Greedy replies, fixed seeds. Writes <out>/judged.json and
<out>/judged.md; the media under <out>/media/.

    python scripts/tiny/judge_eval.py --config code/config/tiny/eval.yaml --ckpt base ckpt/tiny/delta/stage_3 --out DIR
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from tiny import judge
from tiny import toyworld as toy
from nextgpt import cli
from nextgpt import config as config_lib
from nextgpt.io import atomic_write_text

MODALITIES = ("image", "video", "audio")
CAPTIONS = {"image": toy.image_captions, "video": toy.video_captions, "audio": toy.audio_captions}


def requests(modality: str, trained: int, seed: int, held: int | None = None) -> list[dict]:
    """Every held-out combination's caption (or the first `held`), then `trained` seeded captions of combinations
    that were trained on."""
    rows = [dict(caption=c, want=dict(zip(judge.KEYS[modality], attrs)),
                 held=modality != "audio" and toy.held_out(attrs[0], attrs[1])) for c, *attrs in CAPTIONS[modality]()]
    seen = [r for r in rows if not r["held"]]
    random.Random(seed).shuffle(seen)
    return [r for r in rows if r["held"]][:held] + seen[:trained]


def shares(rows: list[dict], keys: tuple[str, ...]) -> dict[str, float | int]:
    """{attribute: share right, "all": every attribute right, "n": count} over rows with "want" and "got"."""
    if not rows:
        return {"n": 0}
    out: dict[str, float | int] = {k: sum(r["got"].get(k) == r["want"][k] for r in rows) / len(rows) for k in keys}
    out["all"] = sum(all(r["got"].get(k) == r["want"][k] for k in keys) for r in rows) / len(rows)
    out["n"] = len(rows)
    return out


def split_shares(rows: list[dict], modality: str) -> dict[str, dict]:
    keys = judge.KEYS[modality]
    out = {"trained": shares([r for r in rows if not r["held"]], keys)}
    if any(r["held"] for r in rows):
        out["held-out"] = shares([r for r in rows if r["held"]], keys)
    return out


def caption_embedding(decoders, modality: str, caption: str):
    """The caption through the decoder's own text encoder, as the stage-2 targets are made: (1, T, D)."""
    import torch

    from nextgpt.modalities import get

    pipeline = decoders.pipeline(modality)
    with torch.inference_mode():
        if get(modality).pooled:
            return pipeline._encode_prompt(caption, decoders.device, 1, False)[:, None]      # (1, 1, D)
        return pipeline.encode_prompt(caption, decoders.device, 1, False)[0]                # (1, 77, D)


def ceiling(decoders, asked: dict[str, list[dict]], out_dir: Path, seed: int) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for modality, items in asked.items():
        for n, item in enumerate(items):
            decoded = decoders.decode(modality, caption_embedding(decoders, modality, item["caption"]), seed=seed + n)
            path = decoders.write(decoded, out_dir, n)
            rows.setdefault(modality, []).append({**item, "media": str(path), "got": judge.judge_file(path)})
    return rows


def end_to_end(model, decoders, cfg, asked: dict[str, list[dict]], out_dir: Path, seed: int, batch: int = 8):
    """-> ({modality: rows}, emission {modality: share of requests answered with that modality's block; "text":
    share of text-only questions answered with none})."""
    from nextgpt.model.generate import Conversation, Sampling, decode, generate

    sampling = Sampling.from_config(cfg.inference, do_sample=False)
    rows: dict[str, list[dict]] = {}
    emission: dict[str, float] = {}
    counts: dict[str, int] = {}
    for modality, items in asked.items():
        emitted = 0
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            prompts = [toy.generation_prompt(modality, item["caption"], start + k) for k, item in enumerate(chunk)]
            replies = generate(model, [Conversation.of(p) for p in prompts], sampling, seed)
            for item, prompt, reply in zip(chunk, prompts, replies):
                row = {**item, "request": prompt, "reply": reply.display_text, "got": {}}
                if any(o.modality == modality for o in reply.outputs):
                    emitted += 1
                    reply.outputs = [o for o in reply.outputs if o.modality == modality][:1]
                    decode(reply, decoders, seed, out_dir=out_dir, counts=counts)
                    row["media"] = str(reply.outputs[0].path)
                    row["got"] = judge.judge_file(reply.outputs[0].path)
                rows.setdefault(modality, []).append(row)
        emission[modality] = emitted / len(items) if items else 0.0
    questions = [q for q, _ in toy.text_qa()[:8]] + [q for q, _ in toy.CHAT_OPENERS]
    replies = generate(model, [Conversation.of(q) for q in questions], sampling, seed)
    emission["text"] = sum(not r.outputs for r in replies) / len(replies)
    return rows, emission


def captioning(model, cfg, per_modality: int, media_dir: Path, seed: int) -> dict[str, dict]:
    """Freshly rendered toy media (files the model never saw) + a comprehension prompt -> the attributes named."""
    from tiny.make_toy_data import Media
    from nextgpt.data.types import Media as InputMedia
    from nextgpt.model.generate import Conversation, Sampling, generate
    from nextgpt.modalities import MODALITIES as TABLE

    sampling = Sampling.from_config(cfg.inference, do_sample=False)
    render = Media(random.Random(seed))
    out = {}
    for modality in MODALITIES:
        rows = requests(modality, per_modality, seed)[-per_modality:]
        conversations = []
        for n, row in enumerate(rows):
            path = media_dir / f"input_{modality}_{n}{TABLE[modality].extensions[0]}"
            getattr(render, modality)(path, *row["want"].values())
            conversations.append(Conversation.of(toy.comprehension_prompt(modality, n),
                                                 [InputMedia(modality, str(path.resolve()), path.name)]))
        replies = generate(model, conversations, sampling, seed)
        for row, reply in zip(rows, replies):
            row["reply"] = reply.display_text
            row["got"] = judge.attributes_in(modality, reply.display_text)
        out[modality] = shares(rows, judge.KEYS[modality])
    return out


def imagebind_agreement(scorer, rows: dict[str, list[dict]], seed: int) -> dict[str, dict]:
    """Share of media whose ImageBind score with their own caption beats that with another caption of the same
    modality (a seeded pick), and the two mean scores."""
    rng = random.Random(seed)
    out = {}
    for modality, items in rows.items():
        items = [r for r in items if "media" in r]
        if not items:
            continue
        pool = [c for c, *_ in CAPTIONS[modality]()]
        others = [rng.choice([c for c in pool if c != r["caption"]]) for r in items]
        paths, kinds = [r["media"] for r in items], [modality] * len(items)
        matched = scorer.score(paths, kinds, [r["caption"] for r in items]).tolist()
        mismatched = scorer.score(paths, kinds, others).tolist()
        out[modality] = {"matched": sum(matched) / len(matched), "mismatched": sum(mismatched) / len(mismatched),
                         "share": sum(m > o for m, o in zip(matched, mismatched)) / len(items), "n": len(items)}
    return out


def report(summary: dict) -> str:
    """The (a) / (b) table: per modality, split and checkpoint, the share of requests with every attribute right
    and per attribute."""
    lines = ["| decoder input | modality | combos | n | all right | per attribute | emission |", "|---|---|---|---|---|---|---|"]

    def row(name, modality, split, values, emission=""):
        per = ", ".join(f"{k} {values[k]:.2f}" for k in judge.KEYS[modality])
        lines.append(f"| {name} | {modality} | {split} | {values['n']} | {values['all']:.2f} | {per} | {emission} |")

    for modality, splits in summary["ceiling"].items():
        for split, values in splits.items():
            row("(a) true caption embedding", modality, split, values)
    for run in summary["checkpoints"]:
        for modality in MODALITIES:
            for split, values in run["judged"].get(modality, {}).items():
                if values["n"]:
                    row(f"(b) {run['name']}", modality, split, values, f"{run['emission'][modality]:.2f}")
        lines.append(f"| (b) {run['name']} | text-only | | | | | no signal {run['emission']['text']:.2f} |")
    lines += ["", "| checkpoint | captioning (attributes named right, fresh media) |", "|---|---|"]
    for run in summary["checkpoints"]:
        cells = "; ".join(f"{m}: " + ", ".join(f"{k} {v[k]:.2f}" for k in judge.KEYS[m]) for m, v in run["captioning"].items())
        lines.append(f"| {run['name']} | {cells} |")
    lines += ["", "| media | ImageBind matched > mismatched | mean matched / mismatched |", "|---|---|---|"]
    for name, scores in summary["imagebind"].items():
        for modality, v in scores.items():
            lines.append(f"| {name} {modality} | {v['share']:.2f} (n={v['n']}) | {v['matched']:.2f} / {v['mismatched']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_config_args(parser)
    parser.add_argument("--ckpt", nargs="*", default=[], help="base | checkpoint folders (in report order)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--trained", type=int, default=12, help="captions of trained combinations per modality")
    parser.add_argument("--held", type=int, default=None, help="held-out captions per modality (default: all)")
    parser.add_argument("--captions", type=int, default=8, help="captioning requests per modality")
    parser.add_argument("--seed", type=int, default=None, help="default: inference.seed")
    args = parser.parse_args(argv)

    def body() -> int:
        import torch

        from nextgpt.checkpoint import delta as checkpoint_lib
        from nextgpt.checkpoint.load import checkpoint_info
        from nextgpt.runtime import pick_device
        from nextgpt.eval.embedders import ImageBindScorer
        from nextgpt.model.decoders import Decoders
        from nextgpt.model.nextgpt import build_model

        cfg = config_lib.from_args(args)
        seed = cfg.inference.seed if args.seed is None else args.seed
        out = Path(args.out)
        device, dtype, reason = pick_device(None)
        print(f"device: {reason}", flush=True)
        decoders = Decoders(cfg, device=device, dtype=dtype, seed=seed)
        scorer = ImageBindScorer(cfg.path(cfg.model.imagebind), cfg.model.imagebind_preset,
                                 cfg.path(cfg.model.decoders["image"]) / "tokenizer", device=device, dtype=dtype)
        asked = {m: requests(m, args.trained, seed, args.held) for m in MODALITIES}
        started = time.time()
        rows = ceiling(decoders, asked, out / "media" / "ceiling", seed)
        summary = {"ceiling": {m: split_shares(r, m) for m, r in rows.items()}, "checkpoints": [],
                   "imagebind": {"(a) ceiling": imagebind_agreement(scorer, rows, seed)},
                   "held_out_combos": [list(c) for c in toy.HELD_OUT]}
        print(f"(a) ceiling judged in {time.time() - started:.0f} s", flush=True)
        records = {"ceiling": rows}
        for n, value in enumerate(args.ckpt):
            started = time.time()
            torch.manual_seed(cfg.train.seed)
            model, name = build_model(cfg, device=device, dtype=dtype), "base"
            if value != "base":
                # as evaluate.py loads: a stage-1 checkpoint holds no output_proj / LoRA (they stay as initialised)
                info = checkpoint_info(value)
                checkpoint_lib.load_checkpoint(model, info.path, allow_missing=("input_proj", "output_proj", "lora"))
                name = "/".join(Path(info.path).parts[-2:])
            model.eval()
            judged, emission = end_to_end(model, decoders, cfg, asked, out / "media" / f"{n}_{Path(value).name}", seed)
            run = {"name": name, "path": value, "emission": emission,
                   "judged": {m: split_shares(r, m) for m, r in judged.items()},
                   "captioning": captioning(model, cfg, args.captions, out / "media" / f"{n}_inputs", seed)}
            summary["checkpoints"].append(run)
            records[name] = judged
            if any("media" in r for v in judged.values() for r in v):
                summary["imagebind"][f"(b) {name}"] = imagebind_agreement(scorer, judged, seed)
            print(f"(b) {name}: judged in {time.time() - started:.0f} s", flush=True)
            del model
        text = report(summary)
        atomic_write_text(out / "judged.json", json.dumps({**summary, "records": records}, indent=2) + "\n")
        atomic_write_text(out / "judged.md", text + "\n")
        print(text, flush=True)
        return 0

    return cli.run(body, "judge_eval")


if __name__ == "__main__":
    raise SystemExit(main())
