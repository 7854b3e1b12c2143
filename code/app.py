"""A web demo: chat with a trained NExT-GPT in the browser (Gradio), over the same generation code as inference.py.

    python code/app.py --config code/config/stage_3.yaml [--ckpt DIR] [--host 127.0.0.1] [--port 7860]
    make app CONFIG=tiny                                  # the tiny demo checkpoints, on a CPU

A message may carry image / audio / video files; the reply streams in as text, and the images, videos and sounds
it generates appear inline in the chat and in a download list. The side panel sets sampling (temperature, top-p,
max new tokens, seed) and decoding (diffusion steps, guidance) per request. Several turns are one conversation in
the model's multi-turn template; every attached medium sits at the start of the first human turn, the only place
the template has for media (as in training). "Clear" starts a new conversation.

One process serves one model: it is loaded once at start (ImageBind on the first request with media, each decoder
on its first output), requests wait in Gradio's queue and run one at a time. Uploads and generated files live in a
per-session temporary folder (named by Gradio's session hash), removed when the tab closes or "Clear" is pressed
(and everything when the server stops). It listens on 127.0.0.1 unless --host says otherwise; --share (a public
Gradio link) is never on by default.
"""

import argparse
import atexit
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from nextgpt import config as config_lib
from nextgpt.modalities import MODALITIES

logger = logging.getLogger("nextgpt.app")


def modality_of(path: Path) -> str:
    """The modality an uploaded file's extension names; ValueError listing what is accepted otherwise."""
    for modality in MODALITIES.values():
        if path.suffix.lower() in modality.extensions:
            return modality.name
    accepted = ", ".join(e for m in MODALITIES.values() for e in m.extensions)
    raise ValueError(f"{path.name}: unsupported file type (accepted: {accepted})")


@dataclasses.dataclass
class ChatState:
    """One browser session: the conversation so far, its media and its temporary folder."""
    folder: Path
    turns: list = dataclasses.field(default_factory=list)          # nextgpt.data.types.Turn, human/gpt/...
    media: list = dataclasses.field(default_factory=list)          # nextgpt.data.types.Media, in upload order
    files: list[str] = dataclasses.field(default_factory=list)     # generated files, for the download list
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class Server:
    """The loaded model and decoders, shared by every session; `respond` is the chat handler."""

    def __init__(self, cfg, model, info, decoders, root: Path):
        self.cfg, self.model, self.info, self.decoders, self.root = cfg, model, info, decoders, root
        self.busy = threading.Lock()          # the model and the decoders' schedulers serve one request at a time

    def folder(self, session: str | None) -> Path:
        """The temporary folder of a browser session (Gradio's session hash), or a fresh one."""
        name = "".join(c for c in session or "" if c.isalnum() or c in "-_") or uuid.uuid4().hex[:12]
        return self.root / name

    def new_state(self, session: str | None = None) -> ChatState:
        folder = self.folder(session)
        folder.mkdir(parents=True, exist_ok=True)
        return ChatState(folder)

    def end_session(self, session: str | None) -> None:
        """The browser tab closed: its uploads and generated files go at once."""
        if session:
            shutil.rmtree(self.folder(session), ignore_errors=True)

    def take_uploads(self, state: ChatState, paths: list[str]) -> list:
        """Copy uploads into the session folder after checking each decodes -> Media; ValueError otherwise."""
        from nextgpt.data.types import Media
        from nextgpt.data.file_checks import check_media

        media = []
        for name in paths:
            source = Path(name)
            modality = modality_of(source)
            target = state.folder / f"upload_{len(state.media) + len(media)}{source.suffix.lower()}"
            shutil.copyfile(source, target)
            problem = check_media(target, modality)        # the decoding training uses: corrupt, empty, no frames
            if problem is not None:
                target.unlink(missing_ok=True)
                raise ValueError(problem[1].replace(str(target), source.name))
            media.append(Media(modality, str(target), target.name))
        return media

    def respond(self, message: dict, history: list, state: ChatState | None, temperature: float, top_p: float,
                max_new_tokens: float, steps: float, guidance: float, seed: float, session: str | None = None):
        """Gradio generator: yields (textbox, chat history, state, download list) as the reply streams in."""
        from nextgpt.data.types import Turn
        from nextgpt.model.generate import Conversation, Reply, Sampling, stream

        state = state or self.new_state(session)
        text = (message or {}).get("text", "").strip()
        uploads = list((message or {}).get("files") or [])
        if not text and not uploads:
            yield None, history, state, state.files
            return
        history = list(history) + [{"role": "user", "content": {"path": p}} for p in uploads]
        history.append({"role": "user", "content": text or "(no text)"})
        reply_text = ""
        try:
            new_media = self.take_uploads(state, uploads)
            sampling = Sampling(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                top_p=float(top_p), do_sample=self.cfg.inference.do_sample,
                                force_signal=self.cfg.inference.force_signal)
            settings = {m: dataclasses.replace(self.cfg.inference.decoding(m), steps=int(steps),
                                               guidance=float(guidance)) for m in MODALITIES}
            conversation = Conversation(state.turns + [Turn("human", text)], state.media + new_media,
                                        tuple(self.cfg.inference.require))
            history.append({"role": "assistant", "content": "…"})
            yield {"text": "", "files": []}, history, state, state.files
            start = time.time()
            items = stream(self.model, conversation, sampling, int(seed), decoders=self.decoders,
                           decoder_settings=settings, out_dir=state.folder, counts=state.counts)
            while True:
                # One request's model work at a time, also after Gradio gave up on a request whose client left:
                # the step it was running (a diffusion decode) goes on in its worker thread, and a second request
                # stepping the same pipeline's scheduler meanwhile failed (IndexError in PNDM, app load test).
                with self.busy:
                    item = next(items, None)
                if item is None:
                    raise RuntimeError("generation ended without a reply")
                if isinstance(item, Reply):
                    reply = item
                    break
                reply_text += item
                history[-1] = {"role": "assistant", "content": readable(reply_text, self.model) or "…"}
                yield {"text": "", "files": []}, history, state, state.files
        except Exception as e:      # a bad request must not stop the server: the error goes to the chat, the log
            logger.warning("request failed: %s", e, exc_info=not isinstance(e, (ValueError, OSError)))
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            history = [h for h in history if h.get("content") != "…"]
            history.append({"role": "assistant", "content": f"⚠️ error: {first}"})
            yield {"text": text, "files": []}, history, state, state.files
            return
        # the request succeeded: it joins the conversation
        state.turns = conversation.turns + [reply.as_turn()]
        state.media = conversation.media
        history[-1] = {"role": "assistant", "content": reply.display_text or "(no text)"}
        for output in reply.outputs:
            history.append({"role": "assistant", "content": {"path": str(output.path)}})
            state.files.append(str(output.path))
        notes = [f"the {m} signal block was cut off by max new tokens" for m in reply.truncated]
        notes += [f"the {m} signal tokens came out of order" for m in reply.malformed]
        if notes:
            history.append({"role": "assistant", "content": "ℹ️ " + "; ".join(notes) + " (no " +
                            ", ".join(reply.truncated + reply.malformed) + " generated)"})
        logger.info("reply in %.1f s: %d chars, outputs %s", time.time() - start, len(reply.display_text),
                    [o.modality for o in reply.outputs])
        yield {"text": "", "files": []}, history, state, list(state.files)

    def clear(self, state: ChatState | None, session: str | None = None):
        if state is not None:
            state.remove()
        return [], self.new_state(session), []


def readable(text: str, model) -> str:
    """Streamed text as a person reads it: cut at the stop string, without signal-token strings."""
    text = text.split(model.stop)[0].rstrip(model.stop[:1])          # a half-generated "##" too
    for ids in model.token_ids.signal.values():
        for token in model.tokenizer.convert_ids_to_tokens(ids):
            text = text.replace(token, "")
    return " ".join(text.split())


def build_ui(server: Server, cfg):
    import gradio as gr

    extensions = [e for m in MODALITIES.values() for e in m.extensions]
    image = cfg.inference.decoding("image")
    # delete_cache: Gradio's own copies of uploads older than a day go, checked hourly (sessions clean up after themselves)
    with gr.Blocks(title="NExT-GPT", delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"### NExT-GPT chat\nCheckpoint: `{server.info.describe()}` · LLM: `{cfg.model.llm}`",
                    elem_id="checkpoint")
        state = gr.State(value=None, delete_callback=lambda s: s.remove() if s is not None else None)
        with gr.Row():
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(label="conversation", height=520, allow_file_downloads=True,
                                     elem_id="chat")
                textbox = gr.MultimodalTextbox(file_types=extensions, file_count="multiple", elem_id="message",
                                               show_label=False,
                                               placeholder="Type a message; attach an image, audio or video …")
                clear = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=1):
                temperature = gr.Slider(0.05, 2.0, value=max(cfg.inference.temperature, 0.05), step=0.05,
                                        label="temperature")
                top_p = gr.Slider(0.05, 1.0, value=cfg.inference.top_p, step=0.05, label="top-p")
                max_new_tokens = gr.Slider(1, 1024, value=cfg.inference.max_new_tokens, step=1,
                                           label="max new tokens")
                steps = gr.Slider(1, 200, value=image.steps, step=1, label="decoder steps")
                guidance = gr.Slider(1.0, 20.0, value=image.guidance, step=0.5, label="guidance")
                seed = gr.Number(value=cfg.inference.seed, precision=0, label="seed")
                downloads = gr.File(label="generated files", file_count="multiple", interactive=False,
                                    elem_id="downloads")
        inputs = [textbox, chatbot, state, temperature, top_p, max_new_tokens, steps, guidance, seed]

        # Gradio passes the request (its session hash names the session's folder) to a parameter annotated so
        def respond(message, history, value, temperature, top_p, max_new_tokens, steps, guidance, seed,
                    request: gr.Request):
            yield from server.respond(message, history, value, temperature, top_p, max_new_tokens, steps, guidance,
                                      seed, session=request.session_hash)

        def clear_chat(value, request: gr.Request):
            return server.clear(value, session=request.session_hash)

        def unload(request: gr.Request):
            server.end_session(request.session_hash)

        textbox.submit(respond, inputs, [textbox, chatbot, state, downloads])
        clear.click(clear_chat, [state], [chatbot, state, downloads])
        demo.unload(unload)       # the tab closed: its folder goes now (Gradio drops the state itself an hour later)
    return demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_config_args(parser)
    parser.add_argument("--ckpt", help="delta folder, run folder, or an original pytorch_model.pt "
                                       "(default: inference.ckpt)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio link (off by default)")
    parser.add_argument("--max-file-size", default="200mb",
                        help="largest upload Gradio accepts, e.g. 200mb, 64kb, 5000b (default 200mb); a larger one "
                             "is refused with a message")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    args = parser.parse_args(argv)
    try:
        from nextgpt.checkpoint.load import checkpoint_info, load_model
        from nextgpt.runtime import pick_device

        cfg = config_lib.from_args(args)
        checkpoint = Path(args.ckpt) if args.ckpt else cfg.path(cfg.inference.ckpt)
        checkpoint_info(checkpoint)              # a missing checkpoint fails here, before anything loads
        device, dtype, reason = pick_device(args.device)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)          # Gradio polls itself at start
    root = Path(tempfile.mkdtemp(prefix="nextgpt-app-"))
    atexit.register(shutil.rmtree, root, True)
    # SIGTERM (a service manager, a test) leaves through SystemExit, so atexit removes the session files too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    print(f"session files under {root} (removed at exit)", flush=True)

    # Gradio's own upload cache goes under the same folder; no analytics calls from a machine that may be offline
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr

        from nextgpt.model.decoders import Decoders

        print(f"device: {reason}", flush=True)
        start = time.time()
        model, info = load_model(cfg, checkpoint, device, dtype)
        print(f"loaded {info.describe()} in {time.time() - start:.1f} s", flush=True)
        decoders = Decoders(cfg, device=device, dtype=dtype, seed=cfg.inference.seed,
                            on_load=lambda message: print(message, flush=True))
        server = Server(cfg, model, info, decoders, root / "sessions")
        demo = build_ui(server, cfg)
        # one request at a time: one model, and a request's seed must not be disturbed by another's sampling
        demo.queue(default_concurrency_limit=1)
        system_fonts = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                         font_mono=["ui-monospace", "monospace"])       # no web-font downloads
        print(f"serving on http://{args.host}:{args.port}", flush=True)
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False,
                    allowed_paths=[str(root)], theme=system_fonts, quiet=True, max_file_size=args.max_file_size)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print()
        return 130
    return 0


if __name__ == "__main__":
    from nextgpt.cli import run as run_cli  # any failure: one `error:` line, the traceback in a log it names

    raise SystemExit(run_cli(main, "app"))
