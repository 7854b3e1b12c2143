"""Any-to-any generation: prompt (+ image / audio / video) -> text reply and image_*.png / video_*.mp4 / audio_*.wav.

    python code/inference.py --config code/config/stage_3.yaml --prompt "show me a picture of a cat" --out runs/infer
    python code/inference.py --config code/config/stage_3.yaml --image cat.jpg --prompt "what is in the image?"
    python code/inference.py --config code/config/stage_3.yaml            # interactive

Checkpoint (--ckpt, default inference.ckpt of the config): a folder written by train.py (delta.safetensors ...),
its parent holding `latest`, or an original NExT-GPT `pytorch_model.pt` (or a folder holding one).

Interactive mode (no --prompt): one line = one request. A line may name media files either as the original demo
did, `<Image>cat.jpg</Image> what is this?` (also <Video>, <Audio>), or with flags, `--image cat.jpg what is this?`
(quote paths with spaces). Ctrl-D or `exit` ends. Each line is a fresh single-turn prompt.

What is loaded when: the LLM + delta at start; ImageBind only when a request names media; each diffusion pipeline
the first time its signal tokens appear in a reply, then kept. Files: reply_<n>.txt per request and
<modality>_<i>.<ext> per generated medium, numbered within the run, in --out (default inference.out_dir).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nextgpt import config as config_lib  # noqa: E402
from nextgpt.modalities import MODALITIES, get  # noqa: E402


@dataclass
class Request:
    text: str
    media: list[tuple[str, Path]] = field(default_factory=list)     # (modality, path) in the order given


# `<Image>path</Image>` (the original demo's tags), one tag name per modality from the table
_TAG = re.compile(r"<(%s)>(.*?)</\1>" % "|".join(m.capitalize() for m in MODALITIES), re.IGNORECASE | re.DOTALL)
# `--image path` (a path with spaces in quotes); the text keeps its own quotes and apostrophes
_FLAG = re.compile(r"(?:^|(?<=\s))--(%s)\s+(?:\"([^\"]+)\"|'([^']+)'|(\S+))" % "|".join(MODALITIES))
_DANGLING_FLAG = re.compile(r"(?:^|(?<=\s))--(%s)\s*$" % "|".join(MODALITIES))


def parse_line(line: str) -> Request:
    """An interactive line -> Request. Media by tags or --image/--video/--audio flags; the rest is the prompt."""
    media: list[tuple[str, Path]] = []

    def take(modality: str, path: str) -> str:
        media.append((modality.lower(), Path(path.strip()).expanduser()))
        return " "

    text = _TAG.sub(lambda m: take(m.group(1), m.group(2)), line)
    text = _FLAG.sub(lambda m: take(m.group(1), next(g for g in m.group(2, 3, 4) if g is not None)), text)
    if dangling := _DANGLING_FLAG.search(text):
        raise ValueError(f"{dangling.group(0).strip()} needs a file path")
    return Request(" ".join(text.split()), media)


def check_media(request: Request) -> None:
    for modality, path in request.media:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {modality} file not found")
        if path.suffix.lower() not in get(modality).extensions:
            raise ValueError(f"{path}: not a {modality} file (expected one of {', '.join(get(modality).extensions)})")


def pick_device(requested: str | None):
    """Device and dtype, decided once with the reason: bf16 (else fp16) on a GPU, fp32 on the CPU."""
    import torch

    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: no CUDA device is available")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        reason = f"{torch.cuda.get_device_name(device)}: {str(dtype).removeprefix('torch.')}"
    else:
        dtype = torch.float32
        reason = "CPU: float32" + ("" if requested else " (no CUDA device)")
    return device, dtype, reason


class Session:
    """The loaded model, the lazily loaded decoders and the output counters of one run."""

    def __init__(self, cfg, checkpoint, out_dir: Path, device, dtype, seed: int):
        self.cfg, self.out_dir, self.device, self.dtype, self.seed = cfg, out_dir, device, dtype, seed
        self.model = load_model(cfg, checkpoint, device, dtype)
        from nextgpt.model.decoders import Decoders

        self.decoders = Decoders(cfg, device=device, dtype=dtype, seed=seed)
        self.requests = 0
        self.counts = {m: 0 for m in MODALITIES}

    def run(self, request: Request) -> dict:
        """Generate for one request, write its files, print the reply; returns {text, files, truncated}."""
        import torch

        from nextgpt.data.types import Media

        check_media(request)
        media = [Media(modality, str(path.resolve()), path.name) for modality, path in request.media]
        settings = self.cfg.inference
        torch.manual_seed(self.seed)             # the same request + seed -> the same sampled reply
        start = time.time()
        generation = self.model.generate(request.text, media=media, max_new_tokens=settings.max_new_tokens,
                                         temperature=settings.temperature, top_p=settings.top_p,
                                         do_sample=settings.do_sample)
        files: list[Path] = []
        reply_path = self.out_dir / f"reply_{self.requests}.txt"
        from nextgpt.io import atomic_write_text

        print(f"assistant: {generation.text}", flush=True)  # before any write: an unwritable --out never loses it
        atomic_write_text(reply_path, generation.text + "\n")
        files.append(reply_path)
        for modality, conditioning in generation.outputs:      # conditioning (1, T, D) from output_proj[modality]
            if modality not in self.decoders.loaded():
                print(f"  loading the {modality} decoder from {self.decoders.folder(modality)}", flush=True)
            decoded = self.decoders.decode(modality, conditioning)
            path = self.decoders.write(decoded, self.out_dir, self.counts[modality])
            self.counts[modality] += 1
            files.append(path)
        for modality in generation.truncated:
            print(f"  note: the {modality} signal block was cut off at max_new_tokens="
                  f"{settings.max_new_tokens}; no {modality} written (raise inference.max_new_tokens)", flush=True)
        for modality in getattr(generation, "malformed", []):
            print(f"  note: the {modality} signal tokens came out of order; no {modality} written", flush=True)
        for path in files:
            print(f"  wrote {path}", flush=True)
        print(f"  ({time.time() - start:.1f} s)", flush=True)
        self.requests += 1
        return {"text": generation.text, "files": files, "truncated": list(generation.truncated)}


def find_checkpoint(value: str | Path) -> tuple[str, Path]:
    """-> ("legacy", pytorch_model.pt) or ("delta", folder); FileNotFoundError naming the path otherwise."""
    path = Path(value)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found (give --ckpt, or train one: `make stage3`)")
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin"):
        return "legacy", path
    if path.is_dir() and (path / "pytorch_model.pt").is_file() and not (path / "delta.safetensors").exists():
        return "legacy", path / "pytorch_model.pt"
    from nextgpt import checkpoint as checkpoint_lib

    return "delta", checkpoint_lib.resolve_checkpoint(path)


def load_model(cfg, checkpoint: tuple[str, Path], device, dtype):
    """Base LLM + ImageBind-free NextGPT, then the trained delta (ours, strict) or an original pytorch_model.pt."""
    from nextgpt import checkpoint as checkpoint_lib
    from nextgpt.model.nextgpt import build_model

    kind, path = checkpoint
    start = time.time()
    model = build_model(cfg, device=device, dtype=dtype)
    if kind == "legacy":
        checkpoint_lib.import_legacy(model, path)
    else:
        checkpoint_lib.load_delta(model, path)
    model.eval()
    print(f"loaded {cfg.path(cfg.model.llm)} + {path} in {time.time() - start:.1f} s", flush=True)
    return model


def interactive(session: Session, stream=None) -> int:
    stream = stream or sys.stdin
    print("interactive: type a request; name media as <Image>path</Image> or --image path (also video, audio); "
          "`exit` or Ctrl-D to end", flush=True)
    while True:
        print("> ", end="", flush=True)
        line = stream.readline()
        if not line:                     # EOF
            print()
            return 0
        line = line.strip()
        if not stream.isatty():          # piped requests: show them, so the transcript reads as a dialogue
            print(line, flush=True)
        if not line:
            continue
        if line.lower() in ("exit", "quit"):
            return 0
        try:
            request = parse_line(line)
            if not request.text and not request.media:
                continue
            session.run(request)
        except (ValueError, FileNotFoundError) as e:     # a bad line: say so, keep the session
            print(f"error: {e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_config_args(parser)
    parser.add_argument("--ckpt", help="delta folder, or an original pytorch_model.pt (default: inference.ckpt)")
    parser.add_argument("--prompt", help="the request; without it an interactive prompt opens")
    for modality in MODALITIES:
        parser.add_argument(f"--{modality}", action="append", default=[], metavar="PATH",
                            help=f"input {modality} file (repeatable)")
    parser.add_argument("--out", help="output folder (default: inference.out_dir)")
    parser.add_argument("--seed", type=int, help="seed for sampling and the decoders (default: inference.seed)")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    args = parser.parse_args(argv)
    try:
        cfg = config_lib.from_args(args)
        seed = cfg.inference.seed if args.seed is None else args.seed
        checkpoint = find_checkpoint(Path(args.ckpt) if args.ckpt else cfg.path(cfg.inference.ckpt))
        out_dir = Path(args.out) if args.out else cfg.path(cfg.inference.out_dir)
        request = None
        if args.prompt is not None:
            request = Request(args.prompt, [(m, Path(p).expanduser()) for m in MODALITIES
                                            for p in getattr(args, m)])
            check_media(request)
        elif any(getattr(args, m) for m in MODALITIES):
            raise ValueError("--image/--video/--audio need --prompt (or name media inside interactive lines)")
        device, dtype, reason = pick_device(args.device)
        print(f"device: {reason}", flush=True)
        session = Session(cfg, checkpoint, out_dir, device, dtype, seed)
        if request is None:
            return interactive(session)
        session.run(request)
        return 0
    except Exception as e:  # noqa: BLE001 - one `error:` line for every failure (OSError, torch's RuntimeError)
        from nextgpt import cli

        return cli.report(e, "inference")
    except KeyboardInterrupt:                    # Ctrl-C in the interactive prompt: leave quietly
        print()
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
