"""Export a trained checkpoint: a merged Hugging Face model folder, or the original NExT-GPT pytorch_model.pt.

    python code/export.py --ckpt ckpt/delta_ckpt/nextgpt/7b_tiva_v0/stage_3 --out exports/nextgpt-hf
    python code/export.py --ckpt ckpt/delta_ckpt/nextgpt/7b_tiva_v0/stage_3 --out exports/legacy --format legacy

--format hf (default) writes
    config.json, model*.safetensors, generation_config.json   the LLM with LoRA merged into its weights and the 38
                                                              token rows written into embed_tokens / lm_head:
                                                              AutoModelForCausalLM.from_pretrained(out) alone loads it
    tokenizer files                                           the tokenizer with the 38 tokens
    projectors.safetensors                                    input_proj.* and output_proj.<modality>.* (+ metadata)
    nextgpt.json                                              what a NExT-GPT loader needs besides the LLM: template,
                                                              token ids, modalities, conditioning shapes, ImageBind
    README.md                                                 model card: base, fingerprint, data, metrics if any
--format legacy writes <out>/pytorch_model.pt in the original's key layout (fp16, as the released files;
nextgpt.checkpoint.legacy, the same key map that imports the released checkpoint).

The checkpoint's own config.yaml decides how the model is built (LLM, template, LoRA, projector sizes); --config /
--set override it. A base loaded in 8-bit or 4-bit is refused: LoRA merged into rounded weights is not the trained
model. Export from the bf16/fp32 base instead (--set model.quantization=none), which is what the 8-bit fine-tune's
LoRA was trained against up to quantization error.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from nextgpt import cli
from nextgpt import config as config_lib

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="delta folder, or a run folder holding `latest`")
    parser.add_argument("--out", required=True, help="output folder (written atomically, replaced if present)")
    parser.add_argument("--format", choices=["hf", "legacy"], default="hf")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="weights of the hf export (default: the base LLM's torch_dtype; legacy: float16)")
    parser.add_argument("--config", default=None, help="config to build the model with (default: the checkpoint's "
                                                       "config.yaml)")
    parser.add_argument("--metrics", default=None, help="metrics.json of code/evaluate.py for the model card "
                                                        "(default: one in the checkpoint or run folder, if any)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")
    return parser.parse_args(argv)


def load_config(checkpoint: Path, config: str | None, overrides: list[str]):
    """The config the checkpoint was trained with (its config.yaml, the resolved config), or --config."""
    import yaml

    if config is not None:
        return config_lib.load(config, overrides)
    saved = checkpoint / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"{saved}: missing (pass --config with the config the checkpoint was trained with)")
    data = yaml.safe_load(saved.read_text()) or {}
    data.pop("source", None)                        # where it came from, not a setting
    if dropped := _prune(data, config_lib.Config):
        print(f"warning: {saved}: ignoring setting(s) this version no longer has: {', '.join(dropped)}",
              file=sys.stderr)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(data, f)
        f.flush()
        return config_lib.load(f.name, overrides)


def _prune(data: dict, cls, prefix: str = "") -> list[str]:
    """Drop (in place) keys of a saved config that the current schema does not have (a checkpoint written by an
    older version, e.g. train.tensorboard before train.report_to) -> their dotted names."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    dropped = []
    for key in list(data):
        if key not in hints or key == "source":
            dropped.append(prefix + key)
            del data[key]
        elif dataclasses.is_dataclass(hints[key]) and isinstance(data[key], dict):
            dropped += _prune(data[key], hints[key], f"{prefix}{key}.")
    return dropped


def build(cfg, checkpoint: Path, dtype):
    """Base LLM + projectors, then the checkpoint strictly (a stage-1 delta has no output projectors or LoRA)."""
    from nextgpt.checkpoint import delta as checkpoint_lib
    from nextgpt.model.nextgpt import build_model

    model = build_model(cfg, device="cpu", dtype=dtype)
    checkpoint_lib.load_checkpoint(model, checkpoint, allow_missing=("input_proj", "output_proj", "lora"))
    model.eval()
    return model


def merged_llm(model):
    """The plain *ForCausalLM with LoRA merged and the effective token matrices written in (PEFT removed)."""
    import torch

    from nextgpt.model import llm as llm_utils

    matrices = {name: llm_utils.effective_token_matrix(model.llm, name).detach().clone()
                for name in llm_utils.TOKEN_MATRICES}                         # (V, D) each, base + trained rows
    llm = model.llm.merge_and_unload() if llm_utils.is_peft(model.llm) else model.llm
    with torch.no_grad():
        llm.get_input_embeddings().weight.copy_(matrices["embed_tokens"])
        llm.get_output_embeddings().weight.copy_(matrices["lm_head"])
    if type(llm).__name__.startswith("Peft") or any("lora_" in n or "trainable_tokens" in n
                                                    for n, _ in llm.named_parameters()):
        raise ValueError("PEFT layers remain after merging (unsupported adapter)")
    return llm


def model_card(cfg, checkpoint: Path, meta: dict, base_config: dict, metrics_path: Path | None = None) -> str:
    """README.md of the export: where it came from, the base fingerprint, what it was trained on, and the metrics of
    code/evaluate.py (--metrics, else a metrics.json in the checkpoint folder or its run folder) when there are any."""
    from nextgpt.io import read_json

    candidates = [metrics_path] if metrics_path else [checkpoint / "metrics.json", checkpoint.parent / "metrics.json"]
    metrics = next((read_json(p) for p in candidates if p.is_file()), None)
    if metrics_path and metrics is None:
        raise FileNotFoundError(f"{metrics_path}: --metrics file not found")
    base = meta.get("base") or {}                 # nextgpt.checkpoint.fingerprint, recorded in meta.json by save_delta
    fingerprint = ", ".join(f"{part} {value.get('digest')}" for part, value in base.items()
                            if isinstance(value, dict) and value.get("digest")) or "not recorded"
    lines = [
        "---", "library_name: transformers", "tags: [nextgpt, multimodal, any-to-any]", "---", "",
        "# NExT-GPT LLM export", "",
        "The language model of a NExT-GPT checkpoint with its LoRA merged and the 38 NExT-GPT tokens "
        "(`<Img>`, `</Img>`, `[IMG0-3]`, `[VID0-23]`, `[AUD0-7]`) in the tokenizer and in `embed_tokens` / `lm_head`. "
        "`AutoModelForCausalLM.from_pretrained` loads it alone; the input and output projectors are in "
        "`projectors.safetensors` (ImageBind and the diffusion decoders are not included).", "",
        "| | |", "|---|---|",
        f"| base LLM | `{cfg.model.llm}` ({base_config.get('model_type', '?')}, "
        f"{base_config.get('_name_or_path') or 'local folder'}) |",
        f"| template | `{cfg.model.template}` |",
        f"| checkpoint | `{checkpoint}` (stage {meta.get('stage', '?')}, step {meta.get('step', '?')}) |",
        f"| base fingerprint | {fingerprint} |",
        f"| training data | {', '.join(cfg.data.datasets) or 'not recorded'} |",
        f"| trained groups | {', '.join(meta.get('groups', [])) or '?'} |",
        "",
        "## Metrics", "",
    ]
    if metrics:
        lines += ["```json", json.dumps(metrics, indent=2)[:4000], "```"]
    else:
        lines += ["No evaluation was run on this checkpoint (code/evaluate.py writes metrics.json)."]
    return "\n".join(lines) + "\n"


def export_hf(model, cfg, checkpoint: Path, out: Path, meta: dict, metrics: Path | None = None) -> Path:
    from safetensors.torch import save_file

    from nextgpt.io import atomic_dir, atomic_write_text

    base_config = json.loads((cfg.path(cfg.model.llm) / "config.json").read_text())
    projectors = {f"input_proj.{k}": v for k, v in model.input_proj.state_dict().items()}
    for modality, projector in model.output_proj.items():
        projectors |= {f"output_proj.{modality}.{k}": v for k, v in projector.state_dict().items()}
    info = {
        "format": "nextgpt-hf-export",
        "template": cfg.model.template,
        "new_token_ids": list(model.token_ids.new_token_ids),
        "modalities": list(model.output_proj),
        "conditioning_shapes": {m: list(s) for m, s in model.conditioning_shapes.items()},
        "output_proj": cfg.model.output_proj.__dict__,
        "hidden_layer": cfg.model.hidden_layer,
        "imagebind_preset": cfg.model.imagebind_preset,
        "base_llm": cfg.model.llm,
        "checkpoint": str(checkpoint),
        "stage": meta.get("stage"),
        "step": meta.get("step"),
        "base_fingerprint": meta.get("base"),
    }
    llm = merged_llm(model)
    with atomic_dir(out) as tmp:
        llm.save_pretrained(str(tmp))
        model.tokenizer.save_pretrained(str(tmp))
        save_file({k: v.detach().contiguous() for k, v in projectors.items()}, str(tmp / "projectors.safetensors"),
                  metadata={"format": "nextgpt-projectors"})
        atomic_write_text(tmp / "nextgpt.json", json.dumps(info, indent=2) + "\n")
        atomic_write_text(tmp / "README.md", model_card(cfg, checkpoint, meta, base_config, metrics))
    return out


def export(args: argparse.Namespace) -> Path:
    import torch

    from nextgpt.checkpoint import delta as checkpoint_lib

    checkpoint = checkpoint_lib.resolve_checkpoint(args.ckpt)
    cfg = load_config(checkpoint, args.config, args.overrides)
    if cfg.model.quantization != "none":
        raise ValueError(f"model.quantization={cfg.model.quantization}: refusing to merge into a quantized base "
                         "(the merged weights would not be the trained model); export from the bf16 base: "
                         "--set model.quantization=none")
    out = Path(args.out)
    meta_path = checkpoint / checkpoint_lib.META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if args.format == "legacy":
        model = build(cfg, checkpoint, torch.float32)
        from nextgpt.checkpoint import legacy

        return legacy.export_legacy(model, out, getattr(torch, args.dtype or "float16"))
    llm_config = json.loads((cfg.path(cfg.model.llm) / "config.json").read_text())
    dtype_name = args.dtype or llm_config.get("torch_dtype") or llm_config.get("dtype") or "float32"
    if dtype_name not in DTYPES:
        raise ValueError(f"{cfg.model.llm}/config.json: torch_dtype {dtype_name!r}; pass --dtype")
    model = build(cfg, checkpoint, getattr(torch, dtype_name))
    return export_hf(model, cfg, checkpoint, out, meta, Path(args.metrics) if args.metrics else None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        print(f"exported {args.format}: {export(args)}")
        return 0

    return cli.run(body, "export")  # any failure: one `error:` line (exit 2), the traceback in a log it names


if __name__ == "__main__":
    raise SystemExit(main())
