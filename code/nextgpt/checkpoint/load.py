"""What the inference-side scripts (inference.py, app.py, evaluate.py) load once at start: the device and dtype,
the model with its checkpoint, and a description of that checkpoint for a person.

    device, dtype, reason = runtime.pick_device(args.device)   # decided once (nextgpt.runtime)
    info = checkpoint_info(path)                               # cheap: fails before anything heavy loads
    model, info = load_model(cfg, path, device, dtype)         # then nextgpt.model.generate.generate / stream
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class CheckpointInfo:
    """What was loaded, for a person to read (the app shows it)."""
    path: str
    kind: str                                   # delta | legacy
    stage: int | None = None
    step: int | None = None
    fingerprint: str = ""                       # of the base the delta was trained on, when meta.json records one

    def describe(self) -> str:
        parts = [f"{self.kind} {self.path}"]
        parts += [f"stage {self.stage}"] if self.stage is not None else []
        parts += [f"step {self.step}"] if self.step is not None else []
        parts += [f"base {self.fingerprint}"] if self.fingerprint else []
        return ", ".join(parts)


def checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Cheap (no weights read): FileNotFoundError naming the path when it is not a checkpoint."""
    from nextgpt.checkpoint import delta as checkpoint_lib
    from nextgpt.io import read_json

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found (give --ckpt, or train one: `make stage3`)")
    kind, folder = checkpoint_lib.locate(path)  # the same decision load_checkpoint makes
    if kind == "legacy":
        return CheckpointInfo(str(folder), "legacy")
    meta_path = folder / checkpoint_lib.META_FILE
    meta = read_json(meta_path) if meta_path.is_file() else {}
    fingerprint = meta.get("base_fingerprint") or meta.get("fingerprint") or ""
    if isinstance(fingerprint, dict):             # {part: digest}: one short line
        fingerprint = " ".join(f"{k}={str(v)[:12]}" for k, v in fingerprint.items())
    return CheckpointInfo(str(folder), "delta", meta.get("stage"), meta.get("step"), str(fingerprint))


def load_model(cfg, path: str | Path, device=None, dtype=None):
    """Base LLM + projectors, then the checkpoint (a delta folder, a run folder's `latest`, or an original
    pytorch_model.pt) through checkpoint.load_checkpoint -> (model in eval mode, CheckpointInfo).
    ImageBind loads on the first request with media, the decoders on their first output."""
    from nextgpt.checkpoint import delta as checkpoint_lib
    from nextgpt.model.nextgpt import build_model

    info = checkpoint_info(path)                  # fails fast, before the LLM is read
    model = build_model(cfg, device=device, dtype=dtype)
    checkpoint_lib.load_checkpoint(model, info.path)
    model.eval()
    return model, info
