"""Evaluation throughput: held-out requests per second through nextgpt.eval (batched greedy generation, signal
scan, alignment), on the mid-size LLM (4 layers, hidden 512; bench_pipeline's) with the toy held-out requests.

    python dev/bench/bench_eval.py                  # CPU, batch 1 and 8
    python dev/bench/bench_eval.py --device cuda    # bf16 (written for a GPU; see README for what has run)

The LLM is random, so a reply runs until "###" or max_new_tokens: tokens/s is reported beside requests/s, and
both runs ask the same requests. Decoding media is not included (that is the diffusion pipelines' own speed).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import bench_args, REPO, machine, print_table, resolve_device, run_cli, set_threads, sync, workspace


def run(args) -> dict:
    import torch

    from bench.bench_pipeline import MID, write_llm
    from nextgpt import config
    from nextgpt.eval import run as evaluation
    from nextgpt.model.nextgpt import build_model

    set_threads(args.threads)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    work = Path(args.workdir)
    env = workspace(work)
    llm = write_llm(work / "llm_mid", env.ckpt / "vicuna", MID)
    overrides = [*env.overrides, f"model.llm={llm}", "data.eval_fraction=0.2",
                 f"inference.max_new_tokens={args.max_new_tokens}"]
    cfg = config.load(REPO / "code" / "config" / "tiny" / "eval.yaml", overrides)
    torch.manual_seed(0)
    model = build_model(cfg, device=device, dtype=dtype).eval()
    sets = evaluation.held_out_datasets(cfg, model.tokenizer, model.token_ids, log=lambda *_: None)
    items = evaluation.build_items(cfg, sets)[:args.requests]
    memo = evaluation.FeatureMemo()                           # input media encoded once, outside the timing
    memo.attach(model)
    evaluation.generate_replies(model, items, cfg, evaluation.Options(batch_size=8, progress=False))
    rows, runs = [], []
    for batch_size in args.batch_sizes:
        options = evaluation.Options(seed=0, batch_size=batch_size, progress=False)
        sync(device)
        start = time.perf_counter()
        replies = evaluation.generate_replies(model, items, cfg, options)
        metrics, _ = evaluation.evaluate_model(model, items, cfg, options, replies=replies)
        sync(device)
        seconds = time.perf_counter() - start
        tokens = sum(len(r.token_ids) for r in replies)
        runs.append({"batch_size": batch_size, "requests": len(items), "seconds": seconds,
                     "requests_per_s": len(items) / seconds, "generated_tokens_per_s": tokens / seconds})
        rows.append([f"eval requests/s, mid LLM, batch {batch_size} ({device.type}, {len(items)} requests)",
                     len(items) / seconds, f"{tokens / seconds:.1f} tokens/s"])
    print_table("Evaluation throughput", ["measure", "value", "generated"], rows)
    result = {"machine": machine(), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
              "max_new_tokens": args.max_new_tokens, "runs": runs}
    return result  # run_cli writes it to --json


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N] (default cpu)")
    p.add_argument("--requests", type=int, default=32, help="held-out requests timed (default 32)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-new-tokens", type=int, default=32)
    bench_args(p, "eval.json", threads=1, threads_help="torch threads on CPU (default 1, see bench_common)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
