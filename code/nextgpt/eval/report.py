"""Write what code/evaluate.py measured: metrics.json, report.md (one row per checkpoint, thumbnails), plots.

    write_report(out_dir, runs, context)      runs: [{"name", "path", "kind", "stage", "step", "loaded",
                                                      "metrics": {...}, "records": [...]}] in evaluation order

Every file is written atomically (nextgpt.io). Thumbnails: a generated image scaled to 96 px, a video's first,
middle and last frames side by side, a sound's waveform; they live in <out>/thumbs/ and report.md links them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

from nextgpt.io import atomic_write_bytes, atomic_write_text

# Table columns: (metric key prefix or key, header); a prefix expands to one column per modality present.
COLUMNS = [("heldout_loss", "loss"), ("token_acc", "token acc"), ("bleu4", "BLEU-4"), ("cider_d", "CIDEr-D"),
           ("emission.", "emission"), ("l2.", "l2"), ("cos.", "cos"), ("imagebind.", "ImageBind"),
           ("clip.", "CLIP")]
ORDER = ["image", "video", "audio", "text"]
THUMB = 96


def metric_keys(runs: Sequence[dict]) -> list[tuple[str, str]]:
    """[(metric key, column header)] in table order, for the metrics any run has."""
    present = {k for run in runs for k in run["metrics"]}
    keys = []
    for key, header in COLUMNS:
        if key.endswith("."):
            found = sorted((k for k in present if k.startswith(key)),
                           key=lambda k: (ORDER.index(k[len(key):]) if k[len(key):] in ORDER else 9, k))
            keys += [(k, f"{header} {k[len(key):]}") for k in found]
        elif key in present:
            keys.append((key, header))
    return keys


def _format(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def table(runs: Sequence[dict]) -> str:
    """The markdown table: one row per checkpoint, one column per metric."""
    keys = metric_keys(runs)
    header = "| checkpoint | step | " + " | ".join(h for _, h in keys) + " |"
    rule = "|---|---:|" + "---:|" * len(keys)
    rows = [f"| {run['name']} | {run.get('step') if run.get('step') is not None else '–'} | "
            + " | ".join(_format(run["metrics"].get(k)) for k, _ in keys) + " |" for run in runs]
    return "\n".join([header, rule, *rows])


def _png(figure_or_image) -> bytes:
    buffer = io.BytesIO()
    if hasattr(figure_or_image, "savefig"):
        figure_or_image.savefig(buffer, format="png", dpi=100)
    else:
        figure_or_image.save(buffer, format="PNG")
    return buffer.getvalue()


def thumbnail(decoded) -> bytes:
    """A small PNG of a decoded medium (see the module docstring)."""
    import numpy as np
    from PIL import Image

    if decoded.modality == "image":
        image = decoded.data.convert("RGB")
        image.thumbnail((THUMB, THUMB))
        return _png(image)
    if decoded.modality == "video":
        frames = decoded.data                                         # (F, H, W, 3) uint8
        picks = sorted({0, len(frames) // 2, len(frames) - 1})
        strip = np.concatenate([frames[i] for i in picks], axis=1)   # (H, k*W, 3)
        image = Image.fromarray(strip)
        image.thumbnail((THUMB * len(picks), THUMB))
        return _png(image)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(1.6, 0.6))
    axis.plot(np.asarray(decoded.data, dtype=np.float32), linewidth=0.4)
    axis.set_axis_off()
    figure.subplots_adjust(0, 0, 1, 1)
    data = _png(figure)
    plt.close(figure)
    return data


def plots(out_dir: Path, runs: Sequence[dict]) -> list[Path]:
    """One PNG per metric: its value per checkpoint (x = step when every run has a distinct step, else the order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [run.get("step") for run in runs]
    by_step = all(s is not None for s in steps) and len(set(steps)) == len(steps)
    written = []
    for key, header in metric_keys(runs):
        points = [(i, run["metrics"][key]) for i, run in enumerate(runs) if key in run["metrics"]]
        if not points:
            continue
        figure, axis = plt.subplots(figsize=(4.5, 3))
        xs = [steps[i] if by_step else i for i, _ in points]
        axis.plot(xs, [v for _, v in points], marker="o")
        if not by_step:
            axis.set_xticks(range(len(runs)), [run["name"] for run in runs], rotation=30, ha="right", fontsize=7)
        axis.set_xlabel("step" if by_step else "checkpoint")
        axis.set_title(header)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        path = out_dir / "plots" / f"{key.replace('.', '_')}.png"
        atomic_write_bytes(path, _png(figure))
        plt.close(figure)
        written.append(path)
    return written


def _jsonable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "decoded"}


def write_report(out_dir: str | Path, runs: Sequence[dict], context: dict) -> dict[str, Path]:
    """metrics.json + report.md + plots/ + thumbs/ under out_dir -> {"metrics": path, "report": path}."""
    out_dir = Path(out_dir).resolve()
    summary = {**context, "checkpoints": [{k: v for k, v in run.items() if k != "records"} for run in runs]}
    atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    for run in runs:
        atomic_write_text(out_dir / run["slug"] / "replies.jsonl",
                          "".join(json.dumps(_jsonable(r)) + "\n" for r in run["records"]))
    plot_paths = plots(out_dir, runs)

    lines = [f"# Evaluation: {context.get('config', '')}", "",
             f"Held-out requests: {', '.join(f'{k} {v}' for k, v in sorted(context.get('requests', {}).items()))}; "
             f"seed {context.get('seed')}; "
             f"{'sampled' if context.get('sample') else 'greedy'} replies; device {context.get('device', '')}.", "",
             table(runs), ""]
    for run in runs:
        loaded = ", ".join(run.get("loaded") or []) or "nothing (the base model)"
        lines.append(f"- **{run['name']}**: {run.get('path') or 'base model'}; loaded {loaded}")
    lines.append("")
    thumbs = []
    for run in runs:
        cells = []
        for n, record in enumerate(r for r in run["records"] if r.get("decoded") is not None):
            decoded = record["decoded"]
            thumb = out_dir / "thumbs" / f"{run['slug']}_{decoded.modality}_{n}.png"
            atomic_write_bytes(thumb, thumbnail(decoded))
            media = Path(record["media"]).resolve().relative_to(out_dir) if "media" in record else thumb.relative_to(out_dir)
            score = f" {record['imagebind']:.2f}" if "imagebind" in record else ""
            cells.append(f"[![{decoded.modality}{score}]({thumb.relative_to(out_dir)})]({media})")
        if cells:
            thumbs.append(f"**{run['name']}**: " + " ".join(cells))
    if thumbs:
        lines += ["## Generated media (ImageBind score in the alt text; click for the file)", "", *thumbs, ""]
    if plot_paths:
        lines += ["## Plots", "", *[f"![{p.stem}]({p.relative_to(out_dir)})" for p in plot_paths], ""]
    lines += ["## Metrics", "",
              "- loss / token acc: held-out LM loss and next-token accuracy with the answers given (as training).",
              "- BLEU-4, CIDEr-D: greedy replies to the media→text requests against their reference answers "
              "(COCO caption scorers; lowercased, punctuation removed).",
              "- emission <m>: share of replies to <m> requests with exactly one complete, in-order <m> signal "
              "block; emission text: share of replies to text-answer requests with no signal token.",
              "- l2 / cos <m>: projector output at the generated block vs the caption embedding of the decoder's "
              "text encoder (mean per-token distance / cosine).",
              "- ImageBind <m>: cosine of the decoded medium and its caption in ImageBind's joint space; "
              "CLIP image: 100·max(cos, 0) with the given CLIP model.", ""]
    atomic_write_text(out_dir / "report.md", "\n".join(lines))
    return {"metrics": out_dir / "metrics.json", "report": out_dir / "report.md"}
