"""One typed configuration for every script.

A stage YAML names its parent (``base: base.yaml``) and lists only what differs; ``--set a.b=value`` overrides
come last. Unknown keys and wrong types are errors at start, never silently ignored. Relative paths inside a
config resolve against the repository root (the folder holding ``code/``), so scripts work from any directory.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from nextgpt import typed
from nextgpt.typed import ConfigError  # noqa: F401  (callers catch config.ConfigError)

REPO_ROOT = Path(__file__).resolve().parents[2]


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
    mode: Literal["transformer", "linear", "qformer"] = "transformer"
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
        "image": "ckpt/pretrained_ckpt/stable-diffusion-v1-5",   # runwayml/stable-diffusion-v1-5 -> (77, 768)
        "video": "ckpt/pretrained_ckpt/zeroscope_v2_576w",       # cerspense/zeroscope_v2_576w    -> (77, 1024)
        "audio": "ckpt/pretrained_ckpt/audioldm-l-full",         # cvssp/audioldm-l-full          -> (1, 512)
    })
    modalities: list[str] = field(default_factory=lambda: ["image", "video", "audio"])
    output_proj: OutputProjConfig = field(default_factory=OutputProjConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: Literal["none", "8bit", "4bit"] = "none"  # bitsandbytes; fine-tuning
    template: Literal["vicuna_v0", "chat"] = "vicuna_v0"  # vicuna_v0: the original's ### format | chat: the tokenizer's
    hidden_layer: int = -1                  # LLM hidden_states index fed to the output projectors
    max_length: int = 512                   # text ids after the prompt prefix, as the original; blocks never cut
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
    mixture: Literal["round_robin", "mixed"] = "round_robin"
    num_workers: int = 0
    skip_bad_records: bool = False          # count and skip instead of failing on a bad record
    # caption embeddings / features: files (<name>.npy, the seed's layout) | shards (memory-mapped, nextgpt/store/)
    store: Literal["files", "shards"] = "files"
    # precomputed (read from embed_dir) | online (the decoders' frozen text encoders inside the training step)
    caption_embeds: Literal["precomputed", "online"] = "precomputed"
    validate: bool = True                   # cheap validation before training


@dataclass
class TrainConfig:
    stage: int = 1
    # what trains: any of input_proj, output_proj, lora; token rows are controlled by token_rows
    trainable: list[Literal["input_proj", "output_proj", "lora"]] = field(default_factory=lambda: ["input_proj"])
    token_rows: Literal["new", "all", "none"] = "new"  # new: the 38 added rows | all: the original's whole matrices
    # loss weights: "lm", one per modality for the caption-embedding alignment loss, and gen_<modality> for the
    # denoising loss through that modality's frozen decoder (model/denoising.py; 0 or absent: off, nothing loaded)
    loss_weights: dict[str, float] = field(default_factory=lambda: {"lm": 1.0})
    snr_gamma: float = 5.0                  # min-SNR-gamma weighting of the denoising loss (2303.09556); 0: off
    alignment_loss: Literal["l2", "mse"] = "l2"  # l2: mean per-token Euclidean distance, as the original
    # run each row's prefix (before its first input that depends on a trainable parameter: a signal block, <Img>,
    # a soft token) under no_grad with a KV cache, and only the rest with gradients; exact, falls back by itself
    # when the LLM body trains (LoRA) or gradient checkpointing is on, and on a GPU where the passes would be
    # weight-read-bound (small micro-batches: model/suffix.worth_splitting)
    suffix_backward: bool = True
    prompt: str = "generate a caption"      # stage-1 instruction text
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr: float = 5e-4                        # WarmupDecayLR peak, as the original
    min_lr: float = 0.0
    weight_decay: float = 0.001
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8                       # AdamW epsilon (the original: 1e-8)
    warmup_steps: int = 10
    max_steps: int = 0                      # 0: epochs x steps per epoch
    epochs: int = 1
    grad_clip: float = 1.0
    seed: int = 13
    output_dir: str = "ckpt/delta_ckpt/nextgpt/7b_tiva_v0/stage_1"
    init_from: str = ""                     # previous stage's checkpoint dir, or an original pytorch_model.pt
    allow_other_base: bool = False          # load a delta whose meta.json base fingerprint differs (checkpoint/fingerprint)
    save_every: int = 0                     # steps; 0: only at the end
    keep_last: int = 2
    eval_every: int = 0
    eval_generate: int = 0                  # at each eval: decode N held-out requests per modality -> TensorBoard
    log_every: int = 5
    max_bad_steps: int = 10                 # non-finite losses tolerated before aborting
    # seconds a collective waits for a rank that stopped answering (killed, its node gone) before every other
    # rank stops with one line naming it (nextgpt.training.peers); DeepSpeed's default is 10 min, gloo's 30
    dist_timeout: float = 180.0
    optimizer_8bit: bool = False            # bitsandbytes AdamW8bit (fine-tuning)
    # learning rate per module group (input_proj, output_proj, lora, token_rows); a group not named uses train.lr
    module_lr: dict[str, float] = field(default_factory=dict)
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=lambda: ["tensorboard"])  # trackers


def _check_decoding(settings, where: str, positive: tuple[str, ...]) -> None:
    """Sizes and steps > 0, image sizes divisible by 8 (the VAE downsamples by 8): checked where the value is made."""
    for name in positive:
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{where}.{name}: must be > 0, got {getattr(settings, name)!r}")
    for name in ("height", "width"):
        if name in positive and getattr(settings, name) % 8:
            raise ConfigError(f"{where}.{name}: must be a multiple of 8, got {getattr(settings, name)}")


@dataclass
class ImageDecoding:                        # StableDiffusionPipeline (SD-1.5)
    steps: int = 50
    guidance: float = 7.5                   # classifier-free guidance scale; <= 1 turns guidance off
    height: int = 512
    width: int = 512

    def __post_init__(self):
        _check_decoding(self, "inference.image", ("steps", "height", "width"))


@dataclass
class VideoDecoding:                        # TextToVideoSDPipeline (Zeroscope v2 576w)
    steps: int = 50
    guidance: float = 7.5
    height: int = 320
    width: int = 576
    frames: int = 24
    fps: int = 8

    def __post_init__(self):
        _check_decoding(self, "inference.video", ("steps", "height", "width", "frames", "fps"))


@dataclass
class AudioDecoding:                        # AudioLDMPipeline (audioldm-l-full)
    steps: int = 50
    guidance: float = 7.5
    seconds: float = 9.0

    def __post_init__(self):
        _check_decoding(self, "inference.audio", ("steps", "seconds"))


@dataclass
class InferenceConfig:
    max_new_tokens: int = 150
    temperature: float = 0.4
    top_p: float = 1.0
    do_sample: bool = True
    seed: int = 13
    # constrained decoding: a started signal block always completes in order (nextgpt.model.generate.SignalBlocks)
    force_signal: bool = True
    # modalities a reply that should carry one must carry (inference.py --require; evaluate: its generation
    # requests of these modalities): a block the model did not write is put at the end of the answer
    require: list[Literal["image", "video", "audio"]] = field(default_factory=list)
    out_dir: str = "runs/inference"
    ckpt: str = "ckpt/delta_ckpt/nextgpt/7b_tiva_v0/stage_3"
    # Decoder settings, one mapping per modality (`inference.image.steps`); what each pipeline is given from them
    # is its row of the modality table (nextgpt.modalities -> nextgpt.model.media_files).
    image: ImageDecoding = field(default_factory=ImageDecoding)
    video: VideoDecoding = field(default_factory=VideoDecoding)
    audio: AudioDecoding = field(default_factory=AudioDecoding)

    def decoding(self, modality: str):
        """The decoder settings of `modality` (ImageDecoding | VideoDecoding | AudioDecoding)."""
        return {"image": self.image, "video": self.video, "audio": self.audio}[modality]


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    # Filled by load(): where the config came from (not a user setting).
    source: str = field(default="", metadata={"setting": False})

    def path(self, value: str) -> Path:
        """Resolve a path written in a config against the repository root (absolute paths pass through)."""
        return resolve_path(value)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON values: tuples (train.betas) become lists, as they read back."""
        def plain(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value
        return plain(dataclasses.asdict(self))

    def dump(self) -> str:
        """The resolved settings as YAML that `load` reads back (`source` is not a setting: a comment)."""
        settings = {k: v for k, v in self.to_dict().items() if k != "source"}
        return f"# resolved from {self.source or 'defaults'}\n" + yaml.safe_dump(settings, sort_keys=False)


def resolve_path(value: str | os.PathLike) -> Path:
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else REPO_ROOT / p


# Mappings that a child config replaces rather than merges (a stage lists its full loss table).
_REPLACE_WHOLE = {"loss_weights"}


def load(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load base + stage YAML (+ `--set` overrides) into a validated Config."""
    merged: dict[str, Any] = {}
    source = ""
    if path is not None:
        for _, data in typed.read_chain(Path(path)):
            merged = typed.merge(merged, data, _REPLACE_WHOLE)
        source = str(Path(path).resolve())
    for text in overrides:
        typed.apply_override(Config, merged, text)
    cfg = typed.build(Config, merged)
    cfg.source = source
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    from nextgpt.modalities import MODALITIES

    for m in cfg.model.modalities:
        if m not in MODALITIES:
            raise ConfigError(f"model.modalities: unknown modality {m!r}; known: {', '.join(MODALITIES)}")
    if cfg.train.epochs < 1:  # 0 epochs would silently train nothing; --max-steps 0 is the way to train nothing
        raise ConfigError(f"train.epochs: must be at least 1, got {cfg.train.epochs} "
                          "(--max-steps 0 trains zero steps)")
    if cfg.train.dist_timeout <= 0:
        raise ConfigError(f"train.dist_timeout: must be > 0 seconds, got {cfg.train.dist_timeout}")
    if cfg.train.max_steps < 0:
        raise ConfigError(f"train.max_steps: must be >= 0 (0: train.epochs x steps per epoch), "
                          f"got {cfg.train.max_steps}")
    if "lora" in cfg.train.trainable and not cfg.model.lora.enabled:
        raise ConfigError("train.trainable lists lora but model.lora.enabled is false")
    if bad := sorted(set(cfg.train.module_lr) - {"input_proj", "output_proj", "lora", "token_rows"}):
        raise ConfigError(f"train.module_lr: unknown group(s) {bad}; allowed: input_proj, output_proj, lora, token_rows")
    terms = ["lm", *MODALITIES, *(m.generation_loss_key for m in MODALITIES.values())]
    bad_w = set(cfg.train.loss_weights) - set(terms)
    if bad_w:
        raise ConfigError(f"train.loss_weights: unknown term(s) {sorted(bad_w)}; allowed: {', '.join(terms)}")
    if cfg.train.snr_gamma < 0:
        raise ConfigError(f"train.snr_gamma: must be >= 0 (0: no min-SNR weighting), got {cfg.train.snr_gamma}")
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


def main(argv: list[str] | None = None) -> int:
    """`python -m nextgpt.config --print train.output_dir --config X [--set k=v ...]`: one resolved value per line.

    The Makefile asks this where a stage writes instead of mirroring the YAMLs, so `--set train.output_dir=…` moves
    the training and the done.json make looks for together. `--path` resolves the value as the scripts do
    (`Config.path`: relative to the repository root)."""
    import argparse

    from nextgpt import cli

    parser = argparse.ArgumentParser(prog="python -m nextgpt.config", description=main.__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--print", dest="keys", action="append", required=True, metavar="KEY",
                        help="a dotted setting to print, e.g. train.output_dir (repeatable)")
    parser.add_argument("--path", action="store_true", help="print the values as resolved paths")
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = from_args(args)
        for key in args.keys:
            value: Any = cfg
            for part in key.split("."):
                if not dataclasses.is_dataclass(value) or not hasattr(value, part):
                    raise ConfigError(f"--print {key}: no such setting")
                value = getattr(value, part)
            print(cfg.path(str(value)) if args.path else value)

    return cli.run(body, "config")

if __name__ == "__main__":
    raise SystemExit(main())
