"""Every benchmark, one summary table, runs/bench/results.json (`make bench`).

    python dev/bench/bench_all.py              # a few minutes on 2 CPU cores
    python dev/bench/bench_all.py --quick      # fewer repetitions / steps
    python dev/bench/bench_all.py --only pipeline embeddings

Runs, each in its own process (each prints its own table):
  pipeline     dev/bench/bench_pipeline.py      NExT-GPT step / bare Llama fwd+bwd (target <= 1.10); padding efficiency
                                              with length grouping (target >= 0.90)
  embeddings   dev/bench/bench_embeddings.py    process_embeddings / bare text-encoder forward (target >= 0.90)
  stage1       dev/bench/bench_stage1_cache.py  stage 1 with the ImageBind feature cache vs live encoding
  encoder      dev/bench/bench_encoder.py       ImageBind media throughput (the ImageBind engineer's script)
  ranks        dev/bench/bench_ranks.py         2 / 1 ranks samples/s on heterogeneous batches beside the bare
                                              2-process scaling, ZeRO-0 vs ZeRO-2 (stages 1-2), the any-batch
                                              mechanism's cost on a homogeneous batch (target <= 1%)
  eval         dev/bench/bench_eval.py          held-out evaluation requests/s on the mid LLM (batch 1 and 8)
  store        dev/bench/bench_store.py         shard store vs files (files, bytes, reads per 100 k items), 2- vs
                                              1-process precompute, online vs precomputed caption embeddings
  tars         dev/bench/bench_tars.py          media read from webdataset tar shards vs files: features items/s
                                              (1 and 2 processes beside the bare scaling), the shard index (build
                                              s / 10 k members, bytes / member), peak RSS over a shard set
and, when a CUDA device is present, the GPU variants: bench_pipeline --device cuda --model 7b (tokens/s, MFU) and
bench_embeddings --device cuda --encoder clip-l. Without a GPU they are listed as not run.
Exit status 1 when a benchmark failed to run (a missed target is reported, not an error).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, machine, machine_line, print_table, verdict, write_json

OUT = REPO / "runs" / "bench"


def jobs(quick: bool, cuda: bool) -> list[tuple[str, list[str], Path]]:
    q = ["--quick"] if quick else []
    out = [
        ("pipeline", ["dev/bench/bench_pipeline.py", *q, "--json", str(OUT / "pipeline.json")], OUT / "pipeline.json"),
        ("embeddings", ["dev/bench/bench_embeddings.py", *q, "--json", str(OUT / "embeddings.json")],
         OUT / "embeddings.json"),
        ("stage1", ["dev/bench/bench_stage1_cache.py", *q, "--json", str(OUT / "stage1_cache.json")],
         OUT / "stage1_cache.json"),
        ("encoder", ["dev/bench/bench_encoder.py", "--count", "2" if quick else "4", "--device", "cpu",
                     "--json", str(OUT / "encoder.json")], OUT / "encoder.json"),
        ("ranks", ["dev/bench/bench_ranks.py", *q, "--json", str(OUT / "ranks.json")], OUT / "ranks.json"),
        ("eval", ["dev/bench/bench_eval.py", "--requests", "16" if quick else "32", "--json", str(OUT / "eval.json")],
         OUT / "eval.json"),
        ("store", ["dev/bench/bench_store.py", *q, "--json", str(OUT / "store.json")], OUT / "store.json"),
        ("tars", ["dev/bench/bench_tars.py", *q, "--json", str(OUT / "tars.json")], OUT / "tars.json"),
    ]
    if cuda:
        out += [
            ("pipeline_cuda", ["dev/bench/bench_pipeline.py", "--device", "cuda", "--model", "7b", "--skip-padding",
                               "--json", str(OUT / "pipeline_cuda.json")], OUT / "pipeline_cuda.json"),
            ("embeddings_cuda", ["dev/bench/bench_embeddings.py", "--device", "cuda", "--encoder", "clip-l",
                                 "--count", "2048", "--batch-size", "128", "--json", str(OUT / "embeddings_cuda.json")],
             OUT / "embeddings_cuda.json"),
            ("encoder_cuda", ["dev/bench/bench_encoder.py", "--device", "cuda", "--preset", "huge", "--count", "8",
                              "--json", str(OUT / "encoder_cuda.json")], OUT / "encoder_cuda.json"),
        ]
    return out


def summary_rows(results: dict) -> list[list]:
    rows = []
    pipeline = results.get("pipeline")
    if pipeline:
        for r in pipeline["overhead"]:        # step / bare 4N fwd+bwd, with the FLOP limit of what suffix backward runs
            target = r.get("target")
            rows.append([f"pipeline {r.get('label', 'stage %d' % r['stage'])} / bare 4N ({r['data']}, B "
                         f"{r['batch_size']}; FLOP limit {r.get('flop_limit', 1.0):.2f}, saved "
                         f"{r.get('saved_activation_mib', 0):.0f} MiB)", r["overhead"],
                         f"<= {target}" if target else "", verdict(r["overhead"], target, False) if target else ""])
        for r in pipeline["padding"]:
            if "resampled" in r["data"] or r["data"] == "toy":
                rows.append([f"padding efficiency, stage {r['stage']} grouped ({r['data']}, B {r['batch_size']})",
                             r["group_by_length"], f">= {pipeline['padding_target']}",
                             verdict(r["group_by_length"], pipeline["padding_target"], True)])
    for key, label in (("pipeline_cuda", "7B cuda"),):
        cuda = results.get(key)
        if cuda:
            for r in cuda["overhead"]:
                target = r.get("target")
                rows.append([f"{label} {r.get('label', 'stage %d' % r['stage'])}: overhead", r["overhead"],
                             f"<= {target}" if target else "", verdict(r["overhead"], target, False) if target else ""])
                rows.append([f"{label} stage {r['stage']}: tokens/s", r["tokens_per_s"], "", ""])
                if r.get("mfu") is not None:
                    rows.append([f"{label} stage {r['stage']}: MFU (4·N·tokens)", r["mfu"], "", ""])
    for key in ("embeddings", "embeddings_cuda"):
        e = results.get(key)
        if e:
            rows.append([f"process_embeddings / bare forward ({e['encoder']}, {e['device']}, B {e['batch_size']})",
                         e["ratio"], f">= {e['target']}", verdict(e["ratio"], e["target"], True)])
    stage1 = results.get("stage1")
    if stage1:
        by = {(r["preset"], r["mode"]): r for r in stage1["runs"]}
        for preset in dict.fromkeys(r["preset"] for r in stage1["runs"]):
            cache, live = by.get((preset, "cache")), by.get((preset, "live"))
            if cache and live:
                rows.append([f"stage 1 {preset} ImageBind: cache / live samples/s", cache["samples_per_s"] /
                             live["samples_per_s"], "", ""])
                rows.append([f"stage 1 {preset} ImageBind: peak RSS cache / live MiB",
                             f"{cache['peak_rss_bytes'] / 2**20:.0f} / {live['peak_rss_bytes'] / 2**20:.0f}", "", ""])
    ranks = results.get("ranks") or {}
    for r in ranks.get("scaling", []):
        rows.append([f"{r['stage']} 2 / 1 ranks samples/s, heterogeneous batches (bare 2-process scaling "
                     f"{r['bare_ratio']:.2f})", r["ratio"], "", ""])
    for z in ranks.get("zero", []):
        rows.append([f"{z['stage']} ZeRO-0 / ZeRO-2 samples/s, 2 ranks, heterogeneous batches", z["ratio"], "", ""])
    if "mechanism" in ranks:
        share = ranks["mechanism"]["exchange"]["share_of_step"]
        rows.append(["any batch on any rank: its flag all-reduce / step, homogeneous batch (2 ranks)", share,
                     "<= 0.01", verdict(share, 0.01, False)])
        rows.append(["any batch on any rank: step with / without it, homogeneous batch (2 ranks)",
                     1 + ranks["mechanism"]["shipped"]["overhead"], "", ""])
    encoder = results.get("encoder")
    if encoder:
        for modality, row in encoder["throughput"].items():
            rows.append([f"ImageBind {encoder['preset']} {modality} end to end /s (cpu)", row["end_to_end_per_s"], "",
                         ""])
    store = results.get("store") or {}
    if "store" in store:
        f, h = store["store"]["files"], store["store"]["shards"]
        rows.append(["store shards / files per 100k items: files", f"{h['files_per_100k']:.0f} / "
                     f"{f['files_per_100k']:.0f}", "<= 100", verdict(h["files_per_100k"], 100, False)])
        ratio = h["bytes_per_100k"] / f["bytes_per_100k"]
        rows.append(["store shards / files per 100k items: bytes", ratio, "<= 0.5", verdict(ratio, 0.5, False)])
        ratio = h["read_items_per_s"] / f["read_items_per_s"]
        rows.append(["store read items/s shards / files", ratio, ">= 1.0", verdict(ratio, 1.0, True)])
    if "precompute" in store:
        p = store["precompute"]
        rows.append(["features 2 / 1 processes items/s, bare decode + encode (this machine's scaling)",
                     p["bare"]["ratio"], "", ""])
        for layout in ("files", "shards"):
            v = p[layout]
            rows.append([f"features 2 / 1 processes items/s, {layout} (kept {v['kept']:.2f} of bare; bit-identical: "
                         f"{v['bit_identical']})", v["ratio"], ">= 1.8", verdict(v["ratio"], 1.8, True)])
    if "online" in store:
        rows.append(["stage-2 step online / precomputed caption embeddings (mid)", store["online"]["ratio"], "", ""])
    t = results.get("tars") or {}
    if "features" in t:
        f = t["features"]
        rows.append([f"features items/s, media in tar shards / as files, 1 process (bit-identical: "
                     f"{f['tars_equal_files']})", f["tars_over_files_1proc"], ">= 1.0",
                     verdict(f["tars_over_files_1proc"], 1.0, True)])
        rows.append([f"features 2 / 1 processes items/s, tar shards (kept {f['tars']['kept']:.2f} of bare "
                     f"{f['bare']['ratio']:.2f})", f["tars"]["ratio"], "", ""])
    if "index" in t:
        i = t["index"]
        rows.append([f"shard index: build s per 10 k members; bytes per member ({i['members']:,} members)",
                     f"{i['build_s_per_10k']:.2f}; {i['index_bytes_per_member']:.0f}", "", ""])
        rows.append(["files created per medium from tar shards", i["files_per_medium"], "0",
                     verdict(i["files_per_medium"], 0, False)])
    if "scale" in t:
        s = t["scale"]
        rows.append([f"features over {s['runs']['tars'][-1]['items']:,} items: peak RSS growth bytes per item, "
                     f"tars - files (files alone {s['files']['rss_growth_bytes_per_item']:.0f})",
                     s["tars_minus_files_bytes_per_item"], "", ""])
    e = results.get("embeddings")
    if e and "shards_ratio" in e:
        rows.append([f"process_embeddings / bare forward with shards ({e['encoder']}, {e['device']})",
                     e["shards_ratio"], f">= {e['shards_target']}", verdict(e["shards_ratio"], e["shards_target"], True)])
    for run in (results.get("eval") or {}).get("runs", []):
        rows.append([f"eval requests/s, mid LLM, batch {run['batch_size']} ({run['requests']} held-out requests)",
                     run["requests_per_s"], "", ""])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", metavar="NAME", help="pipeline embeddings stage1 encoder eval (+ *_cuda)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the CPU benchmarks (default 1)")
    args = p.parse_args(argv)
    import torch

    # CPU thread count for every benchmark process (bench_encoder reads OMP_NUM_THREADS): see bench_common.set_threads
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    cuda = torch.cuda.is_available()
    selected = [j for j in jobs(args.quick, cuda) if not args.only or j[0] in args.only]
    print(machine_line().replace(f"{torch.get_num_threads()} torch thread(s)", f"{args.threads} torch thread(s) per "
                                 "benchmark"), flush=True)
    results, failed, seconds = {}, [], {}
    for name, command, json_path in selected:
        print(f"\n=== {name}: python {' '.join(command)}", flush=True)
        start = time.time()
        if name in ("pipeline", "embeddings", "stage1", "eval", "store", "tars"):
            command = [*command, "--threads", str(args.threads)]
        rc = subprocess.call([sys.executable, *command], cwd=REPO)
        seconds[name] = time.time() - start
        if rc != 0 or not json_path.is_file():
            failed.append(f"{name} (exit {rc})")
            continue
        results[name] = json.loads(json_path.read_text())
    rows = summary_rows(results)
    if not cuda:
        rows.append(["CUDA variants (7B tokens/s + MFU, CLIP-L embeddings, ImageBind-huge)", "not run", "",
                     "no GPU here"])
    print_table(f"Benchmarks ({'quick, ' if args.quick else ''}{time.strftime('%Y-%m-%d %H:%M')}, "
                f"{sum(seconds.values()):.0f} s)", ["measure", "value", "target", ""], rows)
    if failed:
        print(f"\nfailed to run: {', '.join(failed)}")
    write_json(OUT / "results.json", {"machine": machine(), "quick": args.quick, "seconds": seconds,
                                       "summary": [dict(zip(("measure", "value", "target", "verdict"), r))
                                                   for r in rows],
                                       "failed": failed, "results": results})
    print(f"wrote {OUT / 'results.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
