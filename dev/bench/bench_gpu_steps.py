"""7B-shaped NExT-GPT training steps through deepspeed.initialize: tokens/s, samples/s, MFU, peak memory per stage.

    python dev/bench/bench_gpu_steps.py --json runs/gpu_check/steps.json                  # one GPU (bf16)
    deepspeed --num_gpus 2 dev/bench/bench_gpu_steps.py --stages 2 --equality --json ...  # 2 ranks: identical weights
    python dev/bench/bench_gpu_steps.py --device cpu --shape mid --stages 1 2 3 --steps 2  # dry run of the same code
    python dev/bench/bench_gpu_steps.py --device cpu --shape mid --stages 2 --denoising    # + gen_<modality> terms

The model is build_7b of bench_pipeline (Vicuna-7B's shape, random init, the tiny tokenizer's ids, NExT-GPT's
projectors at their real size) around the real NextGPT; the engine is nextgpt.training.deepspeed.build_engine with the stage's
DeepSpeed JSON (code/dsconfig/stage_<N>.json, "auto" filled from the stage YAML) -- the objects train.py builds;
each step is engine(batch) -> engine.backward(loss) -> engine.step() on batches from the real loader (toy data,
the tiny tokenizer). Timing: the median of --steps steps after --warmup, synchronised.

MFU = 4·N·tokens/s / peak (N: LLM parameters without the input embedding; the 4N convention of a full backward,
so a stage-2 step that runs suffix backward can exceed the hardware's real utilisation); "run FLOPs share" is
what suffix backward actually runs of that 4N (bench_pipeline.flop_share). With --equality on 2+ ranks, every
rank's trainable weights after the steps must be bit-identical (sha256 over the trainable tensors).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path

from bench.common import bench_args, REPO, BenchError, machine, print_table, run_cli, workspace
from bench.bench_pipeline import (MID, REAL_PROJECTORS, STAGES, VICUNA_7B, build_7b, flop_share, llm_flop_params,
                            peak_tflops)

SHAPES = {"7b": VICUNA_7B, "mid": {**MID, "vocab_size": 32000}}


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def stage_run(env, work: Path, stage: int, args, rt) -> dict:
    import torch

    from nextgpt import runtime
    from nextgpt.data.dataset import build_loader
    from nextgpt.model.trainable import set_trainable

    overrides = [f"train.micro_batch_size={args.batch_size}", "train.init_from=", "model.max_length=512",
                 f"train.max_steps={args.warmup + args.steps}", *REAL_PROJECTORS]
    cfg = env.config(STAGES[stage], *overrides)
    if args.denoising:      # the stage's terms + every denoising term through the workspace's decoders
        weights = {**cfg.train.loss_weights, "gen_image": 1.0, "gen_video": 1.0, "gen_audio": 1.0}
        cfg = env.config(STAGES[stage], *overrides, "train.loss_weights={" +
                         ", ".join(f"{k}: {v}" for k, v in weights.items()) + "}")
    ds_path = Path(args.ds_config or REPO / "code" / "dsconfig" / (f"stage_{stage}.json" if rt.device.type == "cuda"
                                                                   else "cpu.json"))
    ds = runtime.load_ds_config(ds_path, cfg, rt.world_size)
    torch.manual_seed(0)
    model, _ = build_7b(cfg, rt.device, rt.dtype, SHAPES[args.shape], with_bare=False)
    counts = set_trainable(model, cfg)
    from nextgpt.model import denoising
    from nextgpt.training.deepspeed import build_ds_config, build_engine, param_groups

    decoder_losses = denoising.build(cfg, rt.device, rt.dtype)

    params = param_groups(model, cfg)
    engine = build_engine(model, cfg, build_ds_config(ds, cfg, rt.world_size, args.warmup + args.steps, params,
                                                      ds_path), params)
    loader, _ = build_loader(cfg, model.tokenizer, model.token_ids, rank=rt.rank, world_size=rt.world_size,
                             pin_memory=rt.device.type == "cuda")
    batches = []
    for batch in loader:
        batches.append(runtime.to_device(batch, rt.device))
        if len(batches) == args.warmup + args.steps:
            break
    while len(batches) < args.warmup + args.steps:       # a small toy dataset: cycle it
        batches.append(batches[len(batches) % max(1, len(batches))])
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    times, tokens, samples, shares, losses = [], [], [], [], []
    without: list[float] = []      # --denoising: the same batch's step without the terms, right before (A/B)

    def timed_step(batch):
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        start = time.perf_counter()
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        return out, time.perf_counter() - start

    for i, batch in enumerate(batches):
        if decoder_losses is not None:
            model.denoising = None
            _, seconds = timed_step(batch)
            if i >= args.warmup:
                without.append(seconds)
            model.denoising = decoder_losses
        out, seconds = timed_step(batch)
        if i >= args.warmup:
            times.append(seconds)
            tokens.append(int(batch["attention_mask"].sum()))
            samples.append(batch["input_ids"].shape[0])
            shares.append(flop_share(model, batch))
            losses.append(float(out["loss"].detach()))
    step = statistics.median(times)
    n = llm_flop_params(model)
    tokens_per_s = statistics.mean(tokens) / step
    peak = peak_tflops(rt.device, args.peak_tflops)
    result = dict(stage=stage, shape=args.shape, world_size=rt.world_size, batch_size=args.batch_size,
                  denoising=sorted(decoder_losses.losses) if decoder_losses is not None else [],
                  step_ms_without_denoising=1000 * statistics.median(without) if without else None,
                  step_ratios=[a / b for a, b in zip(times, without)],
                  zero=engine.zero_optimization_stage(), step_ms=1000 * step, tokens_per_s_per_gpu=tokens_per_s,
                  samples_per_s_per_gpu=statistics.mean(samples) / step, flop_params=n,
                  model_tflops=4 * n * tokens_per_s / 1e12, mfu_4n=4 * n * tokens_per_s / (peak * 1e12) if peak else None,
                  run_flops_share=statistics.mean(shares), trainable=counts["total"], losses=losses,
                  peak_allocated_gib=torch.cuda.max_memory_allocated(rt.device) / 2**30
                  if rt.device.type == "cuda" else None, ds_config=str(ds_path))
    if args.equality and rt.world_size > 1:
        import torch.distributed as dist

        mine = weights_digest(model)
        digests = [None] * rt.world_size
        dist.all_gather_object(digests, mine)
        result["ranks_identical"] = len(set(digests)) == 1
    del engine, model
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run(args) -> dict:
    import json

    from nextgpt import runtime

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BenchError("--device cuda: no CUDA device here (use --device cpu --shape mid for a dry run)")
        ds_probe = {"bf16": {"enabled": True}}
    else:
        ds_probe = json.loads((REPO / "code" / "dsconfig" / "cpu.json").read_text())
    rt = runtime.setup(ds_probe, "bench_gpu_steps", verbose=False)
    try:
        env = workspace(Path(args.workdir).resolve() / "tiny", log=print if rt.is_main else (lambda m: None))
        results = [stage_run(env, Path(args.workdir), stage, args, rt) for stage in args.stages]
    finally:
        runtime.shutdown(rt)
    if not rt.is_main:
        return {}
    rows = [[f"stage {r['stage']}" + (" + denoising" if r["denoising"] else ""), f"ZeRO-{r['zero']}", r["step_ms"],
             r["tokens_per_s_per_gpu"],
             r["samples_per_s_per_gpu"], r["mfu_4n"] if r["mfu_4n"] is not None else float("nan"),
             r["run_flops_share"], r["peak_allocated_gib"] or float("nan"), r.get("ranks_identical", "")]
            for r in results]
    print_table(f"{args.shape}-shaped NExT-GPT steps through deepspeed.initialize ({rt.device.type}, "
                f"{str(rt.dtype).removeprefix('torch.')}, {rt.world_size} rank(s), micro-batch {args.batch_size})",
                ["stage", "ZeRO", "step ms", "tokens/s/GPU", "samples/s/GPU", "MFU (4N)", "run FLOPs share",
                 "peak GiB", "ranks identical"], rows)
    for r in results:
        if r["step_ms_without_denoising"]:
            ratios = sorted(r["step_ratios"])
            print(f"stage {r['stage']}: {r['step_ms_without_denoising']:.0f} ms without the denoising terms, "
                  f"{r['step_ms']:.0f} ms with them ({', '.join(r['denoising'])}); per-step ratio median "
                  f"{statistics.median(ratios):.2f} (range {ratios[0]:.2f}-{ratios[-1]:.2f})")
    result = {"machine": machine(), "device": str(rt.device), "runs": results,
              "command": "python dev/bench/bench_gpu_steps.py " + " ".join(args.argv)}
    return result  # run_cli writes it to --json


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch per GPU (default 8)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ds_config", help="DeepSpeed JSON for every stage (default: the stage's; cpu.json on CPU)")
    p.add_argument("--denoising", action="store_true",
                   help="add every gen_<modality> term (model/denoising.py) through the workspace's decoders; each "
                        "step is also timed without them on the same batch just before (A/B, same engine)")
    p.add_argument("--equality", action="store_true", help="with 2+ ranks: trainable weights identical on all ranks")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)      # deepspeed launcher
    bench_args(p, None, threads=None)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
