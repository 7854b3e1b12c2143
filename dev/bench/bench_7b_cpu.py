"""Vicuna-7B's exact shape on this CPU: one stage-2 step (suffix backward) and one stage-3 LoRA step through the
real model code, within 24 GiB. A benchmark, not a test: it takes minutes and ~14 GiB; run it alone.

    python dev/bench/bench_7b_cpu.py                      # prints peak RSS, step times, trainable counts; JSON
    python dev/bench/bench_7b_cpu.py --threads 2 --batch-size 2

The LLM is LlamaForCausalLM at Vicuna-7B's shape (hidden 4096, 32 layers, MLP 11008, 32 heads) with the vocabulary
grown by NExT-GPT's 38 tokens (32038 rows), random init, bf16; it is built once and wrapped as each stage wraps it
(llm.wrap_llm: PEFT trainable token rows for stage 2, + LoRA r 32 on q/k/v/o for stage 3; the stage-2 wrapping is
unloaded before stage 3's, so one copy of the weights serves both). NextGPT is the real module (projectors at their
real size: d_model 512, 4+4 layers); set_trainable freezes as the stage YAML says. A step is model(batch) ->
loss.backward() -> torch.optim.AdamW.step() on a real-template batch from the toy data (the tiny tokenizer's ids
fit in the 32038 rows; its captions tokenise longer than Llama's would, so the sequence is if anything longer).
Peak RSS: ru_maxrss of this process after each phase (it only grows).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from bench.common import bench_args, machine, machine_line, print_table, run_cli, set_threads, workspace
from bench.bench_pipeline import MID, REAL_PROJECTORS, STAGES, VICUNA_7B

NEW_TOKENS = 38


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def first_batch(cfg, model, batch_size: int) -> dict:
    from nextgpt.data.dataset import build_loader

    loader, _ = build_loader(cfg, model.tokenizer, model.token_ids)
    return next(iter(loader))


def one_step(model, batch) -> dict:
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    start = time.perf_counter()
    out = model(batch)
    forward = time.perf_counter() - start
    out["loss"].backward()
    backward = time.perf_counter() - start - forward
    optimizer.step()
    total = time.perf_counter() - start
    return dict(forward_s=forward, backward_s=backward, step_s=total, loss=float(out["loss"].detach()),
                terms={k: float(v.detach()) for k, v in out.items() if k != "loss"},
                tokens=int(batch["attention_mask"].sum()), padded_length=int(batch["input_ids"].shape[1]))


def run(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nextgpt.model import llm as llm_utils
    from nextgpt.model.nextgpt import NextGPT, conditioning_shapes, imagebind_dim
    from nextgpt.model.trainable import set_trainable
    from nextgpt.tokens import load_tokenizer

    set_threads(args.threads)
    print(machine_line())
    env = workspace(Path(args.workdir).resolve() / "tiny")
    common = [f"train.micro_batch_size={args.batch_size}", "train.init_from=", "model.max_length=512",
              "model.lora.r=32", "model.lora.alpha=32", *REAL_PROJECTORS]
    configs = {stage: env.config(STAGES[stage], *common) for stage in (2, 3)}
    tokenizer, token_ids = load_tokenizer(configs[2].path(configs[2].model.llm))
    base = VICUNA_7B if args.shape == "7b" else {**MID, "vocab_size": VICUNA_7B["vocab_size"]}
    shape = {**base, "vocab_size": base["vocab_size"] + NEW_TOKENS}
    if max(token_ids.new_token_ids) >= shape["vocab_size"]:
        raise ValueError(f"tokenizer ids up to {max(token_ids.new_token_ids)} do not fit {shape['vocab_size']} rows")
    phases = {"start": rss_gib()}

    start = time.perf_counter()
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    llm = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    build_s = time.perf_counter() - start
    llm_params = sum(p.numel() for p in llm.parameters())
    phases["7B built"] = rss_gib()
    print(f"built the {args.shape}-shaped Llama ({llm_params:,} parameters, bf16) in {build_s:.0f} s; peak RSS "
          f"{phases['7B built']:.1f} GiB", flush=True)

    results = {}
    for stage in (2, 3):
        cfg = configs[stage]
        wrapped = llm_utils.wrap_llm(llm, token_ids, cfg.train.token_rows, cfg.model.lora, "none", False)
        model = NextGPT(cfg, wrapped, tokenizer, token_ids, imagebind_dim(cfg.model.imagebind_preset),
                        conditioning_shapes(cfg))
        model.input_proj.to(torch.bfloat16)
        model.output_proj.to(torch.bfloat16)
        counts = set_trainable(model, cfg)
        model.train()
        batch = first_batch(cfg, model, args.batch_size)
        blocks = {m: [tuple(b) for b in v.tolist()] for m, v in batch["signal_blocks"].items()}
        split = model._split(batch["input_ids"], batch["attention_mask"], batch.get("media_positions"), blocks)
        step = one_step(model, batch)
        phases[f"stage {stage} step"] = rss_gib()
        results[stage] = dict(stage=stage, trainable=counts, suffix_split=split, **step,
                              peak_rss_gib=phases[f"stage {stage} step"])
        print(f"stage {stage}: step {step['step_s']:.1f} s (forward {step['forward_s']:.1f}, backward "
              f"{step['backward_s']:.1f}), {step['tokens']} tokens, loss {step['loss']:.3f}, split {split}, "
              f"trainable {counts['total']:,}, peak RSS {phases[f'stage {stage} step']:.1f} GiB", flush=True)
        model.zero_grad(set_to_none=True)
        llm = wrapped.unload() if llm_utils.is_peft(wrapped) else wrapped       # the bare Llama for the next stage
        del model, wrapped
    rows = [[f"stage {r['stage']}", "suffix backward" if r["suffix_split"] else "full backward",
             f"{r['tokens']} / {r['padded_length']}", r["forward_s"], r["backward_s"], r["step_s"],
             f"{r['trainable']['total']:,}", r["peak_rss_gib"]] for r in results.values()]
    print_table(f"{'Vicuna-7B' if args.shape == '7b' else 'mid'} shape (vocab {shape['vocab_size']}, bf16, random "
                f"init) on this CPU, micro-batch "
                f"{args.batch_size}, {args.threads} thread(s)",
                ["stage", "path", "tokens / padded", "forward s", "backward s", "step s", "trainable",
                 "peak RSS GiB"], rows)
    result = {"machine": machine(), "llm_shape": shape, "llm_params": llm_params, "build_s": build_s,
              "peak_rss_gib": rss_gib(), "phases_peak_rss_gib": phases, "stages": list(results.values()),
              "command": "python dev/bench/bench_7b_cpu.py " + " ".join(args.argv)}
    return result  # run_cli writes it to --json


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--shape", default="7b", choices=["7b", "mid"], help="mid: a seconds-long wiring check")
    bench_args(p, "7b_cpu.json", threads=2, threads_help="torch threads (default 2: run it alone)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
