"""The dataset catalog: original NExT-GPT dataset names (cc3m_enc, audio_instruction, ...) -> files on disk.

`code/config/catalog.yaml` (cfg.data.catalog) lists, per name, a role (enc / dec / instruction), candidate JSON
files relative to cfg.data.root (first existing wins: legacy layout first, new layout second), optional media
folders and an optional embedding folder. The seed's `T-X_pair_data` and the repository's `T_X_pair_data` are
both accepted through the `aliases` table of the YAML.

    entry = resolve(cfg, "cc3m_enc")     # -> CatalogEntry(file=.../cc3m.json, role="enc", ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nextgpt.io import read_yaml
from nextgpt.modalities import MODALITIES

ROLES = ("enc", "dec", "instruction")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    role: str                               # enc | dec | instruction
    file: Path                              # the JSON that is read (first existing candidate)
    candidates: tuple[Path, ...]            # every path that was tried, in order (aliases included)
    modality: str | None                    # pair / comprehension / generation files: their modality
    media_dirs: dict[str, Path] = field(default_factory=dict)   # modality -> folder of input media
    embed_dir: Path = Path(".")             # caption embeddings <embed_dir>/<media name>.npy


def load_catalog(path: str | Path) -> dict[str, Any]:
    """The raw YAML mapping {aliases: {...}, datasets: {name: spec}}, checked for shape."""
    path = Path(path)
    data = read_yaml(path, "dataset catalog not found (data.catalog)")
    if not isinstance(data.get("datasets"), dict):
        raise ValueError(f"{path}: expected a mapping with a 'datasets:' mapping")
    unknown = set(data) - {"aliases", "datasets"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {sorted(unknown)}; allowed: aliases, datasets")
    for name, spec in data["datasets"].items():
        where = f"{path}: dataset {name}"
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: expected a mapping")
        bad = set(spec) - {"role", "files", "modality", "media", "embed_dir"}
        if bad:
            raise ValueError(f"{where}: unknown key(s) {sorted(bad)}; allowed: role, files, modality, media, embed_dir")
        if spec.get("role") not in ROLES:
            raise ValueError(f"{where}: role {spec.get('role')!r}; allowed: {', '.join(ROLES)}")
        files = spec.get("files")
        if isinstance(files, str):
            spec["files"] = [files]
        elif not (isinstance(files, list) and files and all(isinstance(f, str) for f in files)):
            raise ValueError(f"{where}: 'files' must be a path or a non-empty list of paths")
        if spec.get("modality") is not None and spec["modality"] not in MODALITIES:
            raise ValueError(f"{where}: modality {spec['modality']!r}; known: {', '.join(MODALITIES)}")
        if spec["role"] in ("enc", "dec") and spec.get("modality") is None:
            raise ValueError(f"{where}: role {spec['role']} needs 'modality'")
        for m in spec.get("media") or {}:
            if m not in MODALITIES:
                raise ValueError(f"{where}: media folder for unknown modality {m!r}")
    aliases = data.get("aliases") or {}
    if not isinstance(aliases, dict):
        raise ValueError(f"{path}: 'aliases' must map a folder name to a list of alternative names")
    return data


def _catalog(cfg) -> dict[str, Any]:
    return load_catalog(cfg.path(cfg.data.catalog))


def names(cfg) -> list[str]:
    """Every dataset name of the configured catalog, in catalog order."""
    return list(_catalog(cfg)["datasets"])


def _spellings(rel: str, aliases: dict[str, list[str]]) -> list[str]:
    """`rel` and the same path with its first component replaced by each alias."""
    first, _, rest = rel.replace("\\", "/").partition("/")
    out = [rel]
    for alt in aliases.get(first) or []:
        out.append(f"{alt}/{rest}" if rest else alt)
    return out


def resolve(cfg, name: str, require_file: bool = True) -> CatalogEntry:
    """The catalog entry `name` with absolute paths; unknown name or (with require_file) no existing file -> error."""
    catalog = _catalog(cfg)
    datasets = catalog["datasets"]
    if name not in datasets:
        raise ValueError(f"unknown dataset {name!r} in {cfg.path(cfg.data.catalog)}; known: {', '.join(datasets)}")
    spec = datasets[name]
    root = cfg.path(cfg.data.root)
    aliases = catalog.get("aliases") or {}
    candidates: list[Path] = []
    for rel in spec["files"]:
        for spelled in _spellings(rel, aliases):
            p = root / spelled
            if p not in candidates:
                candidates.append(p)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None and require_file:
        raise FileNotFoundError(f"dataset {name}: none of its files exists under {root}; tried: "
                                + ", ".join(str(p.relative_to(root)) for p in candidates))
    file = found or candidates[0]
    media_dirs = default_media_dirs(file)
    for m, folder in (spec.get("media") or {}).items():
        # The same spelling tolerance as the JSON: the first existing spelling, else the one written.
        options = [root / s for s in _spellings(folder, aliases)]
        media_dirs[m] = next((p for p in options if p.is_dir()), options[0])
    embed_dir = cfg.path(spec["embed_dir"]) if spec.get("embed_dir") else cfg.path(cfg.data.embed_dir)
    return CatalogEntry(name=name, role=spec["role"], file=file, candidates=tuple(candidates),
                        modality=spec.get("modality"), media_dirs=media_dirs, embed_dir=embed_dir)


def spelled_path(path: str | Path, catalog_path: str | Path | None = None) -> Path:
    """A path given on the command line, with the catalog's folder aliases applied (`T-X_pair_data` <->
    `T_X_pair_data`): `path` when it exists, else the first existing respelling of one of its folders, else `path`.
    catalog_path: the catalog whose `aliases` apply (default code/config/catalog.yaml)."""
    path = Path(path)
    if path.exists():
        return path
    from nextgpt.config import REPO_ROOT

    aliases = load_catalog(catalog_path or REPO_ROOT / "code" / "config" / "catalog.yaml").get("aliases") or {}
    parts = path.parts
    for i, part in enumerate(parts):
        for alt in aliases.get(part) or []:
            candidate = Path(*parts[:i], alt, *parts[i + 1:])
            if candidate.exists():
                return candidate
    return path


def default_media_dirs(json_path: str | Path) -> dict[str, Path]:
    """Media folders beside a JSON file, as the NExT-GPT layout has them (cc3m/images, MosIT_data/videos, ...)."""
    parent = Path(json_path).resolve().parent
    return {m.name: parent / m.media_folder for m in MODALITIES.values()}
