"""YAML mappings -> typed dataclasses, strictly: the machinery behind nextgpt.config.

Unknown keys, wrong types, a choice outside its `Literal`, a fixed-length tuple of the wrong length: each is one
ConfigError line naming the key (and listing what is allowed). A field whose metadata says `setting: False` (e.g.
Config.source) is filled by code, never read from a file or `--set`.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def settings(cls: type) -> dict[str, Any]:
    """{field name: type} of a dataclass's user settings."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.metadata.get("setting", True)}


def read_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """[(file, mapping)] from the root ancestor down to `path`, following `base:` keys."""
    from nextgpt.io import read_yaml

    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain")
    try:
        data = read_yaml(path, "config file not found")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    parents = data.pop("base", None) or []
    if isinstance(parents, str):
        parents = [parents]
    chain: list[tuple[Path, dict[str, Any]]] = []
    for parent in parents:  # several parents merge left to right, e.g. [../stage_1.yaml, base.yaml]
        chain += read_chain(path.parent / parent, seen + (path,))
    return chain + [(path, data)]


def merge(dst: dict[str, Any], src: dict[str, Any], replace_whole: set[str]) -> dict[str, Any]:
    """`src` over `dst`, nested mappings merged key by key except those named in `replace_whole`."""
    out = dict(dst)
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in replace_whole:
            out[k] = merge(out[k], v, replace_whole)
        else:
            out[k] = v
    return out


def build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """A `cls` instance from a mapping, every value checked against its field type."""
    hints = settings(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(hints))}")
    return cls(**{k: coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()})


def coerce(value: Any, typ: Any, where: str) -> Any:
    """Check (and gently convert) `value` against a field type; raise ConfigError on mismatch."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build(typ, value, where)
    if origin is typing.Literal:
        choices = typing.get_args(typ)
        if value in choices and type(value) is type(choices[0]):  # True == 1, so also compare types
            return value
        raise ConfigError(f"{where}: {value!r}; allowed: {', '.join(map(str, choices))}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:  # fixed length, e.g. betas: tuple[float, float]
        items = typing.get_args(typ)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(f"{where}: expected a list of {len(items)} values, got {value!r}")
        return tuple(coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(typ)
        return {str(k): coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {typ}")


def apply_override(root: type, data: dict[str, Any], text: str) -> None:
    """Set `--set a.b=value` in the merged mapping `data`. The path is checked against the schema `root` here,
    so a typo fails with the names allowed at that level; the value is checked when `data` is built.
    Values are parsed as YAML (lists, numbers, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    cls: Any = root
    node = data
    for i, k in enumerate(keys):
        if dataclasses.is_dataclass(cls):
            hints = settings(cls)
            if k not in hints:
                raise ConfigError(f"--set {text}: unknown key {'.'.join(keys[:i + 1])!r}; "
                                  f"allowed here: {', '.join(sorted(hints))}")
            cls = hints[k]
        elif typing.get_origin(cls) is dict:
            cls = typing.get_args(cls)[1]
        else:
            raise ConfigError(f"--set {text}: {'.'.join(keys[:i])} is not a mapping")
        if i == len(keys) - 1:
            node[k] = value
        else:
            node = node.setdefault(k, {})
