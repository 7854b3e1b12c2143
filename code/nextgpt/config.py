"""One typed configuration for every script.

A stage YAML names its parent (``base: base.yaml``) and lists only what differs; ``--set a.b=value`` overrides
come last. Unknown keys and wrong types are errors at start, never silently ignored. Relative paths inside a
config resolve against the repository root (the folder holding ``code/``), so scripts work from any directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 32
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class OutputProjConfig:
    # transformer: Linear(D_llm->d_model) -> nn.Transformer(enc+dec, pre-norm) with learned queries -> Linear
    # linear: Linear(D_llm->out_dim) per signal token, then resampled to the decoder's token count
    # qformer: transformers' Blip2QFormerModel
    mode: str = "transformer"
    d_model: int = 512
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    num_heads: int = 4
    dim_feedforward: int = 2048
    dropout: float = 0.0


@dataclass
class ModelConfig:
    llm: str = "ckpt/pretrained_ckpt/vicuna_ckpt/7b_v0"
    imagebind: str = "ckpt/pretrained_ckpt/imagebind_ckpt/huge/imagebind_huge.pth"
    imagebind_preset: str = "huge"          # huge | tiny (parity fixture sizes) | any name in imagebind/model.py
    # Diffusion decoders, one folder per modality (diffusers save_pretrained layout). Their text encoders
    # define the conditioning shape each output projector must produce.
    decoders: dict[str, str] = field(default_factory=lambda: {
        "image": "ckpt/pretrained_ckpt/stable-diffusion-v1-5",
        "video": "ckpt/pretrained_ckpt/zeroscope_v2_576w",
        "audio": "ckpt/pretrained_ckpt/audioldm-l-full",
    })
    modalities: list[str] = field(default_factory=lambda: ["image", "video", "audio"])
    output_proj: OutputProjConfig = field(default_factory=OutputProjConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: str = "none"              # none | 8bit | 4bit (bitsandbytes; fine-tuning)
    hidden_layer: int = -1                  # LLM hidden_states index fed to the output projectors
    max_length: int = 512                   # text tokens per sample, signal blocks never cut
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    root: str = "data"                      # data root; catalog paths are relative to it
    catalog: str = "code/config/catalog.yaml"
    embed_dir: str = "data/embed"           # caption embeddings <media name>.npy (+ manifest.json)
    feature_dir: str = "data/features"      # ImageBind features <media name>.npy (+ manifest.json)
    datasets: list[str] = field(default_factory=list)
    eval_datasets: list[str] = field(default_factory=list)
    eval_fraction: float = 0.0              # held out of `datasets` when eval_datasets is empty
    group_by_length: bool = False
    # round_robin: every micro-batch from one dataset, datasets in turn (the original) | mixed: one shuffled mixture
    mixture: str = "round_robin"
    num_workers: int = 0
    skip_bad_records: bool = False          # count and skip instead of failing on a bad record
    validate: bool = True                   # cheap validation before training


@dataclass
class TrainConfig:
    stage: int = 1
    # what trains: any of input_proj, output_proj, lora; token rows are controlled by token_rows
    trainable: list[str] = field(default_factory=lambda: ["input_proj"])
    token_rows: str = "new"                 # new (the 38 added rows) | all (original behaviour) | none
    # loss weights: "lm" and one per modality for the caption-embedding alignment loss
    loss_weights: dict[str, float] = field(default_factory=lambda: {"lm": 1.0})
    alignment_loss: str = "l2"              # l2 (mean per-token Euclidean distance, as the original) | mse
    prompt: str = "generate a caption"      # stage-1 instruction text
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr: float = 5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.001
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8                       # AdamW epsilon (the original: 1e-8)
    warmup_steps: int = 10
    max_steps: int = 0                      # 0: epochs x steps per epoch
    epochs: int = 1
    grad_clip: float = 1.0
    seed: int = 13
    output_dir: str = "ckpt/delta_ckpt/nextgpt/7b_tiva_v0/stage_1"
    init_from: str = ""                     # previous stage's checkpoint dir, or an original pytorch_model.pt
    save_every: int = 0                     # steps; 0: only at the end
    keep_last: int = 2
    eval_every: int = 0
    log_every: int = 5
    max_bad_steps: int = 10                 # non-finite losses tolerated before aborting
    optimizer_8bit: bool = False            # bitsandbytes AdamW8bit (fine-tuning)
    tensorboard: bool = True


@dataclass
class InferenceConfig:
    max_new_tokens: int = 150
    temperature: float = 0.4
    top_p: float = 1.0
    do_sample: bool = True
    seed: int = 13
    out_dir: str = "runs/inference"
    ckpt: str = "ckpt/delta_ckpt/nextgpt/7b_tiva_v0/stage_3"
    # decoder settings per modality
    image_steps: int = 50
    image_guidance: float = 7.5
    image_height: int = 512
    image_width: int = 512
    video_steps: int = 50
    video_guidance: float = 7.5
    video_height: int = 320
    video_width: int = 576
    video_frames: int = 24
    video_fps: int = 8
    audio_steps: int = 50
    audio_guidance: float = 7.5
    audio_seconds: float = 9.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    # Filled by load(): where the config came from (not a user setting).
    source: str = ""

    def path(self, value: str) -> Path:
        """Resolve a path written in a config against the repository root (absolute paths pass through)."""
        return resolve_path(value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def resolve_path(value: str | os.PathLike) -> Path:
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else REPO_ROOT / p


# ----------------------------------------------------------------------------------------------------------------
# Loading and strict merging

def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """[(file, mapping)] from the root ancestor down to `path`, following `base:` keys."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain")
    data = _read_yaml(path)
    parents = data.pop("base", None) or []
    if isinstance(parents, str):
        parents = [parents]
    chain: list[tuple[Path, dict[str, Any]]] = []
    for parent in parents:  # several parents merge left to right, e.g. [../stage_1.yaml, base.yaml]
        chain += _chain(path.parent / parent, seen + (path,))
    return chain + [(path, data)]


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check (and gently convert) `value` against a dataclass field type; raise ConfigError on mismatch."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(typ, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(typ)
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
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
        if isinstance(value, str):  # YAML reads 5e-4 as a string
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


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    out = dict(dst)
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in _REPLACE_WHOLE:
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# Mappings that a child config replaces rather than merges (a stage lists its full loss table).
_REPLACE_WHOLE = {"loss_weights"}


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 1e-4). Values are parsed as YAML (lists, numbers, booleans)."""
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
    return keys, value


def _apply_override(data: dict[str, Any], keys: list[str], value: Any, text: str) -> None:
    # Validate the path against the schema so a typo fails with the allowed names.
    cls: Any = Config
    node = data
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if dataclasses.is_dataclass(cls):
            hints = typing.get_type_hints(cls)
            if k not in hints or k == "source":
                allowed = ", ".join(sorted(n for n in hints if n != "source"))
                raise ConfigError(f"--set {text}: unknown key {'.'.join(keys[:i + 1])!r}; allowed here: {allowed}")
            cls = hints[k]
        elif typing.get_origin(cls) is dict:
            cls = typing.get_args(cls)[1]
        else:
            raise ConfigError(f"--set {text}: {'.'.join(keys[:i])} is not a mapping")
        if last:
            node[k] = value
        else:
            node = node.setdefault(k, {})


def load(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load base + stage YAML (+ `--set` overrides) into a validated Config."""
    merged: dict[str, Any] = {}
    source = ""
    if path is not None:
        for _, data in _chain(Path(path)):
            merged = _merge(merged, data)
        source = str(Path(path).resolve())
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(merged, keys, value, text)
    cfg = _build(Config, merged, "")
    cfg.source = source
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    from nextgpt.modalities import MODALITIES

    for m in cfg.model.modalities:
        if m not in MODALITIES:
            raise ConfigError(f"model.modalities: unknown modality {m!r}; known: {', '.join(MODALITIES)}")
    allowed_trainable = {"input_proj", "output_proj", "lora"}
    bad = set(cfg.train.trainable) - allowed_trainable
    if bad:
        raise ConfigError(f"train.trainable: unknown {sorted(bad)}; allowed: {sorted(allowed_trainable)}")
    if cfg.train.epochs < 1:  # 0 epochs would silently train nothing; --max-steps 0 is the way to train nothing
        raise ConfigError(f"train.epochs: must be at least 1, got {cfg.train.epochs} "
                          "(--max-steps 0 trains zero steps)")
    if cfg.train.max_steps < 0:
        raise ConfigError(f"train.max_steps: must be >= 0 (0: train.epochs x steps per epoch), "
                          f"got {cfg.train.max_steps}")
    if "lora" in cfg.train.trainable and not cfg.model.lora.enabled:
        raise ConfigError("train.trainable lists lora but model.lora.enabled is false")
    if cfg.train.token_rows not in ("new", "all", "none"):
        raise ConfigError(f"train.token_rows: {cfg.train.token_rows!r}; allowed: new, all, none")
    if cfg.train.alignment_loss not in ("l2", "mse"):
        raise ConfigError(f"train.alignment_loss: {cfg.train.alignment_loss!r}; allowed: l2, mse")
    if cfg.model.output_proj.mode not in ("transformer", "linear", "qformer"):
        raise ConfigError(f"model.output_proj.mode: {cfg.model.output_proj.mode!r}; "
                          "allowed: transformer, linear, qformer")
    if cfg.data.mixture not in ("round_robin", "mixed"):
        raise ConfigError(f"data.mixture: {cfg.data.mixture!r}; allowed: round_robin, mixed")
    if cfg.model.quantization not in ("none", "8bit", "4bit"):
        raise ConfigError(f"model.quantization: {cfg.model.quantization!r}; allowed: none, 8bit, 4bit")
    bad_w = set(cfg.train.loss_weights) - {"lm", *MODALITIES}
    if bad_w:
        raise ConfigError(f"train.loss_weights: unknown term(s) {sorted(bad_w)}; allowed: lm, {', '.join(MODALITIES)}")
    for m in cfg.model.decoders:
        if m not in MODALITIES:
            raise ConfigError(f"model.decoders: unknown modality {m!r}")


def save(cfg: Config, path: str | os.PathLike) -> None:
    from nextgpt.io import atomic_write_text

    atomic_write_text(path, cfg.dump())


def add_config_args(parser: Any, default: str | None = None) -> None:
    """The --config / --set pair every script takes."""
    parser.add_argument("--config", default=default, required=default is None,
                        help="stage YAML (names its parent with 'base:')")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")


def from_args(args: Any) -> Config:
    return load(args.config, args.overrides)


def to_json(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=2)
