"""Caption embeddings: what each diffusion decoder consumes, computed with the decoder's OWN text encoder.

    encoder = CaptionEncoder("image", "ckpt/pretrained_ckpt/stable-diffusion-v1-5")
    encoder.encode(["a red circle"])         # image/video: (B, 77, D) CLIP last_hidden_state; audio: (B, D)

Only the text encoder and tokenizer of the diffusers folder are loaded (the classes model_index.json names, from
the `text_encoder/` and `tokenizer/` subfolders), never the UNet or VAE. The computation is the pipeline's own
prompt encoding in diffusers 0.42, step for step:
  StableDiffusionPipeline.encode_prompt / TextToVideoSDPipeline.encode_prompt: tokenizer(padding="max_length",
    max_length=tokenizer.model_max_length, truncation=True); attention mask only if the text encoder's config sets
    use_attention_mask; prompt_embeds = text_encoder(ids)[0]  (last_hidden_state after the final LayerNorm)
  AudioLDMPipeline._encode_prompt: the same tokenisation (model_max_length), attention mask always;
    prompt_embeds = F.normalize(text_encoder(ids, attention_mask).text_embeds, dim=-1)
so tests compare the stored vectors with `pipeline.encode_prompt` directly.

Storage: a store folder (nextgpt/store/): `<embed_dir>/<media file name>.npy` (the default `files` layout) or
memory-mapped shards, (77, D) or (D,) for pooled decoders, float32 or float16. One folder holds all three
modalities (as the original's data/embed/), so its manifest.json has a section per modality:
{"kind": "caption_embeddings", "store": ..., "modalities": {"image": {"encoder", "shape", "dtype", "count", ...}}}.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nextgpt import store
from nextgpt.io import read_json
from nextgpt.store.files import check_npy  # noqa: F401  (data.file_checks uses it from here)
from nextgpt.modalities import MODALITIES, conditioning_shape

KIND = "caption_embeddings"      # its manifest: nextgpt.store.read_manifest(embed_dir, KIND)


def count_items(embed_dir: str | Path, modality: str) -> int:
    """Items of the modality in the folder (files: .npy files with one of its extensions; shards: index rows)."""
    manifest = store.read_manifest(embed_dir)
    return store.count(embed_dir, modality, manifest.store if manifest else "files")


def storage_shape(modality: str, conditioning: tuple[int, int]) -> tuple[int, ...]:
    """On-disk shape of one caption embedding for a decoder conditioned on (T, D): (T, D), or (D,) for a pooled
    decoder (AudioLDM's CLAP text_embeds, as the original's data/embed/*.wav.npy)."""
    tokens, dim = conditioning
    return (dim,) if MODALITIES[modality].pooled and tokens == 1 else (tokens, dim)


def stored_shape(modality: str, decoder_dir: str | Path) -> tuple[int, ...]:
    """storage_shape of the decoder in `decoder_dir` (reads only its JSON configs)."""
    return storage_shape(modality, conditioning_shape(modality, decoder_dir))


def decoder_fingerprint(decoder_dir: str | Path) -> str:
    """Identity of a decoder's text encoder weights (nextgpt.store.file_fingerprint of each weight file), so a
    store refuses embeddings of another text encoder at the same path."""
    from nextgpt.store import file_fingerprint

    folder = Path(decoder_dir) / "text_encoder"
    weights = sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    return "+".join(file_fingerprint(p) for p in weights)


def _component_class(decoder_dir: Path, component: str):
    """The transformers class model_index.json names for `component` (what the pipeline itself would load)."""
    import transformers

    index_path = decoder_dir / "model_index.json"
    index = read_json(index_path, "missing (not a diffusers pipeline folder)")
    entry = index.get(component)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers"):
        raise ValueError(f"{index_path}: no transformers class for {component!r} (found {entry!r})")
    cls = getattr(transformers, entry[1], None)
    if cls is None:
        raise ValueError(f"{index_path}: transformers has no class {entry[1]!r} for {component!r}")
    return cls


class CaptionEncoder:
    """The decoder's text encoder + tokenizer; `encode(captions)` -> float32 array (B, *shape)."""

    def __init__(self, modality: str, decoder_dir: str | Path, device: str | None = None, dtype=None):
        import torch

        from nextgpt.runtime import pick_device  # imports torch, which this module loads only when encoding

        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; known: {', '.join(MODALITIES)}")
        self.modality, self.pooled = modality, MODALITIES[modality].pooled
        self.decoder_dir = Path(decoder_dir)
        if not self.decoder_dir.is_dir():
            raise FileNotFoundError(f"{self.decoder_dir}: decoder folder not found (model.decoders.{modality})")
        self.shape = stored_shape(modality, self.decoder_dir)
        self.device = pick_device(device)[0]    # the script's decision (None: nextgpt.runtime's rule)
        tokenizer_cls = _component_class(self.decoder_dir, "tokenizer")
        encoder_cls = _component_class(self.decoder_dir, "text_encoder")
        try:
            self.tokenizer = tokenizer_cls.from_pretrained(str(self.decoder_dir), subfolder="tokenizer")
            self.text_encoder = encoder_cls.from_pretrained(str(self.decoder_dir), subfolder="text_encoder",
                                                            dtype=dtype or torch.float32)
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.decoder_dir}: cannot load the text encoder / tokenizer ({e})") from None
        self.text_encoder.to(self.device).eval().requires_grad_(False)

    @property
    def encoder_id(self) -> str:
        return str(self.decoder_dir.resolve())

    def encode(self, captions: list[str]) -> np.ndarray:
        """(B, *shape) float32 numpy array (what the store holds)."""
        return self.encode_tensor(captions).float().cpu().numpy()

    def encode_tensor(self, captions: list[str]):
        """(B, *shape) tensor on self.device in the text encoder's dtype; no autograd graph (no_grad), so the
        result can also serve as a training target (online caption embeddings)."""
        import torch
        import torch.nn.functional as F

        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        ids = tokens.input_ids.to(self.device)
        with torch.no_grad():
            if self.pooled:
                # (B, L) -> CLAP text_embeds (B, D), L2-normalised as AudioLDM's _encode_prompt
                out = self.text_encoder(ids, attention_mask=tokens.attention_mask.to(self.device)).text_embeds
                out = F.normalize(out, dim=-1)
            else:
                # (B, 77) -> last_hidden_state (B, 77, D), as encode_prompt with clip_skip=None
                use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
                mask = tokens.attention_mask.to(self.device) if use_mask else None
                out = self.text_encoder(ids, attention_mask=mask)[0]
        if tuple(out.shape[1:]) != self.shape:
            raise ValueError(f"{self.decoder_dir}: text encoder produced {tuple(out.shape[1:])}, but its config "
                             f"says {self.shape}")
        return out
