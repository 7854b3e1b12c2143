"""The store's format: one manifest per folder (kind, layout, a section per modality) and the identities recorded in
it (caption hash, encoder fingerprint). The layouts themselves: files.py, shards.py; see the package docstring."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nextgpt.io import atomic_write_text

MANIFEST = "manifest.json"
KINDS = ("caption_embeddings", "imagebind_features")
LAYOUTS = ("files", "shards")
SHARD_DIR = "shards"
SHARD_BYTES = 256 << 20          # a shard is written once it holds this many bytes (a kill loses at most one)


class StoreError(ValueError):
    """A store that does not match what the caller needs (shape, encoder, dtype, caption hash) or is damaged."""


def caption_hash(text: str) -> str:
    """What a caption embedding was made from: sha256 of the (normalised) caption, 16 hex digits."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str:
    """Cheap identity of a (multi-GB) checkpoint file: its name, size and sha256 of the first and last MiB."""
    path = Path(path)
    try:
        size = path.stat().st_size
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                digest.update(f.read())
    except OSError:
        return f"{path.name}:absent"
    return f"{path.name}:{size}:{digest.hexdigest()[:16]}"


def item_path(folder: str | Path, name: str) -> Path:
    """Files layout: 001312382.jpg -> <folder>/001312382.jpg.npy."""
    return Path(folder) / f"{Path(name).name}.npy"


def modality_of_name(name: str) -> str | None:
    from nextgpt.modalities import MODALITIES

    ext = Path(name).suffix.lower()
    return next((m for m, spec in MODALITIES.items() if ext in spec.extensions), None)


@dataclass
class Section:
    encoder: str                  # decoder folder / ImageBind checkpoint#preset that produced the vectors
    shape: list[int]              # per item: [77, D], [D] (pooled captions) or [F] (features)
    dtype: str                    # float32 | float16 (what is stored; readers return float32)
    count: int = 0                # items of this modality when the manifest was written
    fingerprint: str = ""         # file_fingerprint of the encoder's weights ("" = not recorded, not checked)
    hashed: bool = False          # caption hashes recorded for every item written by this code


@dataclass
class Manifest:
    kind: str
    store: str = "files"
    modalities: dict[str, Section] = field(default_factory=dict)

    def section(self, modality: str | None = None) -> Section:
        """The modality's section; with None the first one (a feature store has one shape and dtype for every
        modality). StoreError when there is none."""
        section = self.modalities.get(modality) if modality else next(iter(self.modalities.values()), None)
        if section is None:
            raise StoreError(f"{MANIFEST}: no {modality or 'modality'} section in this {self.kind} store")
        return section

    def to_json(self) -> str:
        data = {"kind": self.kind, "store": self.store,
                "modalities": {m: asdict(s) for m, s in sorted(self.modalities.items())}}
        return json.dumps(data, indent=2) + "\n"


def read_manifest(folder: str | Path, kind: str | None = None) -> Manifest | None:
    """The folder's manifest (None when there is none): the one reader of manifest.json, for every layout and
    kind. `kind` given: StoreError when the folder holds another kind. Reads the older forms too: a caption
    manifest without "store", and a feature manifest {kind, encoder, shape, dtype, count} (one section for every
    modality)."""
    from nextgpt.modalities import MODALITIES

    expected, path = kind, Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        kind = data["kind"]
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}, expected one of {', '.join(KINDS)}")
        store = data.get("store", "files")
        if store not in LAYOUTS:
            raise ValueError(f"store {store!r}, expected files or shards")
        if "modalities" in data:
            sections = {m: Section(**s) for m, s in data["modalities"].items()}
        else:                       # the older single-section feature manifest
            section = {k: data[k] for k in ("encoder", "shape", "dtype")}
            sections = {m: Section(**section) for m in MODALITIES}
        manifest = Manifest(kind=kind, store=store, modalities=sections)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise StoreError(f"{path}: not a store manifest ({e})") from None
    if expected is not None and manifest.kind != expected:
        raise StoreError(f"{path}: holds {manifest.kind}, expected {expected}")
    return manifest


def write_manifest(folder: str | Path, manifest: Manifest) -> None:
    """Atomically; not at all when the file already says exactly this (a rerun that did nothing writes nothing)."""
    path, text = Path(folder) / MANIFEST, manifest.to_json()
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    atomic_write_text(path, text)
