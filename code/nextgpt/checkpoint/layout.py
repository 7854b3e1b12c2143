"""What a checkpoint folder is called and holds, and how a path names one: the file names, `latest`, the original's
pytorch_model.pt, and paths as a checkpoint may record them. Every other checkpoint module imports these from here
(they used to live in delta.py, above fingerprint / legacy / adapter_card that needed them: an import cycle)."""

from __future__ import annotations

import os
from pathlib import Path

from nextgpt.config import REPO_ROOT

DELTA_FILE = "delta.safetensors"
ADAPTER_DIR = "adapter"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
LATEST_FILE = "latest"
LEGACY_FILE = "pytorch_model.pt"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A delta folder: `path` itself, or the sub-folder named in `<path>/latest`."""
    path = Path(path)
    if (path / DELTA_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        name = latest.read_text().strip()
        target = path / name
        if not name or not (target / DELTA_FILE).is_file():
            raise FileNotFoundError(f"{latest}: names {name!r}, which holds no {DELTA_FILE}")
        return target
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    raise FileNotFoundError(f"{path}: neither a delta folder ({DELTA_FILE}) nor a run folder with '{LATEST_FILE}'")


def locate(path: str | os.PathLike) -> tuple[str, Path]:
    """What `path` holds, without reading weights: ("legacy", the original's .pt file) or ("delta", the delta
    folder: `path` or the one its `latest` names). FileNotFoundError naming the path otherwise."""
    path = Path(path)
    if path.is_file() or path.suffix in (".pt", ".pth", ".bin"):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found")
        return "legacy", path
    if not (path / DELTA_FILE).exists() and not (path / LATEST_FILE).exists() and (path / LEGACY_FILE).is_file():
        return "legacy", path / LEGACY_FILE
    return "delta", resolve_checkpoint(path)


def portable_path(value: str | os.PathLike) -> str:
    """A path as it may be written into a checkpoint: relative ones as given, absolute ones relative to the
    repository when inside it, else only the last folder name (a checkpoint never records this machine's layout)."""
    path = Path(value)
    if not path.is_absolute():
        return str(value)
    for root in (REPO_ROOT, REPO_ROOT.resolve()):
        try:
            return str(path.relative_to(root))
        except ValueError:
            continue
    return path.name
