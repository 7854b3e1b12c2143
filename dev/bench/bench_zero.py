"""ZeRO-0 (plain data parallel) against ZeRO-2 for the stages that train a few parameters on a frozen LLM.

    python dev/bench/bench_zero.py                      # 2 CPU processes (gloo), mid Llama, stages 1 and 2
    python dev/bench/bench_zero.py --stages 2 --steps 24

Each run is the real `deepspeed code/train.py` launch (`deepspeed.launcher.runner --num_gpus 2`) with
code/dsconfig/cpu.json where only zero_optimization.stage differs, on the mid-size Llama of bench_pipeline (4 layers,
hidden 512, random init) with the output projectors at their real size (stage 2 then trains ~89 M parameters, as
the ~96 M of the real decoders' shapes) and the toy data. The figure is the median samples/s of the logged windows after the
first (train.py's metrics.jsonl; its rates exclude evaluation and checkpoint time), and the CPU seconds of the
whole launch (every rank, start-up included, the same on both sides): on a shared, busy machine the wall-clock rate
swings with the load, the CPU time much less, so the choice goes by CPU time. The runs alternate (0, 2, 0, 2, ...).

Why it matters on GPUs: stages 1-2 train ~4 M / ~96 M parameters. ZeRO-2 partitions their gradients and Adam
states across ranks (a reduce-scatter of the gradients plus an all-gather of the updated parameters each step)
to save memory that is small here (96 M x 16 bytes = 1.5 GB per GPU unpartitioned, beside a 13.5 GB frozen bf16
LLM); ZeRO-0 does one all-reduce and keeps everything local.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import (bench_args, REPO, BenchError, machine, machine_line, peak_rss_of, print_table, run_cli,
                          workspace)
from bench.bench_pipeline import MID, REAL_PROJECTORS, write_llm

STAGES = {1: "stage_1", 2: "stage_2", 3: "stage_3"}


def run_one(env, work: Path, stage: int, zero: int, args, index: int) -> dict:
    from nextgpt.runtime import free_port

    config = json.loads((REPO / "code" / "dsconfig" / "cpu.json").read_text())
    config["zero_optimization"] = {"stage": 0} if zero == 0 else {**config["zero_optimization"], "stage": zero}
    ds_config = work / f"zero{zero}.json"
    ds_config.write_text(json.dumps(config, indent=2))
    output = Path(tempfile.mkdtemp(prefix=f"zero{zero}_s{stage}_", dir=work))
    argv = env.argv(STAGES[stage], f"model.llm={work / 'llm_mid'}", f"train.output_dir={output}",
                    f"train.micro_batch_size={args.micro_batch_size}", f"train.max_steps={args.steps}",
                    f"train.log_every={args.log_every}", "train.save_every=0", "train.init_from=",
                    "train.report_to=[]", *REAL_PROJECTORS)
    launcher_env = {k: v for k, v in os.environ.items()
                    if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    launcher_env["OMP_NUM_THREADS"] = str(args.threads)
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(free_port()), str(REPO / "code" / "train.py"), *argv, "--ds_config", str(ds_config)]
    log = work / f"zero{zero}_stage{stage}_{index}.log"
    run = peak_rss_of(command, env=launcher_env, cwd=REPO, log_path=log, timeout=args.timeout)
    rc = run["returncode"]
    if rc != 0:
        raise BenchError(f"ZeRO-{zero} stage {stage} run exited {rc}; see {log}")
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]       # the first window warms up
    if not rates:
        raise BenchError(f"ZeRO-{zero} stage {stage}: no samples_per_s windows in {output / 'metrics.jsonl'}")
    return dict(stage=stage, zero=zero, samples_per_s=statistics.median(rates), windows=len(rates),
                cpu_s=run["cpu_s"], wall_s=run["seconds"], log=str(log))


def run(args) -> dict:
    work = Path(args.workdir).resolve()
    env = workspace(work / "tiny")
    write_llm(work / "llm_mid", env.ckpt / "vicuna", MID)
    print(machine_line())
    runs = []
    for stage in args.stages:
        for repeat in range(args.repeats):
            for zero in args.zero:
                result = run_one(env, work, stage, zero, args, repeat)
                print(f"stage {stage} ZeRO-{zero}: {result['samples_per_s']:.2f} samples/s, "
                      f"{result['cpu_s']:.0f} CPU s", flush=True)
                runs.append(result)
    rows, summary = [], []
    for stage in args.stages:
        mine = lambda z, key: statistics.median(r[key] for r in runs if r["stage"] == stage and r["zero"] == z)
        rates = {z: mine(z, "samples_per_s") for z in args.zero}
        cpu = {z: mine(z, "cpu_s") for z in args.zero}
        best = min(cpu, key=cpu.get)
        summary.append(dict(stage=stage, samples_per_s=rates, cpu_s=cpu, cheaper=best))
        rows.append([f"stage {stage}", *[rates[z] for z in args.zero], *[cpu[z] for z in args.zero],
                     f"ZeRO-{best}"])
    print_table(f"2 CPU processes (gloo), mid Llama, micro-batch {args.micro_batch_size} per rank, {args.steps} steps, "
                f"median samples/s of the logged windows over {args.repeats} alternating run(s)",
                ["stage", *[f"ZeRO-{z} samples/s" for z in args.zero], *[f"ZeRO-{z} CPU s" for z in args.zero],
                 "fewer CPU s"], rows)
    result = {"machine": machine(), "runs": runs, "summary": summary, "llm_shape": MID,
              "command": "python dev/bench/bench_zero.py " + " ".join(args.argv)}
    return result  # run_cli writes it to --json


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=[1, 2, 3])
    p.add_argument("--zero", type=int, nargs="+", default=[0, 2], choices=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="alternating runs per ZeRO stage (default 1)")
    p.add_argument("--timeout", type=float, default=900)
    bench_args(p, "zero.json", threads=1, threads_help="OMP threads per process (default 1: 2 ranks, 2 cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
