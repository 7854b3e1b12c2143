"""What a stage will train on: the data report of `validate_data.py --report` / `make data-report`.

    text = data_report(cfg, names=None, png="runs/data_report/stage_3.png", validation=report)

Per dataset of the config (default cfg.data.datasets): records, input media per modality, output signal blocks per
modality (the modality mix), answer length in words (the caption of a pair record, every gpt turn of a
conversation) and token length as encode() builds it with the configured LLM and template (template included,
capped at model.max_length, with how many hit the cap); then one PNG with both histograms per dataset; then the
missing / corrupt records that validation found (the report it is given).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from nextgpt.modalities import MODALITIES


def _stats(values: list[int]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    median = ordered[len(ordered) // 2]
    return f"{ordered[0]}/{median}/{ordered[-1]}"


def collect(cfg, names: list[str] | None = None) -> dict[str, dict]:
    """{dataset: {records, inputs (Counter), outputs (Counter), words [..], tokens [..]}} for the given catalog names."""
    from nextgpt.data.dataset import token_lengths
    from nextgpt.data.readers import read_dataset
    from nextgpt.tokens import load_tokenizer

    names = list(names or cfg.data.datasets)
    if not names:
        raise ValueError("no datasets to report on (data.datasets is empty; pass --datasets)")
    tokenizer, token_ids = load_tokenizer(cfg.path(cfg.model.llm), cfg.model.template)
    out = {}
    for name in names:
        samples = read_dataset(cfg, name)
        words = [sum(len(t.text.split()) for t in s.turns if t.role == "gpt") for s in samples]
        out[name] = {
            "records": len(samples),
            "inputs": Counter(m.modality for s in samples for m in s.media),
            "outputs": Counter(t.output_modality for s in samples for t in s.turns if t.output_modality),
            "words": words,
            "tokens": token_lengths(samples, tokenizer, token_ids, cfg.model.max_length),
        }
    return out


def format_table(stats: dict[str, dict], max_length: int) -> str:
    header = (f"{'dataset':24} {'records':>8}  " + " ".join(f"{'in:' + m:>9}" for m in MODALITIES) + "  "
              + " ".join(f"{'out:' + m:>9}" for m in MODALITIES) + f"  {'words min/med/max':>18}  "
              f"{'tokens min/med/max':>19}  {'at max':>6}")
    lines = [header, "-" * len(header)]
    total_in, total_out, total = Counter(), Counter(), 0
    for name, s in stats.items():
        total += s["records"]
        total_in.update(s["inputs"])
        total_out.update(s["outputs"])
        capped = sum(1 for n in s["tokens"] if n >= max_length)
        lines.append(f"{name:24} {s['records']:>8}  " + " ".join(f"{s['inputs'][m]:>9}" for m in MODALITIES) + "  "
                     + " ".join(f"{s['outputs'][m]:>9}" for m in MODALITIES)
                     + f"  {_stats(s['words']):>18}  {_stats(s['tokens']):>19}  {capped:>6}")
    lines.append("-" * len(header))
    lines.append(f"{'total':24} {total:>8}  " + " ".join(f"{total_in[m]:>9}" for m in MODALITIES) + "  "
                 + " ".join(f"{total_out[m]:>9}" for m in MODALITIES))
    mix = [f"{m} {100 * total_in[m] / max(1, sum(total_in.values())):.0f}%" for m in MODALITIES if total_in[m]]
    lines.append("input modality mix: " + (", ".join(mix) if mix else "text only"))
    return "\n".join(lines)


def plot(stats: dict[str, dict], path: str | Path, title: str, max_length: int) -> Path:
    """Answer-length (words) and token-length histograms, one colour per dataset, written atomically as PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")                  # no display; the backend is chosen before pyplot is imported
    import matplotlib.pyplot as plt

    from nextgpt.io import atomic_write_bytes

    figure, (words, tokens) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, s in stats.items():
        words.hist(s["words"], bins=30, alpha=0.55, label=f"{name} ({s['records']})")
        tokens.hist(s["tokens"], bins=30, alpha=0.55, label=name)
    tokens.axvline(max_length, color="black", linestyle="--", linewidth=1, label=f"model.max_length {max_length}")
    words.set(title="answer / caption length", xlabel="words", ylabel="records")
    tokens.set(title="encoded sequence length (template included)", xlabel="tokens", ylabel="records")
    words.legend(fontsize=8)
    tokens.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def data_report(cfg, names: list[str] | None = None, png: str | Path | None = None, validation=None) -> str:
    """The whole report as text (and the PNG when `png` is given). validation: a validate.Report for the same
    datasets, whose missing / corrupt records are listed."""
    stats = collect(cfg, names)
    parts = [f"data report: {cfg.source or 'config'} (LLM {cfg.model.llm}, template {cfg.model.template})",
             format_table(stats, cfg.model.max_length)]
    if png is not None:
        parts.append(f"histograms: {plot(stats, png, Path(cfg.source).stem if cfg.source else 'data', cfg.model.max_length)}")
    if validation is not None:
        problems = validation.problems
        parts.append(f"missing / corrupt records: {len(problems)}")
        parts += [f"  {p}" for p in problems]
    return "\n".join(parts)
