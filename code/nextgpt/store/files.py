"""The files layout's caption hashes: `captions-<modality>.tsv` (name TAB hash, compacted by the merge step) plus
the append-only logs `.captions-<modality>.<writer>.log` that writers add to after each batch is in place. The
.npy items themselves are written by nextgpt.store.embed_cache."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from nextgpt.io import atomic_write_text

def _hash_files(folder: Path, modality: str) -> list[Path]:
    """The compacted table first, then the writers' logs oldest first (later lines win)."""
    logs = sorted(folder.glob(f".captions-{modality}.*.log"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    table = folder / f"captions-{modality}.tsv"
    return ([table] if table.exists() else []) + logs


def read_file_hashes(folder: str | Path, modality: str) -> dict[str, str]:
    """name -> caption hash for the files layout. A torn last line of a killed writer's log is ignored (its
    item then has no hash and is recomputed)."""
    out: dict[str, str] = {}
    for path in _hash_files(Path(folder), modality):
        for line in path.read_text().split("\n"):
            name, sep, digest = line.partition("\t")
            if sep and len(digest) == 16:
                out[name] = digest
    return out


def compact_file_hashes(folder: str | Path, modality: str, present: Iterable[str] | None = None) -> None:
    """Fold the logs into captions-<modality>.tsv (atomically), keeping only `present` names when given."""
    folder = Path(folder)
    sources = _hash_files(folder, modality)
    if not any(p.name.endswith(".log") for p in sources) and present is None:
        return                                          # nothing new since the last compaction
    table = read_file_hashes(folder, modality)
    if present is not None:
        keep = set(present)
        table = {n: h for n, h in table.items() if n in keep}
    atomic_write_text(folder / f"captions-{modality}.tsv", "".join(f"{n}\t{h}\n" for n, h in sorted(table.items())))
    for path in sources:
        if path.name.endswith(".log"):
            path.unlink(missing_ok=True)
