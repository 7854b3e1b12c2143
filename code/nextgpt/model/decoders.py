"""The diffusion decoders: projected signal-token conditioning -> image / video / audio files.

    output_proj[modality] -> conditioning (1, T, D) -> diffusers pipeline(prompt_embeds=...) -> media -> file
        image  (1, 77, 768)  StableDiffusionPipeline   -> PIL image           -> image_<i>.png
        video  (1, 77, 1024) TextToVideoSDPipeline     -> (F, H, W, 3) uint8  -> video_<i>.mp4 (PyAV)
        audio  (1, 1, 512)   AudioLDMPipeline          -> (N,) float waveform -> audio_<i>.wav (soundfile)
                             (pooled: fed as (1, 512), the CLAP text_embeds slot)

Which pipeline class decodes a modality, what it is given besides the embeddings (sizes, output type), how its
output is read and which file it becomes all come from the modality's row of the table (`nextgpt.modalities`); the
folder from `cfg.model.decoders`; steps, guidance and sizes from the modality's mapping `cfg.inference.<modality>`
(a request may pass its own, e.g. the app's side panel). Each pipeline is loaded from local files on first use and
kept for the rest of the process (the original's NextGPTModel.generate re-loaded all of them on every call).

Classifier-free guidance needs unconditional embeddings; like the original (and like the pipelines themselves when
given only `prompt_embeds`) they are the empty prompt through the pipeline's own text encoder, computed once per
pipeline and passed as `negative_prompt_embeds`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextgpt.modalities import MODALITIES, conditioning_shape, get
from nextgpt.model import media_files


@dataclass
class Decoded:
    """One generated medium, ready for its writer."""
    modality: str
    data: Any                 # PIL.Image | np.uint8 (F, H, W, 3) | np.float32 (N,)
    rate: float = 0.0         # video frames per second, or audio samples per second


class Decoders:
    """The configured diffusion pipelines, each loaded lazily and once.

    `decode(modality, conditioning)` -> Decoded; `write(decoded, out_dir, index)` -> path of the written file.
    """

    def __init__(self, cfg, device=None, dtype=None, seed: int | None = None, on_load=None):
        import torch

        self.cfg = cfg
        self.on_load = on_load    # called with a one-line message before a pipeline loads (inference prints it)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype if dtype is not None else torch.float32
        self.seed = cfg.inference.seed if seed is None else seed
        self._pipelines: dict[str, Any] = {}
        self._negative: dict[str, Any] = {}

    # -- loading --------------------------------------------------------------------------------------------------
    def folder(self, modality: str) -> Path:
        try:
            return self.cfg.path(self.cfg.model.decoders[modality])
        except KeyError:
            raise ValueError(f"model.decoders has no {modality!r} entry (configured: "
                             f"{', '.join(self.cfg.model.decoders) or 'none'})") from None

    def loaded(self) -> list[str]:
        return list(self._pipelines)

    def pipeline(self, modality: str):
        """The diffusers pipeline of `modality`, loaded from its local folder on first use."""
        if modality in self._pipelines:
            return self._pipelines[modality]
        try:
            import diffusers
        except ImportError as e:
            raise ImportError(f"decoding {modality} needs diffusers ({e}); run `make env`") from None
        folder = self.folder(modality)
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"{folder / 'model_index.json'}: missing (the {modality} decoder folder from "
                                    f"model.decoders.{modality}; see `make check-ckpt`)")
        pipeline_class = getattr(diffusers, get(modality).pipeline)
        if self.on_load is not None:
            self.on_load(f"loading the {modality} decoder from {folder}")
        # diffusers 0.42 spells the dtype argument `dtype` (`torch_dtype` is deprecated there)
        try:
            pipeline = pipeline_class.from_pretrained(str(folder), dtype=self.dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder}: cannot load {pipeline_class.__name__} ({e})") from None
        pipeline.to(self.device)
        pipeline.set_progress_bar_config(disable=True)
        self._pipelines[modality] = pipeline
        return pipeline

    def conditioning_shape(self, modality: str) -> tuple[int, int]:
        """(T, D) the decoder's text encoder produces; (1, D) for a pooled decoder."""
        return conditioning_shape(modality, self.folder(modality))

    def negative_embeds(self, modality: str):
        """Unconditional embeddings for classifier-free guidance: the empty prompt through the pipeline's own text
        encoder. (1, 77, D) for SD / text-to-video; (1, D), L2-normalised, for AudioLDM."""
        if modality in self._negative:
            return self._negative[modality]
        import torch

        pipeline = self.pipeline(modality)
        with torch.inference_mode():
            if get(modality).pooled:
                # AudioLDM has only _encode_prompt: CLAP text_embeds, L2-normalised as for its own prompts -> (1, D)
                negative = pipeline._encode_prompt("", self.device, 1, False)
            else:
                # SD / text-to-video: (prompt_embeds, negative_prompt_embeds); no guidance -> the second is None
                negative = pipeline.encode_prompt("", self.device, 1, False)[0]
        self._negative[modality] = negative
        return negative

    # -- decoding -------------------------------------------------------------------------------------------------
    def decode(self, modality: str, conditioning, seed: int | None = None, settings=None) -> Decoded:
        """conditioning (1, T, D) from output_proj[modality] -> Decoded media. Same seed + conditioning -> same media.

        settings: this request's ImageDecoding / VideoDecoding / AudioDecoding (default: cfg.inference's).
        """
        import torch

        info = get(modality)
        tokens, dim = self.conditioning_shape(modality)
        if conditioning.dim() != 3 or conditioning.shape[0] != 1 or tuple(conditioning.shape[1:]) != (tokens, dim):
            raise ValueError(f"{modality} conditioning has shape {tuple(conditioning.shape)}; the decoder at "
                             f"{self.folder(modality)} needs (1, {tokens}, {dim})")
        pipeline = self.pipeline(modality)
        settings = self.cfg.inference.decoding(modality) if settings is None else settings
        prompt_embeds = conditioning.detach().to(self.device, self.dtype)
        if info.pooled:
            prompt_embeds = prompt_embeds.reshape(1, dim)          # (1, 1, 512) -> (1, 512), the CLAP slot
        negative = self.negative_embeds(modality).to(self.dtype) if settings.guidance > 1.0 else None
        # A CPU generator: the same numbers on every device (diffusers draws on CPU and moves them).
        generator = torch.Generator("cpu").manual_seed(self.seed if seed is None else seed)
        with torch.inference_mode():
            output = pipeline(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative,
                              num_inference_steps=int(settings.steps), guidance_scale=float(settings.guidance),
                              generator=generator, **getattr(media_files, info.pipeline_arguments)(settings))
        data, rate = getattr(media_files, info.read_output)(output, pipeline, settings)
        return Decoded(modality, data, rate=rate)

    def write(self, decoded: Decoded, out_dir: str | Path, index: int) -> Path:
        return write(decoded, out_dir, index)


def write(decoded: Decoded, out_dir: str | Path, index: int) -> Path:
    """Write `<modality>_<index>.<ext>` atomically (temp file + rename) and return its path."""
    from nextgpt.io import atomic_write_bytes

    info = MODALITIES[decoded.modality]
    path = Path(out_dir) / f"{decoded.modality}_{index}.{info.file_ext}"
    atomic_write_bytes(path, getattr(media_files, info.encode_file)(decoded.data, decoded.rate))
    return path
