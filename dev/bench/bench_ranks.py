"""Many ranks, any batch: 2 ranks / 1 rank samples/s on heterogeneous batches beside the machine's own 2-process
scaling, ZeRO-0 against ZeRO-2 for stages 1-2 on those batches, and the cost on a homogeneous batch of what makes
any batch on any rank work (NextGPT.unused_here). One run, side by side (< 3 min).

    python dev/bench/bench_ranks.py                    # 2 CPU cores: tiny models, toy data
    python dev/bench/bench_ranks.py --steps 12 --repeats 3

Two launches of this script as a worker, `deepspeed --num_gpus 1` and `--num_gpus 2` (CPU, gloo), each one warm
process per rank that measures every case in turn with the parts train.py uses (build_model, set_trainable,
build_run_data, build_engine on code/dsconfig/cpu.json with zero_optimization.stage set), so start-up is in no
figure. A case times `--steps` optimizer steps (engine forward, backward, step) after one warm-up step, between
barriers: seconds per step of the slowest rank. Heterogeneous batches: data.mixture=mixed over stage 1's three
X->caption sets, stage 2's three caption->X sets (each micro-batch its own mix of output modalities) and stage 3's
MosIT + LLaVA + Alpaca (text-only micro-batches among them). The machine's own scaling ("bare"): the same stage's
model forward + backward on the same micro-batches with no DeepSpeed and no collective, each rank on its own, in 1
and 2 processes. The mechanism's cost: stage 2 on cc3m_dec only (every rank's micro-batch is image-only, so the
video and audio projectors are unused everywhere and the run is valid without the mechanism), alternating,
`--repeats` times each: `shipped` (one all-reduce of a flag per module per micro-batch; nothing runs on nothing
here), `off` (takes_part returns False: no all-reduce), `forced` (as if another rank used every module: the two
unused projectors run on empty batches in every micro-batch, the cost a heterogeneous step pays at most).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, BenchError, bench_args, machine, machine_line, median, print_table, run_cli, workspace

MIXED = {"stage_1": "data.datasets=[cc3m_enc,webvid_enc,audiocap_enc]",
         "stage_2": "data.datasets=[cc3m_dec,webvid_dec,audiocap_dec]",
         "stage_3": "data.datasets=[mosit_instruction,llava_instruction,alpaca_instruction]"}
HOMOGENEOUS = "data.datasets=[cc3m_dec]"
VARIANTS = ("shipped", "off", "forced")       # of the mechanism, on the homogeneous batch


def cases(world_size: int, repeats: int) -> list[dict]:
    """What a worker measures: {name, stage, datasets, zero | bare, variant}."""
    out = [dict(name=f"{stage} mixed ZeRO-2", stage=stage, datasets=MIXED[stage], zero=2) for stage in MIXED]
    out += [dict(name=f"{stage} mixed bare", stage=stage, datasets=MIXED[stage], bare=True) for stage in MIXED]
    if world_size > 1:
        out += [dict(name=f"{stage} mixed ZeRO-0", stage=stage, datasets=MIXED[stage], zero=0)
                for stage in ("stage_1", "stage_2")]
        for repeat in range(repeats):
            for variant in VARIANTS:
                out.append(dict(name=f"stage_2 cc3m_dec {variant}", stage="stage_2", datasets=HOMOGENEOUS, zero=2,
                                variant=variant, repeat=repeat))
    return out


# ---------------------------------------------------------------------------------------------------- the worker
def measure(env, case: dict, rt, args) -> float:
    """Seconds per optimizer step (the slowest rank's) of one case."""
    import torch

    from nextgpt import runtime
    from nextgpt.data.loaders import build_run_data
    from nextgpt.training.deepspeed import build_ds_config, build_engine, param_groups
    from nextgpt.model import nextgpt
    from nextgpt.model.nextgpt import build_model
    from nextgpt.model.trainable import set_trainable

    cfg = env.config(case["stage"], case["datasets"], "data.mixture=mixed", "train.init_from=",
                     f"train.micro_batch_size={args.micro_batch_size}", "train.report_to=[]")
    runtime.seed_everything(cfg.train.seed)
    model = build_model(cfg, device=rt.device, dtype=rt.dtype)
    set_trainable(model, cfg)
    loader = build_run_data(cfg, model.tokenizer, model.token_ids, rt.rank, rt.world_size, lambda *_: None)[0]
    # read before timing (the figures are the step, not the data loading); a new pass moves the sampler to the
    # next epoch's plan when one epoch holds fewer micro-batches than needed
    epochs = itertools.chain.from_iterable(loader for _ in range(args.steps + 1))
    batches = [runtime.to_device(b, rt.device) for b in itertools.islice(epochs, args.steps + 1)]
    shipped = nextgpt.takes_part, runtime.any_rank_each
    if case.get("variant") == "off":
        nextgpt.takes_part = lambda module: False
    elif case.get("variant") == "forced":
        runtime.any_rank_each = lambda flags, device: [True] * len(flags)
    try:
        if case.get("bare"):
            def step(batch):
                model(batch)["loss"].backward()
                model.zero_grad(set_to_none=True)
        else:
            path = REPO / "code" / "dsconfig" / "cpu.json"
            ds_file = runtime.load_ds_config(path, cfg, rt.world_size)
            ds_file["zero_optimization"] = ({"stage": 0} if case["zero"] == 0 else
                                            {**ds_file["zero_optimization"], "stage": case["zero"]})
            params = param_groups(model, cfg)
            ds_config = build_ds_config(ds_file, cfg, rt.world_size, args.steps + 1, params, path)
            engine = build_engine(model, cfg, ds_config, params)

            def step(batch):
                engine.backward(engine(batch)["loss"])
                engine.step()
        step(batches[0])                                   # warm-up: allocator, first-call costs
        runtime.barrier()
        start = time.perf_counter()
        for batch in batches[1:]:
            step(batch)
        runtime.barrier()                                  # bare: the ranks still ran side by side, unsynchronised
        seconds = (time.perf_counter() - start) / args.steps
    finally:
        nextgpt.takes_part, runtime.any_rank_each = shipped
    slowest = torch.tensor([seconds], dtype=torch.float64)
    if torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
    del model, loader, batches
    gc.collect()
    return float(slowest)


def flag_exchange(rt, calls: int = 200) -> float:
    """Seconds per call of the all-reduce NextGPT.unused_here makes in each training micro-batch (4 flags: input_proj
    and three projectors), between barriers: the shipped mechanism's whole cost on a homogeneous batch, measured
    apart from the step because the step's own noise on a shared machine is larger than it."""
    from nextgpt import runtime

    runtime.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        runtime.any_rank_each([True, False, True, False], rt.device)
    runtime.barrier()
    return (time.perf_counter() - start) / calls


def worker(args) -> None:
    import torch

    from nextgpt import runtime

    torch.set_num_threads(args.threads)
    env = workspace(Path(args.env))
    path = REPO / "code" / "dsconfig" / "cpu.json"
    rt = runtime.setup(json.loads(path.read_text()), path, None)
    try:
        results = []
        for case in cases(rt.world_size, args.repeats):
            seconds = measure(env, case, rt, args)
            results.append({**case, "seconds_per_step": seconds,
                            "samples_per_s": args.micro_batch_size * rt.world_size / seconds})
            if rt.is_main:
                print(f"{rt.world_size} rank(s) {case['name']}: {seconds * 1000:.0f} ms/step", flush=True)
        if rt.world_size > 1:
            results.append({"name": "flag all-reduce", "seconds_per_call": flag_exchange(rt)})
        if rt.is_main:
            Path(args.out).write_text(json.dumps(results, indent=2))
    finally:
        runtime.shutdown(rt)


# ---------------------------------------------------------------------------------------------------- the parent
def launch(world_size: int, env_root: Path, out: Path, args) -> list[dict]:
    from nextgpt.runtime import free_port

    launcher_env = {k: v for k, v in os.environ.items()
                    if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    launcher_env["OMP_NUM_THREADS"] = str(args.threads)
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world_size), "--master_port",
               str(free_port()), str(Path(__file__).resolve()), "--worker", "--env", str(env_root), "--out", str(out),
               "--steps", str(args.steps), "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--micro-batch-size", str(args.micro_batch_size)]
    log = out.with_suffix(".log")
    with open(log, "w") as handle:
        rc = subprocess.run(command, cwd=REPO, env=launcher_env, stdout=handle, stderr=subprocess.STDOUT,
                            timeout=args.timeout).returncode
    if rc != 0:
        raise BenchError(f"the {world_size}-rank worker exited {rc}; see {log}")
    print(f"{world_size}-rank worker done ({log})", flush=True)
    return json.loads(out.read_text())


def run(args) -> dict:
    if args.quick:
        args.steps, args.repeats = 4, 1
    if args.worker:
        worker(args)
        return None
    work = Path(args.workdir).resolve()
    env_root = work / "tiny"
    workspace(env_root)
    print(machine_line())
    started = time.perf_counter()
    one = {r["name"]: r for r in launch(1, env_root, work / "ranks_1.json", args)}
    two: dict[str, list[dict]] = {}
    for r in launch(2, env_root, work / "ranks_2.json", args):
        two.setdefault(r["name"], []).append(r)
    rate = lambda results: median([r["samples_per_s"] for r in results])

    scaling = []
    for stage in MIXED:
        trained = rate(two[f"{stage} mixed ZeRO-2"]) / one[f"{stage} mixed ZeRO-2"]["samples_per_s"]
        bare = rate(two[f"{stage} mixed bare"]) / one[f"{stage} mixed bare"]["samples_per_s"]
        scaling.append(dict(stage=stage, ratio=trained, bare_ratio=bare, kept=trained / bare,
                            one_rank=one[f"{stage} mixed ZeRO-2"]["samples_per_s"],
                            two_ranks=rate(two[f"{stage} mixed ZeRO-2"])))
    print_table(f"2 ranks / 1 rank samples/s, heterogeneous micro-batches (data.mixture=mixed), micro-batch "
                f"{args.micro_batch_size} per rank, ZeRO-2 (cpu.json); bare = the same forward + backward with no "
                "DeepSpeed: the machine's own 2-process scaling",
                ["stage", "1 rank samples/s", "2 ranks samples/s", "2/1", "bare 2/1", "kept (2/1 / bare)"],
                [[s["stage"], s["one_rank"], s["two_ranks"], s["ratio"], s["bare_ratio"], s["kept"]]
                 for s in scaling])

    zero = []
    for stage in ("stage_1", "stage_2"):
        z0, z2 = rate(two[f"{stage} mixed ZeRO-0"]), rate(two[f"{stage} mixed ZeRO-2"])
        zero.append(dict(stage=stage, zero0=z0, zero2=z2, ratio=z0 / z2))
    print_table("ZeRO-0 (plain data parallel) vs ZeRO-2, 2 ranks, heterogeneous micro-batches",
                ["stage", "ZeRO-0 samples/s", "ZeRO-2 samples/s", "ZeRO-0 / ZeRO-2"],
                [[z["stage"], z["zero0"], z["zero2"], z["ratio"]] for z in zero])

    seconds = {v: [r["seconds_per_step"] for r in two[f"stage_2 cc3m_dec {v}"]] for v in VARIANTS}
    cost = {v: dict(ms=median(seconds[v]) * 1000, per_repeat_ms=[x * 1000 for x in seconds[v]],
                    overhead=median(seconds[v]) / median(seconds["off"]) - 1,
                    per_repeat=[a / b - 1 for a, b in zip(seconds[v], seconds["off"])]) for v in VARIANTS}
    exchange = two["flag all-reduce"][0]["seconds_per_call"]
    step = median(seconds["off"])
    cost["exchange"] = dict(ms=exchange * 1000, share_of_step=exchange / step)
    print_table(f"The mechanism on a homogeneous batch (stage 2, cc3m_dec only), 2 ranks, ZeRO-2, {args.repeats} "
                f"alternating repeat(s) of {args.steps} steps; overhead against `off`",
                ["variant", "ms/step (median)", "per repeat", "overhead", "per repeat "],
                [[v, cost[v]["ms"], " ".join(f"{x:.0f}" for x in cost[v]["per_repeat_ms"]),
                  f"{cost[v]['overhead'] * 100:+.1f}%", " ".join(f"{x * 100:+.1f}%" for x in cost[v]["per_repeat"])]
                 for v in VARIANTS])
    print(f"shipped, measured apart: its one flag all-reduce per micro-batch takes {exchange * 1000:.3f} ms, "
          f"{cost['exchange']['share_of_step'] * 100:.2f}% of the `off` step ({step * 1000:.0f} ms)")
    print(f"\nbench_ranks: {time.perf_counter() - started:.0f} s")
    return {"machine": machine(), "scaling": scaling, "zero": zero, "mechanism": cost,
            "one_rank": list(one.values()), "two_ranks": [r for rs in two.values() for r in rs],
            "command": "python dev/bench/bench_ranks.py " + " ".join(args.argv)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per case (default 8)")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each mechanism variant (default 2)")
    p.add_argument("--quick", action="store_true", help="4 steps, 1 repeat (make bench --quick)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--env", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)      # the deepspeed launcher passes it
    bench_args(p, "ranks.json", threads=1, threads_help="torch threads per process (default 1: 2 ranks, 2 cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
