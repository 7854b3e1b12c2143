"""Dataset-scale data path (issue 15): sharded precompute, the shard store, online caption embeddings.

    python dev/bench/bench_store.py                 # every part, CPU
    python dev/bench/bench_store.py --quick         # 20 k store items, fewer repetitions
    python dev/bench/bench_store.py --parts store   # any of: store precompute online

Parts, each on the real code paths:
  store       100 k items of the tiny image caption-embedding shape (77, 32) written by nextgpt.store.StoreWriter
              as `files` (float32 .npy per item, the seed's layout) and as `shards` (float16): files and bytes
              (apparent and allocated) per 100 k items, extrapolated to CC3M's 3.3 M items of SD-1.5's (77, 768);
              then read throughput of 5,000 random items through StoreReader.get (what the collator calls), warm
              page cache, both layouts. Targets: shards <= 100 files and <= half the bytes; shard reads >= files.
  precompute  ImageBind features (tiny ImageBind) of N toy images with process_embeddings.py in 1 process and in
              2 processes (--shard 0/2, 1/2, started together), each with 1 torch thread and media decoded in the
              process (--workers 0) so that only the process count differs, in both layouts; beside it, in the same
              repetitions, the bare compute (decode + encode of the same share, nothing else) in 1 and 2 processes:
              what two processes give on this machine at that moment (its two vCPUs do not scale 2x even for a
              loop with no I/O). Two warm worker processes run every job, so start-up is in no figure. Outputs
              compared item for item. Target >= 1.8x; `kept` = pipeline ratio / bare ratio.
  online      stage-2 training step (forward + backward, image targets) on the mid config: a 4-layer 512-wide
              Llama and a 4-layer 512-wide CLIP text encoder as the image decoder's, with caption embeddings read
              from the store (precomputed) vs made by the frozen text encoder inside the step (online); plus the same
              ratio from FLOP counts at the real sizes (CLIP-L / OpenCLIP-H / CLAP text encoders vs Vicuna-7B).
process_embeddings / bare text-encoder forward with each layout is dev/bench/bench_embeddings.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (REPO, bench_args, machine, machine_line, median, print_table, quiet, run_cli, set_threads,
                          verdict, workspace)

CC3M_ITEMS = 3_300_000
CC3M_SHAPE = (77, 768)           # SD-1.5's CLIP-L last hidden state


def _du(folder: Path) -> tuple[int, int, int]:
    """(files, apparent bytes, allocated bytes) under folder."""
    files = apparent = allocated = 0
    for root, _, names in os.walk(folder):
        for name in names:
            st = os.stat(os.path.join(root, name))
            files += 1
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return files, apparent, allocated


# ----------------------------------------------------------------------------------------------------------------
# store: files and bytes, read throughput

def bench_store(work: Path, count: int, reads: int) -> dict:
    import numpy as np

    from nextgpt import store

    shape = (77, 32)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((1024, *shape), dtype=np.float32)
    names = [f"{i:09d}.jpg" for i in range(count)]
    hashes = [store.caption_hash(n) for n in names]
    result: dict = {"items": count, "shape": list(shape)}
    folders = {}
    for layout, dtype in (("files", "float32"), ("shards", "float16")):
        folder = work / f"store_{layout}"
        shutil.rmtree(folder, ignore_errors=True)
        section = store.Section(encoder="bench", shape=list(shape), dtype=dtype, hashed=True)
        start = time.perf_counter()
        writer = store.StoreWriter(folder, store.KINDS[0], "image", section, layout=layout)
        for i in range(0, count, 1024):
            chunk = names[i:i + 1024]
            writer.put(chunk, block[:len(chunk)], hashes[i:i + 1024])
        writer.close()
        store.merge(folder, store.KINDS[0], "image", section, layout)
        seconds = time.perf_counter() - start
        files, apparent, allocated = _du(folder)
        result[layout] = dict(dtype=dtype, files=files, apparent_bytes=apparent, allocated_bytes=allocated,
                              write_items_per_s=count / seconds)
        folders[layout] = folder
    per = 100_000 / count
    for layout in ("files", "shards"):
        r = result[layout]
        r["files_per_100k"] = r["files"] * per if layout == "files" else r["files"]
        r["bytes_per_100k"] = r["allocated_bytes"] * per
    # Reads: the same random names through StoreReader.get, warm cache (one untimed pass first), best of 3.
    sample = random.Random(0).sample(names, min(reads, count))
    for layout, folder in folders.items():
        reader = store.StoreReader(folder)
        for name in sample:
            reader.get(name)
        times = []
        for _ in range(3):
            reader = store.StoreReader(folder)            # a fresh process's reader: index + maps opened lazily
            start = time.perf_counter()
            for name in sample:
                reader.get(name, caption=name)
            times.append(time.perf_counter() - start)
        result[layout]["read_items_per_s"] = len(sample) / min(times)
    # CC3M: files = one per item + manifest; float32 (77, 768) + the 128-byte .npy header, 4 KiB blocks.
    item32 = int(np.prod(CC3M_SHAPE)) * 4 + 128
    files_bytes = CC3M_ITEMS * (-(-item32 // 4096) * 4096)
    rows = store.SHARD_BYTES // (int(np.prod(CC3M_SHAPE)) * 2)
    shards = -(-CC3M_ITEMS // rows)
    shard_bytes = CC3M_ITEMS * int(np.prod(CC3M_SHAPE)) * 2 + shards * (128 + rows * 40)   # + index JSON
    result["cc3m"] = dict(items=CC3M_ITEMS, shape=list(CC3M_SHAPE), files_files=CC3M_ITEMS + 2,
                          files_bytes=files_bytes, shards_files=2 * shards + 1, shards_bytes=shard_bytes,
                          rows_per_shard=rows)
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------------------------------
# precompute: 1 process vs 2 processes, against the same compute without the pipeline

def _bare_share(argv: list[str]) -> None:
    """The compute a features run cannot avoid, with nothing else: this share's batches (the same split as
    --shard; whole shards when the images are webdataset shard members), each image decoded (imagebind LOADERS,
    which read a member by offset) and encoded, the vectors dropped. No store, no DataLoader."""
    import torch

    from nextgpt import store
    from nextgpt.imagebind.encode import LOADERS, Encoder
    from nextgpt.store import tars

    pairs, _, _ = argv[:3]
    opt = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}
    rank, world = store.parse_share(opt.get("--shard"))
    folder = Path(pairs).parent / "images"
    paths = {r["image_name"]: folder / r["image_name"] for r in json.loads(Path(pairs).read_text())}
    encoder = Encoder(opt["--imagebind"], opt["--preset"], device="cpu")
    batches, _ = tars.plan_batches(paths, int(opt["--batch-size"]), rank, world)
    for batch in batches:
        encoder.encode_tensors("image", torch.stack([LOADERS["image"](paths[n]) for n in batch])).numpy()


def _worker(args) -> int:
    """A long-lived benchmark process: imports and builds once, then runs each job file it is given
    (`job_<k>_<j>.json`: {"argv", "bare"}) and records its seconds in `done_<k>_<j>.json`. Starting the
    processes once keeps their start-up (torch import, first model build, ~3 s here) out of every measurement."""
    set_threads(1)
    if args.pin:
        os.sched_setaffinity(0, {args.index % os.cpu_count()})
    sys.path.insert(0, str(REPO / "code"))
    import process_embeddings  # noqa: F401  (everything a run imports, before any clock starts)
    import tqdm  # noqa: F401

    import nextgpt.config  # noqa: F401
    import nextgpt.data.readers  # noqa: F401
    import nextgpt.imagebind.features  # noqa: F401
    from nextgpt.imagebind.encode import Encoder
    from nextgpt.io import atomic_write_text

    with quiet():                           # the first model build imports torch's lazy modules
        Encoder(args.imagebind, "tiny", device="cpu")
    folder, k = Path(args.jobs), args.index
    (folder / f"ready_{k}").write_text("ready")
    for j in range(10**6):
        job = folder / f"job_{k}_{j}.json"
        while not job.exists():
            time.sleep(0.002)
        spec = json.loads(job.read_text())
        if spec.get("exit"):
            return 0
        if spec.get("skip"):                # a 1-process job: this worker sits it out
            atomic_write_text(folder / f"done_{k}_{j}.json", json.dumps({"rc": 0, "seconds": 0, "end": 0}))
            continue
        start = time.perf_counter()
        with quiet():
            if spec["bare"]:
                _bare_share(spec["argv"])
                rc = 0
            else:
                rc = process_embeddings.main(spec["argv"])
        seconds = time.perf_counter() - start
        atomic_write_text(folder / f"done_{k}_{j}.json", json.dumps({"rc": rc, "seconds": seconds, "end": time.time()}))


class _Workers:
    """Two warm worker processes; `run([argv, ...], bare)` starts one job per argv together (job files written
    within microseconds of each other) and returns the wall seconds from the start to the last one's end."""

    def __init__(self, scratch: Path, imagebind: Path, count: int = 2, pin: bool = False):
        from nextgpt.io import atomic_write_text

        self.folder, self.jobs, self.write = scratch / "jobs", 0, atomic_write_text
        self.folder.mkdir(parents=True)
        self.procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--jobs", str(self.folder), "--index",
                                        str(k), "--imagebind", str(imagebind), *(["--pin"] if pin else [])],
                                       env={**os.environ, "OMP_NUM_THREADS": "1"}) for k in range(count)]
        while not all((self.folder / f"ready_{k}").exists() for k in range(count)):
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a benchmark worker exited before it was ready")
            time.sleep(0.05)

    def run(self, commands: list[list[str]], bare: bool) -> float:
        j, self.jobs = self.jobs, self.jobs + 1
        for k in range(len(self.procs)):            # every worker takes job j; the idle ones are told to skip it
            if k >= len(commands):
                self.write(self.folder / f"job_{k}_{j}.json", json.dumps({"skip": True, "bare": True, "argv": []}))
        start = time.time()
        for k, argv in enumerate(commands):
            self.write(self.folder / f"job_{k}_{j}.json", json.dumps({"argv": argv, "bare": bare}))
        results = []
        for k in range(len(self.procs)):
            done = self.folder / f"done_{k}_{j}.json"
            while not done.exists():
                if self.procs[k].poll() is not None:
                    raise RuntimeError(f"benchmark worker {k} exited (rc {self.procs[k].returncode})")
                time.sleep(0.005)
            results.append(json.loads(done.read_text()))
        if any(r["rc"] != 0 for r in results):
            raise RuntimeError(f"process_embeddings failed in a benchmark worker: {results}")
        return max(r["end"] for r in results[:len(commands)]) - start

    def close(self) -> None:
        for k in range(len(self.procs)):
            self.write(self.folder / f"job_{k}_{self.jobs}.json", json.dumps({"exit": True}))
        for p in self.procs:
            p.wait()


def _same_items(a: Path, b: Path, names: list[str]) -> bool:
    """Every item equal in store folders a and b (read through StoreReader, so the shards layout compares items,
    not shard file names; get() widens float16 to float32 exactly), and the manifests record the same (dtype,
    shape, count, encoder)."""
    import numpy as np

    from nextgpt import store

    ra, rb = store.StoreReader(a), store.StoreReader(b)
    same = all(ra.has(n) and rb.has(n) and np.array_equal(ra.get(n), rb.get(n)) for n in names)
    return same and (a / store.MANIFEST).read_text() == (b / store.MANIFEST).read_text()


def one_vs_two(scratch: Path, imagebind: Path, variants: dict, count: int, reps: int, pin: bool = False) -> dict:
    """Per repetition, interleaved (so that a change in the machine's load hits every side): each variant in 1
    process and in 2 (--shard 0/2, 1/2, started together) on two warm workers; `variants`: name -> argv(out,
    *more) of a process_embeddings run, "bare" first (run as _bare_share). Outputs go to
    scratch/<variant>_one|two_<rep>. -> {variant: {one_process_items_per_s, two_processes_items_per_s, ratio
    (median of per-repetition 1-process s / 2-process s), ratios_per_rep, kept (ratio / bare ratio, not for
    bare)}, "seconds": {variant: {1: [...], 2: [...]}}}"""
    seconds = {(v, n): [] for v in variants for n in (1, 2)}
    workers = _Workers(scratch, imagebind, pin=pin)
    try:
        first = variants[next(v for v in variants if v != "bare")]
        for bare in (True, False):         # untimed: each worker's first run pays its one-time costs (allocator,
            warm = scratch / f"warm_{bare}"    # oneDNN kernels, lazy imports), as a long run would only once
            workers.run([first(warm, "--shard", "0/2"), first(warm, "--shard", "1/2")], bare)
        for rep in range(reps):
            for variant, argv in variants.items():
                one, two = scratch / f"{variant}_one_{rep}", scratch / f"{variant}_two_{rep}"
                seconds[variant, 1].append(workers.run([argv(one)], variant == "bare"))
                seconds[variant, 2].append(workers.run([argv(two, "--shard", "0/2"), argv(two, "--shard", "1/2")],
                                                       variant == "bare"))
    finally:
        workers.close()
    result: dict = {"seconds": {v: {n: seconds[v, n] for n in (1, 2)} for v in variants}}
    bare = [a / b for a, b in zip(seconds["bare", 1], seconds["bare", 2])]
    for variant in variants:
        ratios = [a / b for a, b in zip(seconds[variant, 1], seconds[variant, 2])]
        result[variant] = dict(one_process_items_per_s=count / median(seconds[variant, 1]),
                               two_processes_items_per_s=count / median(seconds[variant, 2]),
                               ratio=median(ratios), ratios_per_rep=ratios)
        if variant != "bare":
            result[variant]["kept"] = median([r / b for r, b in zip(ratios, bare)])
    return result


def bench_precompute(env, work: Path, count: int, reps: int, pin: bool = False) -> dict:
    """Per repetition, interleaved: the bare compute, the files layout and the shards layout, each in 1 process
    and then in 2 (--shard 0/2, 1/2). Ratios are per repetition (1-process seconds / 2-process seconds, taken
    seconds apart), then the median; `kept` = the pipeline's ratio / the bare ratio of the same repetition: how
    much of what two processes give on this machine at that moment the pipeline keeps."""
    images = sorted((env.data / "T_X_pair_data" / "cc3m" / "images").glob("*"))
    scratch = work / "precompute"
    shutil.rmtree(scratch, ignore_errors=True)
    media = scratch / "images"
    media.mkdir(parents=True)
    records = []
    for i in range(count):                 # distinct names (the cache key), the toy images cycled
        source = images[i % len(images)]
        name = f"{i:06d}{source.suffix}"
        os.symlink(source, media / name)
        records.append({"image_name": name, "caption": "a toy image"})
    pairs = scratch / "pairs.json"
    pairs.write_text(json.dumps(records))

    def argv(out: Path, layout: str, *more: str) -> list[str]:
        return [str(pairs), "image", str(out), "--features", "--imagebind", str(env.imagebind), "--preset", "tiny",
                "--batch-size", "8", "--workers", "0", "--device", "cpu", "--store", layout, *more]

    result: dict = dict(items=count, reps=reps)
    result.update(one_vs_two(scratch, env.imagebind, {v: (lambda out, *more, layout=("files" if v == "bare" else v):
                                                          argv(out, layout, *more)) for v in ("bare", "files", "shards")},
                             count, reps, pin))
    for variant in ("files", "shards"):
        result[variant]["bit_identical"] = all(
            _same_items(scratch / f"{variant}_one_{rep}", scratch / f"{variant}_two_{rep}",
                        [r["image_name"] for r in records]) for rep in range(reps))
    result["ratio"] = result["files"]["ratio"]            # the seed's layout: the headline figure
    result["bit_identical"] = result["files"]["bit_identical"] and result["shards"]["bit_identical"]
    shutil.rmtree(scratch, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------------------------------
# online vs precomputed caption embeddings

# Text encoders of the real decoders (parameters of the transformer body, tokens per caption) and Vicuna-7B.
REAL_TEXT_ENCODERS = {
    "image (SD-1.5, CLIP ViT-L/14 text, 123 M)": (123e6, 77),
    "video (Zeroscope, OpenCLIP ViT-H/14 text, 354 M)": (354e6, 77),
    "audio (AudioLDM, CLAP RoBERTa-base text, 125 M)": (125e6, 77),
}
VICUNA_7B_PARAMS = 6.74e9


def flop_ratios(tokens_per_sample: int) -> dict:
    """Online text-encoder forward (2 N T per caption) / the stage-2 LLM step per sample. Stage 2 runs the LLM
    forward over every token (2 N L) and the backward over the suffix only (input gradients, 2 N per suffix token;
    the LLM's weights are frozen): between 2 N L (lower bound on the step) and 4 N L (full backward)."""
    out = {}
    for name, (params, tokens) in REAL_TEXT_ENCODERS.items():
        encoder = 2 * params * tokens
        out[name] = dict(encoder_gflops=encoder / 1e9,
                         vs_llm_forward=encoder / (2 * VICUNA_7B_PARAMS * tokens_per_sample),
                         vs_llm_fwd_bwd=encoder / (4 * VICUNA_7B_PARAMS * tokens_per_sample))
    return out


def bench_online(env, work: Path, batch_size: int, reps: int, device, dtype) -> dict:
    import torch

    from bench.bench_embeddings import ENCODERS, write_decoder
    from bench.bench_pipeline import MID, write_llm
    from nextgpt.data.dataset import build_loader
    from nextgpt.model import caption_encoder
    from nextgpt.model.nextgpt import build_model
    from nextgpt.model.trainable import set_trainable
    from tiny.tiny_workspace import code_script

    llm = write_llm(work / "llm_mid", env.ckpt / "vicuna", MID)
    decoder = write_decoder(work / "text_encoder_mid", env.ckpt / "stable-diffusion", ENCODERS["mid"])
    embed_dir = work / "online_embed"
    common = [f"model.llm={llm}", f"model.decoders.image={decoder}", "model.modalities=[image]",
              "data.datasets=[cc3m_dec]", f"data.embed_dir={embed_dir}", f"train.micro_batch_size={batch_size}",
              "train.loss_weights={lm: 1.0, image: 1.0}"]
    with quiet():
        code_script("process_embeddings").main([*env.argv("stage_2", *common), "--all", "--datasets", "cc3m_dec"])
    times = {}
    tokens = []
    for mode in ("precomputed", "online"):
        cfg = env.config("stage_2", *common, f"data.caption_embeds={mode}")
        torch.manual_seed(0)
        with quiet():
            model = build_model(cfg, device=device, dtype=dtype)
            set_trainable(model, cfg)
            caption_encoder.attach(model, cfg, device, dtype)
            loader, _ = build_loader(cfg, model.tokenizer, model.token_ids)
        batches = [b for b, _ in zip(loader, range(4))]
        tokens = [int(b["attention_mask"].sum()) / b["attention_mask"].shape[0] for b in batches]

        def step(batch):
            out = model(dict(batch))
            out["loss"].backward()

        step(batches[0])                                          # warm-up
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            for batch in batches:
                step(batch)
            samples.append((time.perf_counter() - start) / len(batches))
        times[mode] = median(samples)
    mean_tokens = sum(tokens) / len(tokens)
    return dict(batch_size=batch_size, reps=reps, precomputed_step_s=times["precomputed"],
                online_step_s=times["online"], ratio=times["online"] / times["precomputed"],
                mean_tokens_per_sample=mean_tokens, real_sizes=flop_ratios(tokens_per_sample=80))


# ----------------------------------------------------------------------------------------------------------------

def precompute_rows(p: dict, labels: dict[str, str], target: float | None = None) -> list[list]:
    """Table rows of a 1- vs 2-process result (bench_precompute's, bench_tars'): label, items/s in 1 and 2
    processes, the 2 / 1 ratio, kept of bare, and the target's verdict (not for the bare row)."""
    rows = []
    for variant, label in labels.items():
        v = p[variant]
        row = [label, v["one_process_items_per_s"], v["two_processes_items_per_s"], v["ratio"], v.get("kept", "")]
        if target is not None:
            row.append(f">= {target} {verdict(v['ratio'], target, True)}" if variant != "bare" else "")
        rows.append(row)
    return rows


def run(args) -> dict:
    import torch

    if args.quick:
        args.count, args.reads, args.images, args.reps = min(args.count, 20_000), 2000, 64, 1
        args.precompute_reps = 1
    set_threads(args.threads)
    work = Path(args.workdir).resolve()
    env = workspace(work / "tiny")
    print(machine_line())
    result: dict = {"machine": machine(), "command": "python dev/bench/bench_store.py " + " ".join(args.argv)}
    if "store" in args.parts:
        s = result["store"] = bench_store(work, args.count, args.reads)
        f, h = s["files"], s["shards"]
        print_table(f"store: {s['items']:,} items of {tuple(s['shape'])} written and read through nextgpt.store "
                    "(per 100 k items; reads: 5,000 random items, warm cache)",
                    ["layout", "dtype", "files", "MiB", "write items/s", "read items/s", "target"],
                    [["files", f["dtype"], f["files_per_100k"], f["bytes_per_100k"] / 2**20, f["write_items_per_s"],
                      f["read_items_per_s"], ""],
                     ["shards", h["dtype"], h["files_per_100k"], h["bytes_per_100k"] / 2**20, h["write_items_per_s"],
                      h["read_items_per_s"],
                      f"files <= 100 {verdict(h['files_per_100k'], 100, False)}; bytes <= 0.5x "
                      f"{verdict(h['bytes_per_100k'] / f['bytes_per_100k'], 0.5, False)}; reads >= files "
                      f"{verdict(h['read_items_per_s'] / f['read_items_per_s'], 1.0, True)}"]])
        c = s["cc3m"]
        print(f"CC3M ({c['items']:,} items of {tuple(c['shape'])}): files {c['files_files']:,} files, "
              f"{c['files_bytes'] / 2**40:.2f} TiB (float32) | shards {c['shards_files']:,} files "
              f"({c['rows_per_shard']:,} rows each), {c['shards_bytes'] / 2**40:.2f} TiB (float16)")
    if "precompute" in args.parts:
        p = result["precompute"] = bench_precompute(env, work, args.images, args.precompute_reps, args.pin)
        rows = precompute_rows(p, {"bare": "bare: decode + encode, nothing else",
                                   "files": "process_embeddings --store files",
                                   "shards": "process_embeddings --store shards"}, target=1.8)
        print_table(f"ImageBind features (tiny ImageBind, {p['items']} toy images, batch 8), 1 process vs 2 "
                    f"(--shard 0/2, 1/2), 1 torch thread and no decode workers per process; ratio = median over "
                    f"{p['reps']} repetitions of 1-process s / 2-process s; kept = ratio / bare ratio",
                    ["", "1 proc items/s", "2 procs items/s", "2 / 1", "kept", "target"], rows)
        print(f"2-process output {'bit-identical to' if p['bit_identical'] else 'DIFFERS from'} the 1-process output "
              "(every item and the manifest, both layouts); per-repetition 2 / 1 ratios: "
              + "; ".join(f"{v} " + " ".join(f"{r:.2f}" for r in p[v]["ratios_per_rep"])
                          for v in ("bare", "files", "shards")))
    if "online" in args.parts:
        o = result["online"] = bench_online(env, work, args.batch_size, args.reps + 2, torch.device("cpu"),
                                            torch.float32)
        print_table(f"stage-2 step (fwd + bwd), mid config (Llama 4x512 + CLIP text 4x512 as the image decoder's), "
                    f"batch {o['batch_size']}, cpu float32",
                    ["caption embeddings", "s/step", "ratio"],
                    [["precomputed (store)", o["precomputed_step_s"], 1.0],
                     ["online (text encoder in the step)", o["online_step_s"], o["ratio"]]])
        print_table("the same at real sizes, from FLOPs: online text-encoder forward / stage-2 LLM work per sample "
                    "(Vicuna-7B, 80 tokens)",
                    ["decoder text encoder", "GFLOP/caption", "/ LLM fwd", "/ LLM fwd+bwd"],
                    [[k, v["encoder_gflops"], v["vs_llm_forward"], v["vs_llm_fwd_bwd"]]
                     for k, v in o["real_sizes"].items()])
    return result  # run_cli writes it to --json


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["store", "precompute", "online"],
                   choices=["store", "precompute", "online"])
    p.add_argument("--count", type=int, default=100_000, help="store items (default 100 000)")
    p.add_argument("--reads", type=int, default=5000)
    p.add_argument("--images", type=int, default=1280, help="media for the 1- vs 2-process run (default 1280)")
    p.add_argument("--batch-size", type=int, default=8, help="stage-2 micro-batch (online part)")
    p.add_argument("--reps", type=int, default=3, help="store reads and online steps (default 3)")
    p.add_argument("--precompute-reps", type=int, default=5, help="1- vs 2-process repetitions (default 5)")
    p.add_argument("--pin", action="store_true", help="precompute: worker k on core k")
    p.add_argument("--quick", action="store_true")
    bench_args(p, "store.json", threads=1, threads_help="torch threads (default 1, see bench_common)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--worker":
        w = argparse.ArgumentParser()
        w.add_argument("--worker", action="store_true")
        w.add_argument("--jobs", required=True)
        w.add_argument("--index", type=int, required=True)
        w.add_argument("--imagebind", required=True)
        w.add_argument("--pin", action="store_true")
        return _worker(w.parse_args(argv))
    return run_cli(parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
