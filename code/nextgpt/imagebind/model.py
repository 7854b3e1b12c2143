"""ImageBind (vision incl. video, audio, text) with the exact parameter names of `imagebind_huge.pth`.

Written against the structure of the original's models/imagebind_model.py: this file holds the assembled model,
its heads, presets and loading; the preprocessors are in stems.py, the blocks in transformer.py and the head pieces
in heads.py, as upstream splits multimodal_preprocessors.py / transformer.py / helpers.py. The layout of every
sub-module mirrors the original so that `state_dict()` names and shapes equal the released imagebind_huge.pth's
(all of them, checked key by key) for vision / audio / text. Depth, thermal and IMU are not built: NExT-GPT never
uses them, and their entries in a full checkpoint are skipped by name (and only those).

Shapes at the boundary (huge preset):
    vision  image (B, 3, 224, 224) | video (B, S, 3, 2, 224, 224)  ->  (B, 1024)
    audio   (B, S, 1, 128, 204)                                    ->  (B, 1024)
    text    token ids (B, 77), end-of-text = highest id            ->  (B, 1024)
Inputs with 5 or more dimensions are (B, S, ...) stacks of S views (15 video crops, 3 audio clips): they are
encoded as B*S items and the S unit vectors are averaged (no re-normalisation), as in the original.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from .heads import L2Normalize, LogitScale, SelectToken, TextHead
from .stems import PadIm2Video, PatchPreprocessor, PatchStem, TextPreprocessor
from .transformer import Trunk

# Modalities this module builds, and the ones a full ImageBind checkpoint also holds but we skip.
BUILT_MODALITIES = ("vision", "audio", "text")
SKIPPED_MODALITIES = ("depth", "thermal", "imu")
ALL_MODALITIES = BUILT_MODALITIES + SKIPPED_MODALITIES

# Constructor sizes of the released imagebind_huge (imagebind_model.imagebind_huge; upstream defaults for the rest).
_HUGE = dict(
    out_embed_dim=1024,
    vision_embed_dim=1280, vision_num_blocks=32, vision_num_heads=16,
    audio_embed_dim=768, audio_num_blocks=12, audio_num_heads=12, audio_drop_path=0.1,
    text_embed_dim=1024, text_num_blocks=24, text_num_heads=16,
    depth_embed_dim=384, depth_num_blocks=12, depth_num_heads=8,
    thermal_embed_dim=768, thermal_num_blocks=12, thermal_num_heads=12,
    imu_embed_dim=512, imu_num_blocks=6, imu_num_heads=8, imu_drop_path=0.7,
)
# The sizes of the tiny parity fixture the tests compare with the original's outputs (its metadata `config`).
_TINY = dict(
    out_embed_dim=16,
    vision_embed_dim=32, vision_num_blocks=2, vision_num_heads=2,
    audio_embed_dim=24, audio_num_blocks=2, audio_num_heads=2, audio_drop_path=0.1,
    text_embed_dim=32, text_num_blocks=2, text_num_heads=2,
    depth_embed_dim=16, depth_num_blocks=1, depth_num_heads=2,
    thermal_embed_dim=16, thermal_num_blocks=1, thermal_num_heads=2,
    imu_embed_dim=16, imu_num_blocks=1, imu_num_heads=2, imu_drop_path=0.7,
)
PRESETS: dict[str, dict] = {"huge": _HUGE, "tiny": _TINY}


def preset(name: str) -> dict:
    """Constructor config of a named size ("huge", "tiny"); a fresh dict each call."""
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown ImageBind preset {name!r}; known: {', '.join(PRESETS)}") from None


def resolve_config(preset_or_config: str | Mapping) -> dict:
    """A preset name or an explicit config dict -> config dict."""
    return preset(preset_or_config) if isinstance(preset_or_config, str) else dict(preset_or_config)


def _cls_head(dim: int, out_dim: int) -> nn.Sequential:
    # Indices 0 and 2 carry the parameters: `modality_heads.{vision,audio}.{0,2}.*`.
    return nn.Sequential(nn.LayerNorm(dim, eps=1e-6), SelectToken(0), nn.Linear(dim, out_dim, bias=False))


# ----------------------------------------------------------------------------------------------------- the model


class ImageBindModel(nn.Module):
    """ImageBind's vision / audio / text towers. Sizes come from a config dict (`preset(name)`).

    The depth / thermal / imu sizes are accepted so a full config (the parity fixture's, the huge preset) builds
    as is, but those towers are not built. `modalities` builds a subset (e.g. ("vision", "audio") to encode
    media without the 350 M text parameters).
    """

    def __init__(self, *, out_embed_dim: int = 1024,
                 vision_embed_dim: int = 1280, vision_num_blocks: int = 32, vision_num_heads: int = 16,
                 audio_embed_dim: int = 768, audio_num_blocks: int = 12, audio_num_heads: int = 12,
                 audio_drop_path: float = 0.1,
                 text_embed_dim: int = 1024, text_num_blocks: int = 24, text_num_heads: int = 16,
                 depth_embed_dim: int = 384, depth_num_blocks: int = 12, depth_num_heads: int = 8,
                 thermal_embed_dim: int = 768, thermal_num_blocks: int = 12, thermal_num_heads: int = 12,
                 imu_embed_dim: int = 512, imu_num_blocks: int = 6, imu_num_heads: int = 8,
                 imu_drop_path: float = 0.7,
                 video_frames: int = 2, vision_patch_size: int = 14, image_size: int = 224,
                 audio_kernel_size: int = 16, audio_stride: int = 10, audio_num_mel_bins: int = 128,
                 audio_target_len: int = 204, text_vocab_size: int = 49408, text_context_length: int = 77,
                 modalities: Iterable[str] = BUILT_MODALITIES):
        super().__init__()
        modalities = tuple(modalities)
        unknown = [m for m in modalities if m not in BUILT_MODALITIES]
        if unknown or not modalities:
            raise ValueError(f"ImageBindModel builds {', '.join(BUILT_MODALITIES)}; asked for {modalities}")
        self.modalities = modalities
        self.out_dim = out_embed_dim
        self.modality_preprocessors = nn.ModuleDict()
        self.modality_trunks = nn.ModuleDict()
        self.modality_heads = nn.ModuleDict()
        self.modality_postprocessors = nn.ModuleDict()

        if "vision" in modalities:
            # Conv3d with temporal kernel 2 over 2-frame clips: one time step, (224 / 14)^2 = 256 patches.
            stem = PatchStem(nn.Sequential(
                PadIm2Video(video_frames),
                nn.Conv3d(3, vision_embed_dim, kernel_size=(2, vision_patch_size, vision_patch_size),
                          stride=(2, vision_patch_size, vision_patch_size), bias=False)))
            num_patches = (video_frames // 2) * (image_size // vision_patch_size) ** 2
            self.modality_preprocessors["vision"] = PatchPreprocessor(stem, num_patches, vision_embed_dim)
            self.modality_trunks["vision"] = Trunk(vision_embed_dim, vision_num_blocks, vision_num_heads,
                                                   pre_layer_norm=True, add_bias_kv=False, drop_path=0.0)
            self.modality_heads["vision"] = _cls_head(vision_embed_dim, out_embed_dim)
            self.modality_postprocessors["vision"] = L2Normalize()

        if "audio" in modalities:
            # Overlapping 16x16 patches with stride 10 over (128 mel, 204 frames): 12 x 19 = 228 patches.
            stem = PatchStem(nn.Conv2d(1, audio_embed_dim, kernel_size=audio_kernel_size, stride=audio_stride,
                                       bias=False),
                             norm_layer=nn.LayerNorm(audio_embed_dim))
            num_patches = (((audio_num_mel_bins - audio_kernel_size) // audio_stride + 1)
                           * ((audio_target_len - audio_kernel_size) // audio_stride + 1))
            self.modality_preprocessors["audio"] = PatchPreprocessor(stem, num_patches, audio_embed_dim)
            self.modality_trunks["audio"] = Trunk(audio_embed_dim, audio_num_blocks, audio_num_heads,
                                                  pre_layer_norm=False, add_bias_kv=True,
                                                  drop_path=audio_drop_path)
            self.modality_heads["audio"] = _cls_head(audio_embed_dim, out_embed_dim)
            # The ×20 scale exists in the file (a buffer) but NExT-GPT applies only index 0, the normalisation.
            self.modality_postprocessors["audio"] = nn.Sequential(L2Normalize(), LogitScale(20.0, learnable=False))

        if "text" in modalities:
            self.modality_preprocessors["text"] = TextPreprocessor(text_vocab_size, text_context_length,
                                                                   text_embed_dim)
            self.modality_trunks["text"] = Trunk(text_embed_dim, text_num_blocks, text_num_heads,
                                                 pre_layer_norm=False, add_bias_kv=False, drop_path=0.0)
            self.modality_heads["text"] = TextHead(text_embed_dim, out_embed_dim)
            self.modality_postprocessors["text"] = nn.Sequential(L2Normalize(), LogitScale(1 / 0.07, learnable=True))

        self.apply(_init_linear_and_norm)

    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """One modality's embedding. (B, ...) -> (B, out_dim); (B, S, ...) with >= 5 dims -> mean over S."""
        if modality not in self.modality_trunks:
            raise ValueError(f"modality {modality!r} is not built in this model (built: {', '.join(self.modalities)})")
        folded = x.ndim >= 5
        if folded:
            batch, views = x.shape[:2]
            x = x.reshape(batch * views, *x.shape[2:])
        if modality == "text":
            tokens = self.modality_preprocessors["text"](x)
            tokens = self.modality_trunks["text"](tokens, attn_mask=self.modality_preprocessors["text"].mask)
            # End-of-text has the highest id in ImageBind's BPE vocabulary, so argmax finds it.
            out = self.modality_heads["text"](tokens, eos_positions=x.argmax(dim=-1))
            out = self.modality_postprocessors["text"](out)
        else:
            tokens = self.modality_preprocessors[modality](x)
            out = self.modality_heads[modality](self.modality_trunks[modality](tokens))
            post = self.modality_postprocessors[modality]
            out = post[0](out) if modality == "audio" else post(out)
        if folded:
            out = out.reshape(batch, views, -1).mean(dim=1)
        return out

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {modality: self.encode(modality, x) for modality, x in inputs.items()}


def _init_linear_and_norm(module: nn.Module) -> None:
    # Only matters for randomly initialised (tiny) models; real weights are loaded over it.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ------------------------------------------------------------------------------------------------------- loading

_MODALITY_OF_KEY = re.compile(r"^modality_(?:preprocessors|trunks|heads|postprocessors)\.([a-z]+)\.")


def _key_modality(key: str) -> str | None:
    match = _MODALITY_OF_KEY.match(key)
    return match.group(1) if match else None


def select_state_dict(model: ImageBindModel, state: Mapping[str, torch.Tensor], source: str | Path
                      ) -> dict[str, torch.Tensor]:
    """The entries of a full ImageBind state dict that `model` takes, checked strictly.

    Skipped: exactly the entries of ImageBind modalities the model does not build (by default depth / thermal /
    imu). Anything else unexpected, anything missing, or any shape difference raises ValueError listing the keys.
    """
    expected = model.state_dict(keep_vars=True)
    skipped_modalities = set(ALL_MODALITIES) - set(model.modalities)
    selected, unexpected, mismatched = {}, [], []
    for key, value in state.items():
        if key in expected:
            if tuple(value.shape) != tuple(expected[key].shape):
                mismatched.append(f"{key} {tuple(value.shape)} (model {tuple(expected[key].shape)})")
            selected[key] = value
        elif _key_modality(key) not in skipped_modalities:
            unexpected.append(key)
    missing = [key for key in expected if key not in state]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{source}: does not match ImageBind ({'; '.join(problems)})")
    return selected


def _torch_load(path: Path) -> dict:
    def load(mmap: bool):
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)

    try:
        try:
            state = load(mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = load(mmap=False)        # legacy (pre-zip) files cannot be memory-mapped: read them normally
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def load_imagebind(path: str | Path, preset: str | Mapping = "huge", device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None, modalities: Iterable[str] = BUILT_MODALITIES
                   ) -> ImageBindModel:
    """Load a full ImageBind checkpoint (torch.save(state_dict)) strictly; eval mode, frozen.

    The file is memory-mapped and the model is built on the meta device, so the only full copy made is the
    final one in `dtype` on `device` (peak ≈ the model's size in that dtype, plus pages of the mapped file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ImageBind checkpoint missing")
    config = resolve_config(preset)
    state = _torch_load(path)
    with torch.device("meta"):
        model = ImageBindModel(**config, modalities=modalities)
    model.load_state_dict(select_state_dict(model, state, path), strict=True, assign=True)
    del state
    model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)
