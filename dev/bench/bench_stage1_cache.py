"""Stage 1 with the ImageBind feature cache vs live ImageBind encoding: samples/s and peak resident memory.

    python dev/bench/bench_stage1_cache.py              # tiny and mid ImageBind presets, cache vs live, CPU
    python dev/bench/bench_stage1_cache.py --quick      # fewer steps

Each run is a real `code/train.py` process on the tiny stage-1 config (tiny Vicuna, train.micro_batch_size 4),
reading the NExT-GPT sample records and media (../shared/samples/nextgpt; toy data when absent):
  cache  data.feature_dir holds the features `process_embeddings.py --features` wrote: ImageBind is never loaded
  live   data.feature_dir is empty: the model loads ImageBind on the first batch and decodes + encodes every
         medium of every batch
samples/s = samples / time over steps 2..K from the run's metrics.jsonl (step 1 carries the one-time ImageBind
load of the live runs and is left out; K-1 is a whole number of image/video/audio rounds; cache runs take 3x as
many steps, which last milliseconds). Peak RSS = ru_maxrss
of the training process (os.wait4, what `/usr/bin/time -v` reports as "Maximum resident set size").

Presets: "tiny" (the parity-fixture sizes, 16-d output) and "mid", defined here (ViT-S-like towers: vision and
audio 384 wide, 6 blocks, 6 heads; 1024-d output as the real one) and registered in
nextgpt.imagebind.model.PRESETS inside each child process, with a random-init checkpoint written once.
ImageBind-huge (1.2 B parameters, 32-block 1280-wide vision tower) is not run on this CPU: a live stage-1 step
would take minutes per video batch; its weights alone are 2.4 GB in bf16 (4.8 GB fp32) of resident memory that
the cache run never holds.
"""

from __future__ import annotations

import argparse
import json
import runpy
import shutil
import sys
from pathlib import Path

from bench.common import (REPO, SAMPLES, BenchError, bench_args, machine, machine_line, peak_rss_of, print_table,
                          run_cli, set_threads, workspace)

MID_PRESET_NAME = "bench_mid"


def mid_preset() -> dict:
    from nextgpt.imagebind.model import preset

    tiny = preset("tiny")
    return {**tiny, "out_embed_dim": 1024,
            "vision_embed_dim": 384, "vision_num_blocks": 6, "vision_num_heads": 6,
            "audio_embed_dim": 384, "audio_num_blocks": 6, "audio_num_heads": 6,
            "text_embed_dim": 64, "text_num_blocks": 1, "text_num_heads": 2}


def child(argv: list[str]) -> int:
    """`--child NAME CONFIG_JSON SCRIPT ARGS...`: register preset NAME, then run SCRIPT as __main__."""
    name, config_json, script, *rest = argv
    from nextgpt.imagebind import model as imagebind_model

    if name != "none":
        imagebind_model.PRESETS[name] = json.loads(config_json)
    sys.argv = [script, *rest]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def write_checkpoint(path: Path, config: dict) -> Path:
    import io

    import torch

    from nextgpt.imagebind.model import ImageBindModel
    from nextgpt.io import atomic_write_bytes

    if path.is_file():
        return path
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(ImageBindModel(**config).state_dict(), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def child_command(preset_name: str, config: dict | None, script: str, args: list[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", preset_name if config else "none",
            json.dumps(config or {}), str(REPO / script), *args]


def step_rates(metrics: Path, first: int) -> tuple[float, int, int]:
    """(samples/s over steps >= first, steps, samples) from a train.py metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split") == "train" and r["step"] >= first]
    if not rows:
        raise BenchError(f"{metrics}: no training steps >= {first} logged")
    # samples_per_s of a step = its samples / its seconds; the batch size is the same for every step
    seconds = sum(1.0 / r["samples_per_s"] for r in rows)
    return len(rows) / seconds, len(rows), len(rows)


def run(args) -> dict:
    if args.quick:
        args.steps = min(args.steps, 4)
    set_threads(args.threads)                  # also OMP_NUM_THREADS of the training processes
    work = Path(args.workdir).resolve()
    env = workspace(work / "tiny")
    data_root = SAMPLES if SAMPLES.is_dir() and not args.toy else env.data
    presets = {"tiny": (env.imagebind, None)}
    if "mid" in args.presets:
        config = mid_preset()
        presets["mid"] = (write_checkpoint(work / "imagebind_bench_mid.pth", config), config)
    print(machine_line())
    results = []
    for preset_label in args.presets:
        checkpoint, config = presets[preset_label]
        preset_name = MID_PRESET_NAME if config else "tiny"
        feature_dir = work / f"stage1_features_{preset_label}_{'samples' if data_root == SAMPLES else 'toy'}"
        common = [f"data.root={data_root}", f"model.imagebind={checkpoint}", f"model.imagebind_preset={preset_name}",
                  f"train.micro_batch_size={args.batch_size}", "train.save_every=0", "train.report_to=[]"]
        # The cache: the real command (`make features`), once per preset; finished items are skipped later.
        features = peak_rss_of(child_command(preset_name, config, "code/process_embeddings.py",
                                             [*env.argv("stage_1", *common, f"data.feature_dir={feature_dir}"),
                                              "--all", "--features"]),
                               log_path=work / f"features_{preset_label}.log")
        if features["returncode"] != 0:
            raise BenchError(f"process_embeddings --features ({preset_label}) failed; see "
                             f"{work / f'features_{preset_label}.log'}")
        for mode in ("cache", "live"):
            out = work / f"stage1_{preset_label}_{mode}"
            shutil.rmtree(out, ignore_errors=True)
            empty = work / "no_features"
            empty.mkdir(exist_ok=True)
            overrides = [*common, f"data.feature_dir={feature_dir if mode == 'cache' else empty}",
                         f"train.output_dir={out}"]
            log_path = work / f"stage1_{preset_label}_{mode}.log"
            # Cache steps take milliseconds: more of them for a stable rate (the process start dominates anyway).
            steps = args.steps if mode == "live" else 1 + 3 * (args.steps - 1)
            measured = peak_rss_of(child_command(preset_name, config, "code/train.py",
                                                 [*env.argv("stage_1", *overrides), "--max-steps", str(steps),
                                                  "--resume", "none"]),
                                   log_path=log_path)
            if measured["returncode"] != 0:
                raise BenchError(f"train.py stage 1 ({preset_label}, {mode}) exited {measured['returncode']}; see "
                                 f"{log_path}")
            rate, timed, _ = step_rates(out / "metrics.jsonl", 2)
            results.append(dict(preset=preset_label, mode=mode, samples_per_s=rate * args.batch_size,
                                timed_steps=timed, peak_rss_bytes=measured["peak_rss_bytes"],
                                process_seconds=measured["seconds"], log=str(log_path)))
    rows = []
    for r in results:
        live = next((x for x in results if x["preset"] == r["preset"] and x["mode"] == "live"), None)
        speedup = r["samples_per_s"] / live["samples_per_s"] if live else float("nan")
        rows.append([r["preset"], r["mode"], r["samples_per_s"], speedup, r["peak_rss_bytes"] / 2**20,
                     r["process_seconds"]])
    print_table(f"Stage 1: ImageBind feature cache vs live encoding (train.py, tiny Vicuna, batch {args.batch_size}, "
                f"steps 2..{args.steps} live / 2..{1 + 3 * (args.steps - 1)} cache, "
                f"data {'samples' if data_root == SAMPLES else 'toy'}, {args.threads} torch thread(s))",
                ["preset", "mode", "samples/s", "x live", "peak RSS MiB", "process s"], rows)
    result = dict(machine=machine(), data=str(data_root), batch_size=args.batch_size, steps=args.steps,
                  presets={"mid": mid_preset()} if "mid" in args.presets else {}, runs=results,
                  command="python dev/bench/bench_stage1_cache.py " + " ".join(args.argv))
    return result  # run_cli writes it to --json


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    p.add_argument("--steps", type=int, default=10, help="steps per run; 2..K are timed (default 10: three rounds)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--toy", action="store_true", help="toy data instead of the NExT-GPT samples")
    p.add_argument("--quick", action="store_true", help="4 steps (one round timed)")
    bench_args(p, "stage1_cache.json", threads=1, threads_help="torch threads on CPU (default 1, see bench_common)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    return run_cli(parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
