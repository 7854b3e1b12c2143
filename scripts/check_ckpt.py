"""Check that every checkpoint file a config needs is in place, and list ALL that are missing or wrong at once.

    python scripts/check_ckpt.py                                   # code/config/stage_3.yaml (the real models)
    python scripts/check_ckpt.py --config code/config/tiny/stage_3.yaml
    python scripts/check_ckpt.py --check-keys                      # also compare the ImageBind key table

For each file: where it goes, and where it comes from. Checked: the ImageBind .pth (model.imagebind), the Vicuna
folder (model.llm: config.json, every weight shard, tokenizer.model), the decoder folder of each modality
(model.decoders: model_index.json and the components its pipeline loads), and the NExT-GPT delta named by
train.init_from / inference.ckpt when it exists (optional: a stage writes it). Plausibility: JSON parses, the
pipeline class is the modality's, the decoder's conditioning shape is readable, a delta's input projection fits
the LLM's hidden size. Reads only small files and headers (a .pth key table is memory-mapped, never loaded).

Exit status: 0 when everything is present and plausible, 1 otherwise, 2 on a bad config.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from nextgpt import cli
from nextgpt import config as config_lib
from nextgpt.modalities import MODALITIES, conditioning_shape

# Where the real files come from (README "real checkpoints"; NExT-GPT's README steps). Hub downloads use
# huggingface-hub 2.x's `hf download` (the pinned version; `huggingface-cli` is gone).
SOURCES = {
    "imagebind": "wget https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth -P {folder}",
    "llm": "Vicuna-7B v0 = LLaMA-7B (Hugging Face format) + the Vicuna v0 delta: "
           "hf download lmsys/vicuna-7b-delta-v0 --local-dir ckpt/vicuna-7b-delta-v0 && "
           "python scripts/prepare_vicuna.py --base <llama-7b-hf> --delta ckpt/vicuna-7b-delta-v0 --out {path} "
           "(no FastChat needed)",
    "image": "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir {path} "
             "(formerly runwayml/stable-diffusion-v1-5)",
    "video": "hf download cerspense/zeroscope_v2_576w --local-dir {path}",
    "audio": "hf download cvssp/audioldm-l-full --local-dir {path}",
    "delta": "train it (make stage1 / stage2 / stage3), or the released NExT-GPT delta: hf download "
             "ChocoWu/nextgpt_7b_tiva_v0 pytorch_model.pt --local-dir <folder>",
}
TINY_SOURCE = "make tiny (scripts/tiny/make_tiny_ckpt.py --out ckpt/tiny)"

# Components each decoder pipeline loads (safety_checker / feature_extractor are not loaded: we pass None).
PIPELINE_COMPONENTS = {
    "StableDiffusionPipeline": ("scheduler", "text_encoder", "tokenizer", "unet", "vae"),
    "TextToVideoSDPipeline": ("scheduler", "text_encoder", "tokenizer", "unet", "vae"),
    "AudioLDMPipeline": ("scheduler", "text_encoder", "tokenizer", "unet", "vae", "vocoder"),
}
# Weight file stems: diffusers models vs transformers models
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model", "vocoder": "model"}
# The real 7b_v0 folder (FastChat's apply_delta output) holds two .bin shards and no index.
VICUNA_7B_SHARDS = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")
SHARD_RE = re.compile(r"^pytorch_model-(\d{5})-of-(\d{5})\.bin$")
# Hidden size of the original's LLM (Vicuna-7B)
VICUNA_7B_HIDDEN = 4096


@dataclass
class Item:
    what: str
    path: Path
    problem: str = ""               # "" = present and plausible
    source: str = ""
    optional: bool = False          # an absent optional item is reported but is not a failure
    note: str = ""                  # shown for present items (a shape, a count)


class Checker:
    def __init__(self, cfg, check_keys: bool = False):
        self.cfg = cfg
        self.check_keys = check_keys
        self.tiny = cfg.model.imagebind_preset == "tiny"
        self.items: list[Item] = []

    def source(self, kind: str, **fmt) -> str:
        return TINY_SOURCE if self.tiny and kind != "delta" else SOURCES[kind].format(**fmt)

    def add(self, what: str, path: Path, problem: str = "", source: str = "", note: str = "",
            optional: bool = False) -> Item:
        item = Item(what, path, problem, source, optional, note)
        self.items.append(item)
        return item

    def file(self, what: str, path: Path, source: str, note: str = "") -> bool:
        if path.is_file() and path.stat().st_size > 0:
            self.add(what, path, note=note)
            return True
        self.add(what, path, "empty file" if path.is_file() else "missing", source)
        return False

    def json_file(self, what: str, path: Path, source: str) -> dict | None:
        if not self.file(what, path, source):
            return None
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.items[-1].problem = f"not valid JSON ({e})"
            self.items[-1].source = source
            return None
        if not isinstance(data, dict):
            self.items[-1].problem = f"expected a JSON object, got {type(data).__name__}"
            return None
        return data

    # -- ImageBind -----------------------------------------------------------------------------------------
    def imagebind(self) -> None:
        path = self.cfg.path(self.cfg.model.imagebind)
        source = self.source("imagebind", folder=_show(path.parent))
        if not self.file("ImageBind checkpoint", path, source):
            return
        item = self.items[-1]
        size = path.stat().st_size
        item.note = f"{size / 2**20:.0f} MiB"
        if self.cfg.model.imagebind_preset == "huge" and size < 1_000_000_000:
            item.problem = f"only {size} bytes; imagebind_huge.pth is about 4.5 GB (an interrupted download?)"
            item.source = source
            return
        if self.check_keys:
            self.imagebind_keys(item)

    def imagebind_keys(self, item: Item) -> None:
        """Compare the .pth key table and shapes with nextgpt.imagebind.model (memory-mapped; nothing loaded)."""
        import torch

        from nextgpt.imagebind.model import ImageBindModel, preset, select_state_dict

        try:
            state = torch.load(item.path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable; say which
            item.problem = f"not a readable torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})"
            return
        if not isinstance(state, dict):
            item.problem = f"expected a state dict, got {type(state).__name__}"
            return
        with torch.device("meta"):
            model = ImageBindModel(**preset(self.cfg.model.imagebind_preset))
        try:
            select_state_dict(model, state, item.path)
        except ValueError as e:
            item.problem = str(e)
            return
        item.note += f"; {len(state)} keys match preset {self.cfg.model.imagebind_preset!r}"

    # -- Vicuna ----------------------------------------------------------------------------------------------
    def llm(self) -> int | None:
        """Returns the hidden size from config.json (None when unreadable)."""
        folder = self.cfg.path(self.cfg.model.llm)
        source = self.source("llm", path=_show(folder))
        cfg_json = self.json_file("LLM config", folder / "config.json", source)
        hidden = None
        if cfg_json is not None:
            item = self.items[-1]
            hidden = cfg_json.get("hidden_size")
            positions = cfg_json.get("max_position_embeddings")
            if cfg_json.get("model_type") != "llama":
                item.problem = f"model_type {cfg_json.get('model_type')!r}; expected 'llama' (a Vicuna/LLaMA folder)"
            elif not isinstance(hidden, int):
                item.problem = "no integer hidden_size"
            elif not self.tiny and hidden != VICUNA_7B_HIDDEN:
                item.problem = f"hidden_size {hidden}; Vicuna-7B has {VICUNA_7B_HIDDEN}"
            elif isinstance(positions, int) and positions < self.cfg.model.max_length:
                item.problem = f"max_position_embeddings {positions} < model.max_length {self.cfg.model.max_length}"
            else:
                item.note = f"hidden {hidden}, {cfg_json.get('num_hidden_layers')} layers"
            if item.problem:
                item.source = source
        self.llm_weights(folder, source)
        self.file("LLM tokenizer", folder / "tokenizer.model", source)
        return hidden if isinstance(hidden, int) else None

    def llm_weights(self, folder: Path, source: str) -> None:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = folder / index_name
            if index_path.exists():
                index = self.json_file("LLM weight index", index_path, source)
                weight_map = (index or {}).get("weight_map")
                if index is not None and not isinstance(weight_map, dict):
                    self.items[-1].problem = "no weight_map"
                    return
                for shard in sorted(set((weight_map or {}).values())):
                    self.file("LLM weight shard", folder / shard, source)
                return
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (folder / single).exists():
                self.file("LLM weights", folder / single, source)
                return
        shards = [SHARD_RE.match(p.name) for p in folder.glob("pytorch_model-*-of-*.bin")] if folder.is_dir() else []
        totals = {int(m.group(2)) for m in shards if m}
        if len(totals) == 1:
            total = totals.pop()
            names = [f"pytorch_model-{i:05d}-of-{total:05d}.bin" for i in range(1, total + 1)]
        elif self.tiny:
            names = ["model.safetensors"]
        else:
            names = list(VICUNA_7B_SHARDS)
        for name in names:
            self.file("LLM weight shard" if "-of-" in name else "LLM weights", folder / name, source)

    # -- decoders --------------------------------------------------------------------------------------------
    def decoder(self, modality: str) -> None:
        spec = MODALITIES[modality]
        folder = self.cfg.path(self.cfg.model.decoders.get(modality, ""))
        if not self.cfg.model.decoders.get(modality):
            self.add(f"{modality} decoder", folder, f"model.decoders.{modality} is not set", "the config")
            return
        source = self.source(modality, path=_show(folder))
        label = f"{modality} decoder"
        index = self.json_file(f"{label} model_index.json", folder / "model_index.json", source)
        if index is not None:
            if index.get("_class_name") != spec.pipeline:
                self.items[-1].problem = (f"_class_name {index.get('_class_name')!r}; the {modality} decoder needs "
                                          f"{spec.pipeline}")
                self.items[-1].source = source
            else:
                self.items[-1].note = spec.pipeline
        for component in PIPELINE_COMPONENTS[spec.pipeline]:
            sub = folder / component
            if component == "scheduler":
                self.json_file(f"{label} scheduler", sub / "scheduler_config.json", source)
            elif component == "tokenizer":
                self.tokenizer(f"{label} tokenizer", sub, source)
            else:
                self.json_file(f"{label} {component} config", sub / "config.json", source)
                self.weights(f"{label} {component} weights", sub, WEIGHT_STEMS[component], source)
        if (folder / "text_encoder" / "config.json").is_file():
            try:
                tokens, dim = conditioning_shape(modality, folder)
            except (OSError, ValueError) as e:
                self.add(f"{label} conditioning shape", folder / "text_encoder" / "config.json", str(e), source)
            else:
                self.add(f"{label} conditioning shape", folder / "text_encoder" / "config.json",
                         note=f"({tokens}, {dim})")

    def tokenizer(self, what: str, folder: Path, source: str) -> None:
        if (folder / "tokenizer.json").is_file():
            self.file(what, folder / "tokenizer.json", source)
            return
        for name in ("vocab.json", "merges.txt"):     # CLIP and RoBERTa (CLAP) BPE files
            self.file(what, folder / name, source)

    def weights(self, what: str, folder: Path, stem: str, source: str) -> None:
        """<stem>.safetensors / .bin (or a precision variant like <stem>.fp16.safetensors, or an index + shards)."""
        for index_path in sorted(folder.glob(f"{stem}*.index.json")) if folder.is_dir() else []:
            index = self.json_file(what + " index", index_path, source)
            for shard in sorted(set(((index or {}).get("weight_map") or {}).values())):
                self.file(what, folder / shard, source)
            return
        found = sorted(p for ext in ("safetensors", "bin") for p in folder.glob(f"{stem}*.{ext}")) \
            if folder.is_dir() else []
        self.file(what, found[0] if found else folder / f"{stem}.safetensors", source)

    # -- optional delta --------------------------------------------------------------------------------------
    def deltas(self, hidden: int | None, explicit: str | None) -> None:
        candidates = [("--delta", explicit)] if explicit else [
            ("train.init_from", self.cfg.train.init_from), ("inference.ckpt", self.cfg.inference.ckpt)]
        seen = set()
        for key, value in candidates:
            if not value:
                continue
            path = self.cfg.path(value) if not explicit else Path(value)
            if path in seen:
                continue
            seen.add(path)
            self.delta(f"NExT-GPT delta ({key})", path, hidden, optional=not explicit)

    def delta(self, what: str, path: Path, hidden: int | None, optional: bool) -> None:
        source = SOURCES["delta"]
        if not path.exists():
            self.add(what, path, "missing", source, optional=optional)
            return
        target = self.resolve_delta(path)
        if target is None:
            self.add(what, path, "folder holds no delta.safetensors, pytorch_model.pt or 'latest'", source)
            return
        if not self.file(what, target, source):
            return
        item = self.items[-1]
        shapes = self.delta_shapes(target)
        if isinstance(shapes, str):
            item.problem = shapes
            return
        if shapes is None:
            item.note = "keys not inspected (legacy .pt: use --check-keys)"
            return
        proj = {k: v for k, v in shapes.items() if re.search(r"(^|\.)(input_proj|llama_proj)\.weight$", k)}
        if not proj:
            item.note = f"{len(shapes)} tensors, no input projection"
            return
        key, shape = next(iter(proj.items()))
        if hidden is not None and shape[0] != hidden:
            item.problem = f"{key} is {tuple(shape)}: made for an LLM of hidden size {shape[0]}, this LLM has {hidden}"
        else:
            item.note = f"{len(shapes)} tensors, {key} {tuple(shape)}"

    @staticmethod
    def resolve_delta(path: Path) -> Path | None:
        if path.is_file():
            return path
        for name in ("delta.safetensors", "pytorch_model.pt"):
            if (path / name).is_file():
                return path / name
        latest = path / "latest"
        if latest.is_file():
            return path / latest.read_text().strip() / "delta.safetensors"
        return None

    def delta_shapes(self, path: Path) -> dict[str, list[int]] | str | None:
        """name -> shape from a safetensors header, or (with --check-keys) a memory-mapped .pt; str = problem."""
        if path.suffix == ".safetensors":
            try:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
            except Exception as e:  # noqa: BLE001 - a corrupt header in any form
                return f"not a readable safetensors file ({type(e).__name__}: {e})"
        if not self.check_keys:
            return None
        import torch

        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # noqa: BLE001
            return f"not a readable torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})"
        if not isinstance(state, dict):
            return f"expected a state dict, got {type(state).__name__}"
        return {k: list(v.shape) for k, v in state.items() if hasattr(v, "shape")}

    # -- all -------------------------------------------------------------------------------------------------
    def run(self, delta: str | None = None) -> list[Item]:
        self.imagebind()
        hidden = self.llm()
        for modality in self.cfg.model.modalities:
            self.decoder(modality)
        self.deltas(hidden, delta)
        return self.items


def _show(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(config_lib.REPO_ROOT))
    except ValueError:
        return str(path)


def report(items: list[Item], out=print) -> int:
    """One line per item; problems point at a numbered list of where the files come from. -> failure count."""
    failures = 0
    sources: list[str] = []
    for item in items:
        line = f"  {{}}  {item.what:<34} {_show(item.path)}"
        if not item.problem:
            out(line.format("ok      ") + (f"   [{item.note}]" if item.note else ""))
            continue
        failures += not item.optional
        if item.source and item.source not in sources:
            sources.append(item.source)
        ref = f"   <- [{sources.index(item.source) + 1}]" if item.source else ""
        label = "optional" if item.optional else ("MISSING " if item.problem == "missing" else "WRONG   ")
        out(line.format(label) + ref)
        if item.problem != "missing":
            out(f"            {item.problem}")
    if sources:
        out("where they come from:")
        for n, source in enumerate(sources, 1):
            out(f"  [{n}] {source}")
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_config_args(p, default="code/config/stage_3.yaml")
    p.add_argument("--check-keys", action="store_true",
                   help="also compare the ImageBind .pth key table (and a legacy delta's keys) without loading them")
    p.add_argument("--delta", default=None, help="check this delta (folder or pytorch_model.pt) and require it")
    args = p.parse_args(argv)
    return cli.run(lambda: check(args), "check_ckpt")  # any failure: one `error:` line (exit 2)


def check(args) -> int:
    cfg = config_lib.from_args(args)
    print(f"check-ckpt: {args.config}" + (f" (+ {len(args.overrides)} --set)" if args.overrides else ""))
    items = Checker(cfg, check_keys=args.check_keys).run(args.delta)
    failures = report(items)
    if failures:
        print(f"{failures} checkpoint file(s) missing or wrong. Put each where shown; `make check-ckpt` checks again.")
        return 1
    print(f"all {sum(not i.optional for i in items)} required checkpoint files present and plausible.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
