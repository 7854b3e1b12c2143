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
The generation itself is nextgpt.model.generate, the same code the web demo (app.py) and evaluate.py run.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nextgpt import config as config_lib
from nextgpt.modalities import MODALITIES, get


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


class Session:
    """The loaded model, the lazily loaded decoders and the output counters of one run."""

    def __init__(self, cfg, checkpoint: Path, out_dir: Path, device, dtype, seed: int):
        from nextgpt.model.generate import Sampling
        from nextgpt.checkpoint.load import load_model
        from nextgpt.model.decoders import Decoders

        self.cfg, self.out_dir, self.seed = cfg, out_dir, seed
        start = time.time()
        self.model, info = load_model(cfg, checkpoint, device, dtype)
        print(f"loaded {cfg.path(cfg.model.llm)} + {info.path} in {time.time() - start:.1f} s", flush=True)
        self.sampling = Sampling.from_config(cfg.inference)
        self.decoders = Decoders(cfg, device=device, dtype=dtype, seed=seed,
                                 on_load=lambda message: print(f"  {message}", flush=True))
        self.requests = 0
        self.counts = {m: 0 for m in MODALITIES}

    def run(self, request: Request) -> dict:
        """Generate for one request, print the reply, write its files; returns {text, files, truncated}."""
        from nextgpt.data.types import Media
        from nextgpt.model.generate import Conversation, decode, generate
        from nextgpt.io import atomic_write_text

        check_media(request)
        media = [Media(modality, str(path.resolve()), path.name) for modality, path in request.media]
        start = time.time()
        conversation = Conversation.of(request.text, media, require=self.cfg.inference.require)
        (reply,) = generate(self.model, [conversation], self.sampling, self.seed)
        # the reply first: a decoder that fails to load or an unwritable --out never loses it
        print(f"assistant: {reply.text}", flush=True)
        for modality in reply.truncated:
            print(f"  note: the {modality} signal block was cut off at max_new_tokens="
                  f"{self.sampling.max_new_tokens}; no {modality} written (raise inference.max_new_tokens)", flush=True)
        for modality in reply.malformed:
            print(f"  note: the {modality} signal tokens came out of order; no {modality} written", flush=True)
        for modality in reply.appended:
            print(f"  note: no {modality} signal block in the reply; one was put at its end (--require)", flush=True)
        reply_path = self.out_dir / f"reply_{self.requests}.txt"
        atomic_write_text(reply_path, reply.text + "\n")
        decode(reply, self.decoders, self.seed, out_dir=self.out_dir, counts=self.counts)
        files = [reply_path] + [output.path for output in reply.outputs]
        for path in files:
            print(f"  wrote {path}", flush=True)
        print(f"  ({time.time() - start:.1f} s)", flush=True)
        self.requests += 1
        return {"text": reply.text, "files": files, "truncated": list(reply.truncated)}


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
    parser.add_argument("--require", action="append", default=[], choices=list(MODALITIES),
                        help="the reply must carry this modality: a block the model did not write is put at the end "
                             "of its answer (repeatable; adds to inference.require)")
    parser.add_argument("--no-force-signal", dest="force_signal", action="store_false", default=None,
                        help="plain decoding: a started signal block may break off (inference.force_signal=false)")
    args = parser.parse_args(argv)
    try:
        from nextgpt.checkpoint.load import checkpoint_info

        cfg = config_lib.from_args(args)
        cfg.inference.require = list(dict.fromkeys([*cfg.inference.require, *args.require]))
        if args.force_signal is not None:
            cfg.inference.force_signal = args.force_signal
        seed = cfg.inference.seed if args.seed is None else args.seed
        checkpoint = Path(args.ckpt) if args.ckpt else cfg.path(cfg.inference.ckpt)
        checkpoint_info(checkpoint)                  # a missing checkpoint fails here, before anything loads
        out_dir = Path(args.out) if args.out else cfg.path(cfg.inference.out_dir)
        request = None
        if args.prompt is not None:
            request = Request(args.prompt, [(m, Path(p).expanduser()) for m in MODALITIES
                                            for p in getattr(args, m)])
            check_media(request)
        elif any(getattr(args, m) for m in MODALITIES):
            raise ValueError("--image/--video/--audio need --prompt (or name media inside interactive lines)")
        from nextgpt.runtime import pick_device

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
