"""THE modality table. Everything per-modality (signal tokens, projector ModuleDicts, dataset fields, embedding
precompute, decoding) is driven by these rows; no code path is written once per modality.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nextgpt.io import read_json

# Wrapper tokens around the one soft token of an input medium. The original uses <Img>...</Img> for images,
# videos and audio alike (its <Vid>/<Aud> variants are commented out); we keep that so released deltas load.
MEDIA_START = "<Img>"
MEDIA_END = "</Img>"


@dataclass(frozen=True)
class Modality:
    name: str                 # one spelling everywhere: image | video | audio
    signal_prefix: str        # [IMG0] ... : signal tokens are f"[{signal_prefix}{i}]"
    num_signal_tokens: int    # 4 / 24 / 8 in the original
    imagebind_key: str        # ImageBind modality that encodes it (videos go through the vision trunk)
    pair_key: str             # raw pair JSON field naming the media file: image_name / video_name / audio_name
    media_folder: str         # folder beside the pair JSON: images / videos / audios
    input_key: str            # *_comprehension.json: input_image ...
    output_key: str           # *_generation.json: output_image ...
    placeholder: str          # <image> in the new-layout conversation files
    pipeline: str             # diffusers pipeline class of the decoder
    pooled: bool              # decoder consumes one pooled vector (AudioLDM/CLAP) instead of a token sequence
    file_ext: str             # what inference writes
    extensions: tuple[str, ...]  # media files we accept as input
    # The pipeline's specifics: names of functions in nextgpt.model.media_files (named here, not imported: the
    # table sits at the top and the decoders in model/), given this modality's cfg.inference mapping as `settings`:
    pipeline_arguments: str   # settings -> sizes + output_type beside prompt_embeds
    read_output: str          # (output, pipeline, settings) -> (data, rate)
    encode_file: str          # (data, rate) -> bytes of the .file_ext file

    @property
    def signal_tokens(self) -> list[str]:
        return [f"[{self.signal_prefix}{i}]" for i in range(self.num_signal_tokens)]

    @property
    def captions_key(self) -> str:          # *_instruction_tuning.json / *_generation.json
        return f"{self.name}_captions"

    @property
    def embeddings_key(self) -> str:
        return f"{self.name}_caption_embeddings"

    @property
    def generation_loss_key(self) -> str:   # train.loss_weights / forward's term: the denoising loss (gen_image)
        return f"gen_{self.name}"


MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in (
        Modality(name="image", signal_prefix="IMG", num_signal_tokens=4, imagebind_key="vision",
                 pair_key="image_name", media_folder="images", input_key="input_image", output_key="output_image",
                 placeholder="<image>", pipeline="StableDiffusionPipeline", pooled=False, file_ext="png",
                 extensions=(".jpg", ".jpeg", ".png", ".bmp", ".webp"),
                 pipeline_arguments="image_arguments", read_output="image_output",
                 encode_file="png_bytes"),
        Modality(name="video", signal_prefix="VID", num_signal_tokens=24, imagebind_key="vision",
                 pair_key="video_name", media_folder="videos", input_key="input_video", output_key="output_video",
                 placeholder="<video>", pipeline="TextToVideoSDPipeline", pooled=False, file_ext="mp4",
                 extensions=(".mp4", ".avi", ".mov", ".mkv", ".webm"),
                 pipeline_arguments="video_arguments", read_output="video_output",
                 encode_file="mp4_bytes"),
        Modality(name="audio", signal_prefix="AUD", num_signal_tokens=8, imagebind_key="audio",
                 pair_key="audio_name", media_folder="audios", input_key="input_audio", output_key="output_audio",
                 placeholder="<audio>", pipeline="AudioLDMPipeline", pooled=True, file_ext="wav",
                 extensions=(".wav", ".flac", ".mp3", ".ogg"),
                 pipeline_arguments="audio_arguments", read_output="audio_output",
                 encode_file="wav_bytes"),
    )
}


def get(name: str) -> Modality:
    try:
        return MODALITIES[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; known: {', '.join(MODALITIES)}") from None


def added_tokens() -> list[str]:
    """The 38 tokens NExT-GPT adds, in the original order (<Img>, </Img>, [IMG0-3], [VID0-23], [AUD0-7])."""
    tokens = [MEDIA_START, MEDIA_END]
    for m in MODALITIES.values():
        tokens += m.signal_tokens
    return tokens


def conditioning_shape(modality: str, decoder_dir: str | Path) -> tuple[int, int]:
    """(tokens, dim) that the decoder's text encoder produces, read from the pipeline folder's JSON configs.

    SD-1.5 -> (77, 768); SD-2 / Zeroscope -> (77, 1024); AudioLDM (CLAP text_embeds, pooled) -> (1, 512).
    Reads only small JSON files, so it is cheap enough for check_ckpt and config validation.
    """
    m = get(modality)
    root = Path(decoder_dir)
    cfg_path = root / "text_encoder" / "config.json"
    cfg = read_json(cfg_path, f"missing (the {modality} decoder folder is incomplete)")
    if m.pooled:
        dim = cfg.get("projection_dim") or cfg.get("text_config", {}).get("projection_dim")
        if not dim:
            raise ValueError(f"{cfg_path}: no projection_dim for the pooled {modality} conditioning")
        return 1, int(dim)
    dim = cfg.get("hidden_size") or cfg.get("text_config", {}).get("hidden_size")
    tokens = cfg.get("max_position_embeddings", 77)
    tok_cfg = root / "tokenizer" / "tokenizer_config.json"
    if tok_cfg.exists():
        tokens = int(read_json(tok_cfg).get("model_max_length", tokens))
    if not dim:
        raise ValueError(f"{cfg_path}: no hidden_size for the {modality} conditioning")
    return int(tokens), int(dim)
