"""Pipeline overhead of a NExT-GPT training step, and padding efficiency of the stage mixtures.

    python dev/bench/bench_pipeline.py                      # CPU: mid-size Llama (4 layers, hidden 512), stages 1-3
    python dev/bench/bench_pipeline.py --quick              # fewer batches and repetitions
    python dev/bench/bench_pipeline.py --device cuda --model 7b     # GPU: 7B-shaped random-init Vicuna, tokens/s + MFU

Overhead = median time of one NExT-GPT training step (model(batch) -> loss.backward(): embedding with the soft
tokens, the LLM, hidden states, output projectors, LM + l2 losses, token accuracy, PEFT token rows / LoRA)
divided by the median time of the bare `LlamaForCausalLM` forward + backward (its own shifted cross-entropy) on the
very same collated batch (input_ids, attention_mask, labels), same weights, dtype and device: the bare 4N fwd+bwd.
Targets: stage 1 <= 1.00, stage 2 <= 0.60, stage 3 <= 1.03. The optimizer step is not timed on either side (its
cost depends only on the trainable count).

Stages 1-2 run suffix backward (train.suffix_backward, nextgpt/model/suffix.py): each row's prefix before its first
trainable input (stage 2: the signal block; stage 1: <Img>) runs once without gradients, the rest with them. The
"FLOP limit" column is what that leaves of the bare step's FLOPs for the padded batch as run:
(2·P + 4·S) / (4·L) per batch (P: longest prefix, S: longest suffix, L: padded length; 1.0 without a split), the
ratio a step would show if time followed FLOPs. Stage 2 is also measured per modality (image / video / audio: 4 / 24
/ 8 signal tokens) and with suffix backward off. "saved MiB": the activations autograd keeps for the backward of one
step (saved-tensor storages, parameters excluded; the KV cache the suffix attends to included), the part of peak
memory that suffix backward changes; on CUDA also the step's peak allocated memory.

Trainable sets: NExT-GPT trains what the stage config says (stage 1 input_proj + the 38 token rows; stage 2
output_proj + rows; stage 3 LoRA + both projectors + rows). The bare model trains embed_tokens and lm_head (the
matrices the token rows live in; the backward therefore runs through every layer, as NExT-GPT's input-side
parameters force) plus, in stage 3, the same LoRA adapters (peft, same r / alpha / dropout / targets).

Sizes: the LLM is a Llama built from LlamaConfig with the tiny tokenizer (mid: 4 layers, hidden 512, 8 heads,
MLP 1376; 7b: Vicuna-7B's shape, random init, GPU only). The output projectors keep the tiny config's sizes: their
share of a step's FLOPs then matches the real model's (7B Vicuna vs 4+4-layer d=512 projectors: ~0.3%); the real
projector sizes against a 4-layer LLM would measure the projector, not the pipeline (--real-projectors does it).
Batches come from the real loader (build_loader: catalog, readers, conversation template, collate): stages 1-2
read ../shared/samples/nextgpt (the released NExT-GPT records and media) when present, stage 3 the toy
instruction data (no stage-3 samples exist), at train.micro_batch_size = --batch-size and model.max_length 512.

Padding efficiency = real tokens / (rows x padded length) summed over one epoch of each stage's mixture
(MixtureSampler plan, token lengths from the real template), without and with group_by_length. Target >= 0.90.

MFU (7b, --device cuda): model FLOPs per token = 4 N (forward 2N + the backward's input gradients 2N; the LLM's
weights are frozen, so no weight-gradient 2N; LoRA / projector / token-row weight gradients are < 1% and not
counted), N = LLM parameters without the input embedding table, attention-score FLOPs not counted;
MFU = 4 N tokens/s / peak bf16 dense FLOP/s of the GPU (H100/H200 SXM 989 TFLOP/s; --peak-tflops to override).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from bench.common import (bench_args, run_cli, SAMPLES, BenchError, machine, machine_line, median, print_table,
                          quiet, resolve_device, set_threads, timed, verdict, workspace)

OVERHEAD_TARGETS = {1: 1.00, 2: 0.60, 3: 1.03}      # NExT-GPT step / bare 4N fwd+bwd (issue 16)
PADDING_TARGET = 0.90
MID = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=8)
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
REAL_PROJECTORS = ["model.output_proj.d_model=512", "model.output_proj.num_encoder_layers=4",
                   "model.output_proj.num_decoder_layers=4", "model.output_proj.num_heads=4",
                   "model.output_proj.dim_feedforward=2048"]
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1,
                    "L4": 121.0, "A10": 125.0, "B200": 2250.0}
STAGES = {1: "stage_1", 2: "stage_2", 3: "stage_3"}


# ----------------------------------------------------------------------------------------------------------------
# Configs and models

def stage_overrides(env, work: Path, stage: int, batch_size: int, args) -> list[str]:
    """Overrides for one stage: mid LLM, data root (samples for stages 1-2 when present), batch, max_length."""
    out = [f"model.llm={work / 'llm_mid'}", f"train.micro_batch_size={batch_size}", "model.max_length=512",
           "train.init_from=", "model.lora.r=32", "model.lora.alpha=32", "model.lora.dropout=0.1"]
    if stage in (1, 2) and data_source(args, stage) == "samples":
        out += [f"data.root={SAMPLES}", f"data.embed_dir={work / 'samples_embed'}",
                f"data.feature_dir={work / 'samples_features'}"]
    if args.real_projectors:
        out += REAL_PROJECTORS
    return out


def dataset_modality(cfg, dataset: str) -> str:
    """The output modality of a stage-2 catalog dataset (cc3m_dec -> image)."""
    from nextgpt.data import catalog

    return catalog.resolve(cfg, dataset, require_file=False).modality


def data_source(args, stage: int) -> str:
    return "samples" if stage in (1, 2) and SAMPLES.is_dir() and not args.toy else "toy"


def write_llm(folder: Path, tokenizer_dir: Path, shape: dict) -> Path:
    """A Llama of `shape` (random init) with the tiny tokenizer, saved like a Vicuna folder (once per shape)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    marker = folder / "config.json"
    if marker.is_file() and all(json.loads(marker.read_text()).get(k) == v for k, v in shape.items()):
        return folder
    from nextgpt.io import atomic_dir

    base = json.loads((tokenizer_dir / "config.json").read_text())
    with atomic_dir(folder) as tmp:
        for f in tokenizer_dir.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy(f, tmp / f.name)
        torch.manual_seed(0)
        config = LlamaConfig(**{**shape, "vocab_size": base["vocab_size"]}, max_position_embeddings=2048,
                             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        LlamaForCausalLM(config).save_pretrained(str(tmp))
    return folder


def prepare_samples(env, work: Path, args) -> None:
    """Tiny-decoder caption embeddings and tiny-ImageBind features of the sample records (real commands)."""
    from tiny.tiny_workspace import code_script

    process_embeddings = code_script("process_embeddings")
    if not SAMPLES.is_dir() or args.toy:
        return
    extra = [f"data.root={SAMPLES}", f"data.embed_dir={work / 'samples_embed'}",
             f"data.feature_dir={work / 'samples_features'}"]
    with quiet(work / "prepare.log"):
        for stage, flags in (("stage_1", ["--features"]), ("stage_2", [])):
            rc = process_embeddings.main([*env.argv(stage, *extra), "--all", *flags])
            if rc != 0:
                raise BenchError(f"process_embeddings {stage} {' '.join(flags)} on {SAMPLES} failed; see "
                                 f"{work / 'prepare.log'}")


def build_baseline(cfg, llm_dir: Path, vocab_size: int, device, dtype):
    """The bare LlamaForCausalLM (+ the stage's LoRA) on the same weights; embed_tokens / lm_head trainable."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(llm_dir), dtype=dtype).to(device)
    return finish_baseline(cfg, model, vocab_size)


def finish_baseline(cfg, model, vocab_size: int):
    import torch

    if model.get_input_embeddings().weight.shape[0] != vocab_size:
        model.resize_token_embeddings(vocab_size)
    model.requires_grad_(False)
    if cfg.model.lora.enabled and "lora" in cfg.train.trainable:
        from peft import LoraConfig, get_peft_model

        lora = cfg.model.lora
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=list(lora.target_modules), bias="none",
                                                 task_type="CAUSAL_LM"))
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.get_input_embeddings().weight.requires_grad_(True)
    inner.lm_head.weight.requires_grad_(True)
    model.train()
    torch.manual_seed(0)
    return model


def build_7b(cfg, device, dtype, shape: dict = VICUNA_7B, with_bare: bool = True):
    """NextGPT around a 7B-shaped (or `shape`) random-init Llama built in memory on `device` (nothing written to
    disk), and the bare baseline of the same shape (None without with_bare). Mirrors
    nextgpt.model.nextgpt.build_model without load_llm."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nextgpt.imagebind.encode import LazyEncoder
    from nextgpt.model import llm as llm_utils
    from nextgpt.model.nextgpt import NextGPT, conditioning_shapes, imagebind_dim
    from nextgpt.tokens import load_tokenizer

    tokenizer, token_ids = load_tokenizer(cfg.path(cfg.model.llm))
    config = LlamaConfig(**shape, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False)
    with torch.device(device):
        llm = LlamaForCausalLM._from_config(config, dtype=dtype)
        bare = LlamaForCausalLM._from_config(config, dtype=dtype) if with_bare else None
    # The tiny tokenizer's ids (< 800, the 38 NExT-GPT tokens included) all fall inside the 32000-row matrices.
    llm = llm_utils.wrap_llm(llm, token_ids, cfg.train.token_rows, cfg.model.lora, "none", False)
    model = NextGPT(cfg, llm, tokenizer, token_ids, imagebind_dim(cfg.model.imagebind_preset),
                    conditioning_shapes(cfg), media_encoder=LazyEncoder(cfg.path(cfg.model.imagebind),
                                                                        cfg.model.imagebind_preset, device, dtype))
    model.input_proj.to(device=device, dtype=dtype)
    model.output_proj.to(device=device, dtype=dtype)
    return model, finish_baseline(cfg, bare, shape["vocab_size"]) if with_bare else None


def llm_flop_params(model) -> int:
    """N of the 4·N convention: LLM parameters without the input embedding table (lm_head counted)."""
    from nextgpt.model import llm as llm_utils

    inner = llm_utils.causal_lm(model.llm)
    embed = llm_utils.base_token_weight(model.llm, "embed_tokens")
    total = sum(p.numel() for n, p in inner.named_parameters()
                if "lora_" not in n and "trainable_tokens" not in n)
    return total - embed.numel()


def peak_tflops(device, override: float | None) -> float | None:
    import torch

    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value / 2 if key == "H100" and "PCIe" in name else value
    return None


# ----------------------------------------------------------------------------------------------------------------
# Overhead

def to_device(batch: dict, device) -> dict:
    from nextgpt.runtime import to_device as move

    return move(batch, device)


def flop_share(model, batch) -> float:
    """(2P + 4S) / (4L): the FLOPs suffix backward runs for this padded batch over the bare 4N·B·L (1.0: no split)."""
    blocks = {m: [tuple(b) for b in v.tolist()] for m, v in batch["signal_blocks"].items()}
    split = model._split(batch["input_ids"], batch["attention_mask"], batch.get("media_positions"), blocks)
    if split is None:
        return 1.0
    lengths = batch["attention_mask"].sum(1).tolist()
    prefix, suffix = max(split), max(n - s for n, s in zip(lengths, split))
    return (2 * prefix + 4 * suffix) / (4 * batch["input_ids"].shape[1])


def saved_activation_bytes(model, batch) -> int:
    """Bytes of the distinct storages autograd saves for the backward of one step, parameters excluded."""
    import torch

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(batch)["loss"]
    loss.backward()
    return sum(storages.values())


def overhead_stage(env, work: Path, stage: int, args, device, dtype, datasets: list[str] | None = None,
                   suffix_backward: bool | None = None, label: str = "") -> dict:
    import torch

    from nextgpt.data.dataset import build_loader
    from nextgpt.model.nextgpt import build_model
    from nextgpt.model.trainable import set_trainable

    extra = [] if suffix_backward is None else [f"train.suffix_backward={str(suffix_backward).lower()}"]
    if datasets:
        extra.append(f"data.datasets=[{','.join(datasets)}]")
    cfg = env.config(STAGES[stage], *stage_overrides(env, work, stage, args.batch_size, args), *extra)
    torch.manual_seed(0)
    with quiet(work / "build.log"):
        if args.model == "7b":
            model, baseline = build_7b(cfg, device, dtype)
        else:
            model = build_model(cfg, device=device, dtype=dtype)
            baseline = build_baseline(cfg, cfg.path(cfg.model.llm), len(model.tokenizer), device, dtype)
        counts = set_trainable(model, cfg)
        loader, _ = build_loader(cfg, model.tokenizer, model.token_ids)
    model.train()
    batches = []
    for batch in loader:
        batches.append(to_device(batch, device))
        if len(batches) == args.batches:
            break

    def nextgpt_step(batch):
        model.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()

    def bare_step(batch):
        baseline.zero_grad(set_to_none=True)
        baseline(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 use_cache=False).loss.backward()

    nextgpt_times, bare_times, tokens, lengths, shares = [], [], 0, [], []
    for batch in batches:
        ours, bare = [], []
        for rep in range(args.warmup + args.reps):      # interleaved, so drift hits both sides alike
            a = timed(lambda: nextgpt_step(batch), device)
            b = timed(lambda: bare_step(batch), device)
            if rep >= args.warmup:
                ours.append(a)
                bare.append(b)
        nextgpt_times.append(median(ours))
        bare_times.append(median(bare))
        tokens += int(batch["attention_mask"].sum())
        lengths.append(batch["input_ids"].shape[1])
        shares.append(flop_share(model, batch))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    saved = saved_activation_bytes(model, batches[0])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    trainable_bare = sum(p.numel() for p in baseline.parameters() if p.requires_grad)
    # FLOP limit weighted like the overhead (by the bare step time of each batch)
    flop_limit = sum(s * t for s, t in zip(shares, bare_times)) / sum(bare_times)
    result = dict(stage=stage, label=label or f"stage {stage}", suffix_backward=cfg.train.suffix_backward,
                  target=OVERHEAD_TARGETS[stage] if not label else None, flop_limit=flop_limit,
                  saved_activation_mib=saved / 2**20, peak_allocated_mib=peak / 2**20 if peak else None,
                  data=data_source(args, stage), batches=len(batches), batch_size=args.batch_size,
                  mean_padded_length=sum(lengths) / len(lengths), real_tokens=tokens,
                  nextgpt_ms=1000 * sum(nextgpt_times) / len(batches), bare_ms=1000 * sum(bare_times) / len(batches),
                  overhead=sum(nextgpt_times) / sum(bare_times),
                  trainable_nextgpt=counts["total"], trainable_bare=trainable_bare,
                  datasets=list(cfg.data.datasets))
    result["tokens_per_s"] = tokens / sum(nextgpt_times)
    if args.model == "7b":
        n = llm_flop_params(model)
        result["flop_params"] = n
        peak = peak_tflops(device, args.peak_tflops)
        result["model_tflops"] = 4 * n * result["tokens_per_s"] / 1e12
        result["mfu"] = result["model_tflops"] / peak if peak else None
        result["peak_tflops"] = peak
    del model, baseline
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------------------------
# Padding efficiency

def padding_stage(env, work: Path, stage: int, args) -> list[dict]:
    """Efficiency over one epoch, per batch size: no grouping, group_by_length (the sampler's own length estimate,
    as training runs it) and grouping by the true token lengths (what a perfect estimate would give). Besides the
    data as it is, an epoch of `--simulate` samples per dataset drawn from the same records (the sample files
    hold only ~12 records per dataset, fewer than one length-grouping megabatch)."""
    import numpy as np

    from nextgpt.data.dataset import build_datasets
    from nextgpt.data.sampler import MixtureSampler
    from nextgpt.tokens import load_tokenizer

    cfg = env.config(STAGES[stage], *stage_overrides(env, work, stage, 1, args))
    tokenizer, token_ids = load_tokenizer(cfg.path(cfg.model.llm))
    with quiet(work / "build.log"):
        datasets = build_datasets(cfg, tokenizer, token_ids)
    parts = list(datasets.values())
    # True token lengths from the real template, and the lengths the sampler groups by (dataset.lengths).
    true = [np.array([len(d[i].input_ids) for i in range(len(d))]) for d in parts]
    estimate = [np.asarray(d.lengths) for d in parts]
    variants = [(data_source(args, stage), true, estimate)]
    if args.simulate:
        rng = np.random.default_rng(0)
        picks = [rng.integers(0, len(t), args.simulate) for t in true]
        variants.append((f"{data_source(args, stage)} x{args.simulate} (resampled)",
                         [t[p] for t, p in zip(true, picks)], [e[p] for e, p in zip(estimate, picks)]))

    class Sized:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    rows = []
    for name, true_lengths, estimated in variants:
        flat = np.concatenate(true_lengths)
        sized = [Sized(len(t)) for t in true_lengths]
        for batch_size in args.padding_batch_sizes:
            row = dict(stage=stage, data=name, mixture=cfg.data.mixture, batch_size=batch_size,
                       samples=int(len(flat)), mean_tokens=float(flat.mean()))
            for key, grouped, keys in (("none", False, None), ("group_by_length", True, estimated),
                                       ("true_length", True, true_lengths)):
                sampler = MixtureSampler(sized, batch_size=batch_size, seed=cfg.train.seed, group_by_length=grouped,
                                         mode=cfg.data.mixture, lengths=keys)
                plan = sampler.plan(0)
                batch_lengths = flat[plan]                                  # (batches, batch_size)
                real, padded = int(batch_lengths.sum()), int((batch_lengths.max(axis=1) * batch_size).sum())
                row["batches"] = int(plan.shape[0])
                row[key] = real / padded
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------

def run(args) -> dict:
    import torch

    if args.quick:
        args.batches, args.reps, args.warmup = min(args.batches, 3), min(args.reps, 3), 1
    device = resolve_device(args.device)
    if device.type == "cpu":
        set_threads(args.threads)
    if args.model == "7b" and device.type != "cuda":
        raise BenchError("--model 7b needs --device cuda (a 7B model does not train on this CPU)")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype) or \
        (torch.bfloat16 if device.type == "cuda" else torch.float32)
    work = Path(args.workdir).resolve()
    env = workspace(work / "tiny")
    write_llm(work / "llm_mid", env.ckpt / "vicuna", MID)
    prepare_samples(env, work, args)

    print(machine_line())
    overhead = []
    if not args.skip_overhead:
        for stage in args.stages:
            overhead.append(overhead_stage(env, work, stage, args, device, dtype))
            if stage == 1 and not args.no_modalities:       # the stage-1 prefix split: the other setting
                other = not overhead[-1]["suffix_backward"]
                overhead.append(overhead_stage(env, work, 1, args, device, dtype, suffix_backward=other,
                                               label=f"stage 1, suffix backward {'on' if other else 'off'}"))
            if stage == 2 and not args.no_modalities:       # per modality, and the full-autograd path
                cfg = env.config(STAGES[2], *stage_overrides(env, work, 2, args.batch_size, args))
                for dataset in cfg.data.datasets:
                    modality = dataset_modality(cfg, dataset)
                    overhead.append(overhead_stage(env, work, 2, args, device, dtype, [dataset],
                                                   label=f"stage 2 {modality}"))
                overhead.append(overhead_stage(env, work, 2, args, device, dtype, suffix_backward=False,
                                               label="stage 2, suffix backward off"))
        llm_name = "7B-shaped Llama (random init)" if args.model == "7b" else \
            "Llama 4 layers, hidden 512 (random init)"
        columns = ["run", "data", "batches x B", "mean L", "NExT-GPT ms", "bare ms", "overhead", "FLOP limit",
                   "saved MiB", "tokens/s", "target"]
        rows = [[r["label"], r["data"], f"{r['batches']} x {r['batch_size']}", r["mean_padded_length"],
                 r["nextgpt_ms"], r["bare_ms"], r["overhead"], r["flop_limit"], r["saved_activation_mib"],
                 r["tokens_per_s"],
                 f"<= {r['target']} {verdict(r['overhead'], r['target'], False)}" if r["target"] else ""]
                for r in overhead]
        if args.model == "7b":
            columns += ["model TFLOP/s", "MFU"]
            for row, r in zip(rows, overhead):
                row += [r["model_tflops"], r["mfu"] if r["mfu"] is not None else float("nan")]
        print_table(f"Pipeline overhead: NExT-GPT step / bare LlamaForCausalLM fwd+bwd, same batch "
                    f"({llm_name}, {device.type} {str(dtype).removeprefix('torch.')}, median of {args.reps} after "
                    f"{args.warmup} warm-up)", columns, rows)
    padding = []
    if not args.skip_padding:
        for stage in args.stages:
            padding += padding_stage(env, work, stage, args)
        rows = [[f"stage {r['stage']}", r["data"], r["mixture"], r["batch_size"], r["batches"], r["mean_tokens"],
                 r["none"], r["group_by_length"], r["true_length"],
                 f">= {PADDING_TARGET} {verdict(r['group_by_length'], PADDING_TARGET, True)}"] for r in padding]
        print_table("Padding efficiency: real / padded tokens over one epoch of the stage mixture (group_by_length: "
                    "the dataset's token lengths, as the sampler uses them; true lengths: grouping by token count)",
                    ["stage", "data", "mixture", "B", "batches", "mean tokens", "no grouping", "group_by_length",
                     "true lengths", "target"], rows)
    result = {"machine": machine(), "device": str(device), "dtype": str(dtype), "model": args.model,
              "llm_shape": VICUNA_7B if args.model == "7b" else MID, "overhead": overhead, "padding": padding,
              "overhead_targets": OVERHEAD_TARGETS, "padding_target": PADDING_TARGET,
              "real_projectors": args.real_projectors,
              "command": "python dev/bench/bench_pipeline.py " + " ".join(args.argv)}
    return result  # run_cli writes it to --json


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--model", default="mid", choices=["mid", "7b"], help="LLM shape (7b: --device cuda only)")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch for the overhead runs (default 4)")
    p.add_argument("--batches", type=int, default=6, help="batches per stage (default 6)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per batch; the median counts")
    p.add_argument("--padding-batch-sizes", type=int, nargs="+", default=[4, 16])
    p.add_argument("--simulate", type=int, default=4096,
                   help="also an epoch of this many records per dataset resampled from the data (0: off)")
    p.add_argument("--real-projectors", action="store_true",
                   help="output projectors at the real size (d_model 512, 4+4 layers) instead of the tiny ones")
    p.add_argument("--toy", action="store_true", help="toy data for every stage (default: samples for stages 1-2)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 dense TFLOP/s for MFU")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--no-modalities", action="store_true",
                   help="stages 1-2 only as configured (no per-modality and suffix-backward-off runs)")
    p.add_argument("--skip-padding", action="store_true")
    p.add_argument("--quick", action="store_true", help="3 batches, 3 repetitions")
    bench_args(p, "pipeline.json", threads=1, threads_help="torch threads on CPU (default 1, see bench_common)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
