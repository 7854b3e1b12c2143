"""Media read from webdataset tar shards in place (issue 27) vs the same media as files.

    python dev/bench/bench_tars.py                          # every part, CPU (~40 s of CPU time; 2.5-6 min wall at load 11-20)
    python dev/bench/bench_tars.py --parts scale --scale-items 100000   # the large shard-set run, on its own

Parts, each on the real code paths (scripts/prepare_data.py, code/process_embeddings.py, nextgpt/store/tars.py):
  features  ImageBind features (tiny ImageBind, batch 8, 1 torch thread, --workers 0) of N toy images prepared
            twice from the same samples: img2dataset's "files" output (prepare_data --src: a file per medium) and
            its webdataset output (prepare_data --tars: shards of 64, nothing extracted). Per repetition,
            interleaved: the bare compute (decode + encode of the share, nothing else; bench_store's), files and
            tars, each in 1 process and in 2 (--shard 0/2, 1/2, started together, two warm worker processes from
            bench_store so start-up is in no figure). Targets: tars / files items/s >= 1.0 in 1 process; the tars
            2 / 1-process ratio beside the bare one (`kept`). Outputs compared item for item (tars == files).
  index     prepare_data --tars over a generated shard set of M members (toy images cycled, shards of 1,000 as
            img2dataset writes 10,000): seconds per 10 k members (header scan + captions + index write), bytes
            of index per member, files created per medium; then 2,000 random members read by offset (fresh
            index open, warm cache) vs the same media read as files.
  scale     process_embeddings --features end to end over a generated shard set of K members and over K / 4,
            and over the same samples as files: peak RSS (the process's own, sampled: bench.common.peak_rss_of) of
            each; growth per
            item = the RSS difference / the item difference; what shards add = tars growth - files growth (the
            records process_embeddings holds, ~1.7 KB each, grow with either). Default K 1,000 (make bench);
            --scale-items 100000 for the 100 k run (hours on a 2-core CPU at the tiny model's ~25 items/s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

from bench.common import (REPO, bench_args, machine, machine_line, median, peak_rss_of, print_table, quiet,
                          run_cli, set_threads, verdict, workspace)

PER_SHARD_FEATURES = 64
PER_SHARD_INDEX = 1000


def _toy_source(env) -> Path:
    return env.data / "T_X_pair_data" / "cc3m" / "cc3m.json"


def _prepare(root: Path, *source: str) -> Path:
    """prepare_data into `root` (its own catalog) -> the pair JSON."""
    from tiny.tiny_workspace import code_script

    prepare_data = code_script("prepare_data", "scripts")
    catalog = root / "catalog.yaml"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "code" / "config" / "catalog.yaml", catalog)
    argv = [*source, "--name", "bench", "--root", str(root / "data"), "--catalog", str(catalog)]
    with quiet():
        rc = prepare_data.main(argv)
    if rc != 0:
        raise RuntimeError(f"prepare_data {' '.join(argv)} failed")
    return root / "data" / "T_X_pair_data" / "bench" / "bench.json"


def _shard_set(env, out: Path, count: int, per_shard: int, files: bool = False) -> str:
    """`count` toy samples as webdataset shards under out/raw_tars (and as files under out/raw_files) -> the
    shard spec for --tars."""
    from tiny import toy_tars

    repeat = -(-count // len(json.loads(_toy_source(env).read_text())))
    samples = list(toy_tars.pair_samples(_toy_source(env), "image", repeat=repeat))[:count]
    shards = toy_tars.write_shards(samples, out / "raw_tars", per_shard)
    if files:
        toy_tars.write_files(samples, out / "raw_files", per_shard)
    return str(out / "raw_tars" / f"{{00000..{len(shards) - 1:05d}}}.tar")


def _argv(pairs: Path, out: Path, env, *more: str) -> list[str]:
    return [str(pairs), "image", str(out), "--features", "--imagebind", str(env.imagebind), "--preset", "tiny",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", *more]


def bench_features(env, work: Path, count: int, reps: int, pin: bool) -> dict:
    from bench.bench_store import _same_items, one_vs_two     # bench_store's harness: warm workers, items compared

    scratch = work / "tars_features"
    shutil.rmtree(scratch, ignore_errors=True)
    spec = _shard_set(env, scratch, count, PER_SHARD_FEATURES, files=True)
    pairs = {"files": _prepare(scratch / "files", "img2dataset", "--src", str(scratch / "raw_files")),
             "tars": _prepare(scratch / "tars", "img2dataset", "--tars", spec)}
    names = [r["image_name"] for r in json.loads(pairs["files"].read_text())]
    result: dict = dict(items=count, reps=reps, per_shard=PER_SHARD_FEATURES)
    result.update(one_vs_two(scratch, env.imagebind, {
        v: (lambda out, *more, source=pairs["tars" if v == "bare" else v]: _argv(source, out, env, *more))
        for v in ("bare", "files", "tars")}, count, reps, pin))
    seconds = result.pop("seconds")
    per_rep = [f / t for f, t in zip(seconds["files"][1], seconds["tars"][1])]      # tars items/s / files items/s
    result["tars_over_files_1proc"] = median(per_rep)
    result["tars_over_files_per_rep"] = per_rep
    result["tars_equal_files"] = all(_same_items(scratch / f"tars_one_{r}", scratch / f"files_one_{r}", names)
                                     for r in range(reps))
    result["two_equal_one"] = all(_same_items(scratch / f"tars_one_{r}", scratch / f"tars_two_{r}", names)
                                  for r in range(reps))
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def bench_index(env, work: Path, members: int, reads: int) -> dict:
    from nextgpt.store import tars

    scratch = work / "tars_index"
    shutil.rmtree(scratch, ignore_errors=True)
    spec = _shard_set(env, scratch, members, PER_SHARD_INDEX, files=True)
    start = time.perf_counter()
    pairs = _prepare(scratch / "tars", "img2dataset", "--tars", spec)
    build = time.perf_counter() - start
    folder = pairs.parent
    media = folder / "images"
    index_bytes = sum((media / n).stat().st_size for n in (tars.INDEX_JSON, tars.INDEX_ARRAY))
    media_files = sum(1 for p in media.iterdir() if p.name not in (tars.INDEX_JSON, tars.INDEX_ARRAY))
    records = json.loads(pairs.read_text())
    picks = random.Random(0).sample(range(len(records)), min(reads, len(records)))
    raw_files = sorted((scratch / "raw_files").rglob("*.jpg"))          # the same samples, key order = record order
    tars.forget(media)
    start = time.perf_counter()
    read_bytes = sum(tars.read_media(media / records[i]["image_name"]).size for i in picks)
    by_offset = time.perf_counter() - start
    start = time.perf_counter()
    file_bytes = sum(len(raw_files[i].read_bytes()) for i in picks)
    as_files = time.perf_counter() - start
    result = dict(members=members, shards=-(-members // PER_SHARD_INDEX), build_s=build,
                  build_s_per_10k=build / members * 10_000, index_bytes=index_bytes,
                  index_bytes_per_member=index_bytes / members, files_per_medium=media_files / members,
                  reads=len(picks), read_by_offset_us=by_offset / len(picks) * 1e6,
                  read_file_us=as_files / len(picks) * 1e6, same_bytes=read_bytes == file_bytes)
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def bench_scale(env, work: Path, items: int) -> dict:
    """Peak RSS of a features run over K and over K / 4 items, with the media in shards and as files: growth per
    item of each, and what the shards add (their difference)."""
    from nextgpt import store

    scratch = work / "tars_scale"
    shutil.rmtree(scratch, ignore_errors=True)
    runs: dict[str, list[dict]] = {"tars": [], "files": []}
    for count in (max(items // 4, 8), items):
        folder = scratch / str(count)
        spec = _shard_set(env, folder, count, PER_SHARD_INDEX, files=True)
        sources = {"tars": ("--tars", spec), "files": ("--src", str(folder / "raw_files"))}
        for source, given in sources.items():
            pairs = _prepare(folder / source, "img2dataset", *given)
            out = folder / source / "features"
            command = [sys.executable, str(REPO / "code" / "process_embeddings.py"),
                       *_argv(pairs, out, env, "--store", "shards")]
            measured = peak_rss_of(command, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                   log_path=folder / f"{source}.log")
            if measured["returncode"] != 0:
                raise RuntimeError(f"process_embeddings failed; see {folder / f'{source}.log'}")
            runs[source].append(dict(items=count, stored=store.read_manifest(out).modalities["image"].count,
                                     seconds=measured["seconds"], peak_rss_bytes=measured["sampled_peak_rss_bytes"],
                                     ru_maxrss_bytes=measured["peak_rss_bytes"]))
        shutil.rmtree(folder, ignore_errors=True)
    result: dict = {"runs": runs}
    for source, (small, large) in runs.items():
        result[source] = dict(
            rss_growth_bytes_per_item=(large["peak_rss_bytes"] - small["peak_rss_bytes"]) / (large["items"] - small["items"]),
            # start-up (imports, model build) is in both runs' seconds: the difference is the steady rate
            steady_items_per_s=((large["items"] - small["items"]) / (large["seconds"] - small["seconds"])
                                if large["seconds"] > small["seconds"] else float("nan")))   # nan: the load changed
    result["tars_minus_files_bytes_per_item"] = (result["tars"]["rss_growth_bytes_per_item"]
                                                 - result["files"]["rss_growth_bytes_per_item"])
    return result


def run(args) -> dict:
    from bench.bench_store import precompute_rows

    if args.quick:
        args.images, args.reps, args.scale_items = 64, 1, 400
    set_threads(args.threads)
    work = Path(args.workdir).resolve()
    env = workspace(work / "tiny")
    print(machine_line())
    result: dict = {"machine": machine(), "command": "python dev/bench/bench_tars.py " + " ".join(args.argv)}
    if "features" in args.parts:
        f = result["features"] = bench_features(env, work, args.images, args.reps, args.pin)
        rows = precompute_rows(f, {"bare": "bare: decode + encode (members by offset)",
                                   "files": "process_embeddings, media as files",
                                   "tars": "process_embeddings, media in tar shards"})
        print_table(f"ImageBind features (tiny, {f['items']} toy images, shards of {f['per_shard']}, batch 8), 1 "
                    f"process vs 2 (--shard 0/2, 1/2), 1 torch thread, no decode workers; medians of {f['reps']} "
                    "repetitions; kept = 2/1 ratio / bare 2/1 ratio",
                    ["", "1 proc items/s", "2 procs items/s", "2 / 1", "kept"], rows)
        print(f"tars / files items/s in 1 process: {f['tars_over_files_1proc']:.2f} (target >= 1.0 "
              f"{verdict(f['tars_over_files_1proc'], 1.0, True)}; per repetition "
              + " ".join(f"{r:.2f}" for r in f["tars_over_files_per_rep"]) + "); features from tars "
              f"{'bit-identical to' if f['tars_equal_files'] else 'DIFFER from'} files; 2 processes "
              f"{'bit-identical to' if f['two_equal_one'] else 'DIFFER from'} 1")
    if "index" in args.parts:
        i = result["index"] = bench_index(env, work, args.index_members, args.reads)
        print_table(f"shard index: prepare_data --tars over {i['members']:,} members ({i['shards']} shards)",
                    ["build s / 10 k", "bytes / member", "files / medium", "read by offset us", "read file us"],
                    [[i["build_s_per_10k"], i["index_bytes_per_member"], i["files_per_medium"],
                      i["read_by_offset_us"], i["read_file_us"]]])
        print(f"{i['reads']:,} random members read by offset (fresh index open, warm cache): "
              f"{'the same bytes as' if i['same_bytes'] else 'DIFFERENT bytes from'} the files")
    if "scale" in args.parts:
        s = result["scale"] = bench_scale(env, work, args.scale_items)
        print_table("process_embeddings --features end to end (img2dataset output prepared from shards of 1,000 or "
                    "as files; --store shards, 1 torch thread, no decode workers)",
                    ["media", "items", "stored", "seconds", "peak RSS MiB"],
                    [[source, r["items"], r["stored"], r["seconds"], r["peak_rss_bytes"] / 2**20]
                     for source, rows in s["runs"].items() for r in rows])
        print("peak RSS growth per item: " + "; ".join(
            f"{source} {s[source]['rss_growth_bytes_per_item']:.0f} B (steady {s[source]['steady_items_per_s']:.1f} "
            "items/s)" for source in ("tars", "files"))
              + f"; shards add {s['tars_minus_files_bytes_per_item']:.0f} B per item")
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["features", "index", "scale"], choices=["features", "index", "scale"])
    p.add_argument("--images", type=int, default=96, help="media of the features part (default 96)")
    p.add_argument("--reps", type=int, default=3, help="features repetitions (default 3)")
    p.add_argument("--index-members", type=int, default=10_000, help="members of the index part (default 10 000)")
    p.add_argument("--reads", type=int, default=2000, help="random member reads (default 2000)")
    p.add_argument("--scale-items", type=int, default=1000, help="members of the scale part (default 1000; the "
                   "issue's run: 100000)")
    p.add_argument("--pin", action="store_true", help="features: worker k on core k")
    p.add_argument("--quick", action="store_true", help="fewer items (features 64, 1 repetition, scale 400)")
    bench_args(p, "tars.json", threads=1, threads_help="torch threads (default 1, see bench_common)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
