"""ImageBind encoder throughput (images/s, videos/s, audio clips/s) and the memory of loading ImageBind-huge.

    python dev/bench/bench_encoder.py                          # tiny preset, random weights, synthetic media
    python dev/bench/bench_encoder.py --preset huge --device cuda --checkpoint ckpt/.../imagebind_huge.pth
    python dev/bench/bench_encoder.py --media-dir ../shared/samples/nextgpt/T_X_pair_data --json bench.json

Throughput is measured three ways per modality: end to end (decode + preprocess + model, as the feature cache
runs), preprocessing alone, and the model alone on preprocessed batches. Without --checkpoint the model has
random weights of the preset's sizes (speed does not depend on the values).

Memory: the peak of `load_imagebind(huge, bf16, vision + audio)` measured in a fresh process when the real file
exists (--huge-checkpoint; CUDA: max allocated; CPU: peak RSS growth, file-backed mmap pages included);
otherwise the parameter bytes of that model built on the meta device, reported as an estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_HUGE = "ckpt/pretrained_ckpt/imagebind_ckpt/huge/imagebind_huge.pth"
EXTENSIONS = {"image": (".jpg", ".jpeg", ".png"), "video": (".mp4",), "audio": (".wav", ".flac")}


def write_synthetic_media(folder: Path, count: int) -> dict[str, list[Path]]:
    """`count` files per modality shaped like the NExT-GPT data: 500x375 JPEG, 10 s 596x336 30 fps H.264,
    10 s 48 kHz stereo WAV."""
    import av
    import numpy as np
    import soundfile
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    media: dict[str, list[Path]] = {"image": [], "video": [], "audio": []}
    for index in range(count):
        image = folder / f"image_{index}.jpg"
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(image, quality=90)
        media["image"].append(image)

        audio = folder / f"audio_{index}.wav"
        seconds = np.arange(48000 * 10) / 48000
        tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * index) * seconds)
        soundfile.write(audio, np.stack([tone, tone[::-1]], axis=1).astype(np.float32), 48000, subtype="PCM_16")
        media["audio"].append(audio)

        video = folder / f"video_{index}.mp4"
        with av.open(str(video), "w") as container:
            stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=30)
            stream.width, stream.height, stream.pix_fmt = 596, 336, "yuv420p"
            base = rng.integers(0, 256, (336, 596, 3), dtype=np.uint8)
            for frame_index in range(300):
                frame = np.roll(base, 2 * frame_index, axis=1)
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        media["video"].append(video)
    return media


def find_media(folder: Path, count: int) -> dict[str, list[Path]]:
    media = {}
    for modality, extensions in EXTENSIONS.items():
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in extensions)
        if not files:
            raise FileNotFoundError(f"{folder}: no {modality} files ({', '.join(extensions)})")
        media[modality] = [files[i % len(files)] for i in range(count)]
    return media


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_throughput(encoder, media: dict[str, list[Path]], batch_size: int, workers: int) -> dict:
    import torch

    from nextgpt.imagebind.encode import preprocessed_batches

    results = {}
    for modality, paths in media.items():
        encoder.encode(paths[:batch_size], modality, batch_size=batch_size, workers=0)  # warm-up
        _sync(encoder.device)
        start = time.perf_counter()
        encoder.encode(paths, modality, batch_size=batch_size, workers=workers)
        _sync(encoder.device)
        end_to_end = time.perf_counter() - start

        start = time.perf_counter()
        batches = list(preprocessed_batches(paths, modality, batch_size, workers))
        preprocess_seconds = time.perf_counter() - start

        _sync(encoder.device)
        start = time.perf_counter()
        for batch in batches:
            encoder.encode_tensors(modality, batch)
        _sync(encoder.device)
        model_seconds = time.perf_counter() - start
        views = batches[0].shape[1] if batches[0].ndim >= 5 else 1
        results[modality] = dict(
            items=len(paths), views_per_item=int(views),
            end_to_end_per_s=len(paths) / end_to_end,
            preprocess_per_s=len(paths) / preprocess_seconds,
            model_per_s=len(paths) / model_seconds)
        del batches
        torch.cuda.empty_cache() if encoder.device.type == "cuda" else None
    return results


def _measure_load(path: str, device: str, preset_name: str = "huge") -> dict:
    """Runs in a fresh process: peak memory of loading `preset_name` in bf16 with vision + audio only."""
    import resource

    import torch

    from nextgpt.imagebind.model import load_imagebind

    def rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def anonymous_rss_bytes() -> int:
        # Resident memory that is not file-backed: the model copy itself, without the mapped checkpoint pages.
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    device = torch.device(device)
    before, anonymous_before = rss_bytes(), anonymous_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = load_imagebind(path, preset_name, device=device, dtype=torch.bfloat16, modalities=("vision", "audio"))
    seconds = time.perf_counter() - start
    result = dict(seconds=seconds, parameter_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                  cpu_peak_rss_growth_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before,
                  cpu_anonymous_rss_growth_after_load_bytes=anonymous_rss_bytes() - anonymous_before)
    if device.type == "cuda":
        result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def bench_huge_memory(checkpoint: Path, device: str, preset_name: str = "huge") -> dict:
    import torch

    from nextgpt.imagebind.model import ImageBindModel, preset

    if checkpoint.is_file():
        run = subprocess.run([sys.executable, __file__, "--measure-load", str(checkpoint), "--device", device,
                              "--preset", preset_name],
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise ValueError(f"{checkpoint}: loading failed: {run.stderr.strip().splitlines()[-1]}")
        result = json.loads(run.stdout.strip().splitlines()[-1])
        result.update(source="measured", checkpoint=str(checkpoint), device=device)
        return result
    with torch.device("meta"):
        model = ImageBindModel(**preset(preset_name), modalities=("vision", "audio"))
    count = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    return dict(source=f"estimated from the parameter count (no checkpoint at {checkpoint})",
                parameters=count, parameter_bytes=(count + buffers) * 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model sizes for the throughput run (default: tiny)")
    parser.add_argument("--checkpoint", help="ImageBind .pth of that preset (default: random weights)")
    parser.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda if available)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--count", type=int, default=8, help="files per modality (default: 8)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="decoding threads (default: 2)")
    parser.add_argument("--media-dir", help="folder searched for .jpg/.mp4/.wav (default: synthetic media)")
    parser.add_argument("--huge-checkpoint", default=DEFAULT_HUGE, help=f"(default: {DEFAULT_HUGE})")
    parser.add_argument("--skip-memory", action="store_true", help="skip the huge-preset load measurement")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--measure-load", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    try:
        import torch

        from nextgpt.imagebind.encode import Encoder
        from nextgpt.runtime import pick_device
        from nextgpt.imagebind.model import ImageBindModel, preset

        if args.measure_load:
            print(json.dumps(_measure_load(args.measure_load, args.device or "cpu", args.preset)))
            return 0
        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        device, dtype, _ = pick_device(args.device, dtype)
        if args.checkpoint:
            encoder = Encoder(args.checkpoint, args.preset, device=device, dtype=dtype)
            weights = args.checkpoint
        else:
            torch.manual_seed(0)
            model = ImageBindModel(**preset(args.preset), modalities=("vision", "audio"))
            encoder = Encoder.from_model(model, device=device, dtype=dtype, name=args.preset)
            weights = "random"
        with tempfile.TemporaryDirectory() as tmp:
            if args.media_dir:
                media = find_media(Path(args.media_dir), args.count)
                media_source = args.media_dir
            else:
                media = write_synthetic_media(Path(tmp), args.count)
                media_source = "synthetic (500x375 jpg, 10 s 596x336 30 fps mp4, 10 s 48 kHz wav)"
            throughput = bench_throughput(encoder, media, args.batch_size, args.workers)
        memory = None if args.skip_memory else bench_huge_memory(ROOT / args.huge_checkpoint
                                                                 if not Path(args.huge_checkpoint).is_absolute()
                                                                 else Path(args.huge_checkpoint), str(device))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    threads = torch.get_num_threads()
    print(f"ImageBind {args.preset} ({weights} weights) on {device} {str(dtype).replace('torch.', '')}, "
          f"{threads} torch threads, batch {args.batch_size}, media: {media_source}")
    names = {"image": "images/s", "video": "videos/s", "audio": "audio clips/s"}
    print(f"{'':14}{'end to end':>12}{'preprocess':>12}{'model':>12}")
    for modality, row in throughput.items():
        print(f"{names[modality]:14}{row['end_to_end_per_s']:12.2f}{row['preprocess_per_s']:12.2f}"
              f"{row['model_per_s']:12.2f}")
    print("(an audio clip = one file: 3 x 2 s spectrograms; a video = 15 views of 2 frames)")
    if memory is not None:
        gib = 1024 ** 3
        if memory["source"] == "measured":
            peak = memory.get("cuda_peak_allocated_bytes", memory["cpu_peak_rss_growth_bytes"])
            kind = "CUDA max allocated" if "cuda_peak_allocated_bytes" in memory else "peak RSS growth"
            print(f"huge, bf16, vision + audio: {kind} {peak / gib:.2f} GiB (parameters "
                  f"{memory['parameter_bytes'] / gib:.2f} GiB; anonymous memory after load "
                  f"{memory['cpu_anonymous_rss_growth_after_load_bytes'] / gib:.2f} GiB), load "
                  f"{memory['seconds']:.1f} s, measured with {memory['checkpoint']}")
            if "cuda_peak_allocated_bytes" not in memory:
                print("  (peak RSS counts the pages of the memory-mapped fp32 file that were read; the OS can "
                      "drop those, they are not allocations)")
        else:
            print(f"huge, bf16, vision + audio: {memory['parameter_bytes'] / gib:.2f} GiB of parameters "
                  f"({memory['parameters'] / 1e6:.1f} M); {memory['source']}")
    if args.json:
        from nextgpt.io import atomic_write_text

        report = dict(preset=args.preset, weights=weights, device=str(device), dtype=str(dtype),
                      torch_threads=threads, batch_size=args.batch_size, media=media_source,
                      throughput=throughput, huge_bf16_vision_audio_load=memory)
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
