"""Write tiny checkpoints of the real architectures in their real on-disk formats (default: ckpt/tiny/).

    vicuna/            2-layer LlamaForCausalLM (save_pretrained, safetensors) + sentencepiece tokenizer.model
                       trained on the toy captions (toyworld.tokenizer_corpus)
    imagebind/imagebind_tiny.pth   ImageBind at the parity-fixture sizes (preset "tiny"), torch.save(state_dict)
    stable-diffusion/  tiny StableDiffusionPipeline (CLIP text encoder + tokenizer, UNet2DCondition, VAE)
    zeroscope/         tiny TextToVideoSDPipeline (UNet3DCondition)
    audioldm/          tiny AudioLDMPipeline (CLAP text model, UNet2DCondition with class embedding, VAE, vocoder)

Everything downstream loads these through the same from_pretrained / load_state_dict code as the real files.
Deterministic (seeded); a few MB; seconds. The weights written here are random (the vocoder's excepted: toy_audio
sets them); scripts/tiny/train_toy_imagebind.py and train_toy_decoders.py then train ImageBind and the decoders
on the toy world in place (`make tiny` runs all three).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

from nextgpt.io import atomic_dir, atomic_write_text

LLM = dict(vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)


def write_tokenizer(out: Path, vocab_size: int = 700) -> None:
    """sentencepiece BPE model like LLaMA's (byte fallback, <unk>=0 <s>=1 </s>=2), trained on the toy text.

    Trained from an iterator into memory, so no temporary path ends up in the model's trainer_spec and two builds
    are byte-identical."""
    import io

    import sentencepiece as spm
    from tiny.toyworld import tokenizer_corpus

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus() * 4), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", num_threads=1, minloglevel=2, hard_vocab_limit=False)
    (out / "tokenizer.model").write_bytes(model.getvalue())


def _quiet() -> None:
    """Per-shard progress bars of a few-MB save are noise in `make tiny` and test logs."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def write_llm(out: Path, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    _quiet()
    with atomic_dir(out) as tmp:
        write_tokenizer(tmp)
        # LLaMA / Vicuna tokenizers prepend <s> (add_bos_token in the released tokenizer_config.json)
        tokenizer = LlamaTokenizer.from_pretrained(str(tmp), add_bos_token=True)
        tokenizer.save_pretrained(str(tmp))
        torch.manual_seed(seed)
        cfg = LlamaConfig(**{**LLM, "vocab_size": len(tokenizer)}, bos_token_id=1, eos_token_id=2, pad_token_id=None)
        model = LlamaForCausalLM(cfg)
        model.save_pretrained(str(tmp))


def write_imagebind(out: Path, seed: int = 0) -> None:
    """ImageBind (vision, audio, text) at the parity-fixture sizes (preset "tiny"), seeded, saved like the real
    imagebind_huge.pth (torch.save of a plain state dict), so load_imagebind reads it the same way. ~6 MB."""
    import io

    import torch
    from nextgpt.imagebind.model import ImageBindModel, preset
    from nextgpt.io import atomic_write_bytes

    torch.manual_seed(seed)
    model = ImageBindModel(**preset("tiny"))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(out, buffer.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# Tiny diffusion decoders. Text-encoder widths differ on purpose (SD 32, Zeroscope 48, CLAP projection 16) so a
# test that mixes up two modalities' conditioning fails on shapes instead of passing silently.

SD_TEXT_WIDTH = 32          # CLIP hidden size of the tiny StableDiffusionPipeline -> conditioning (77, 32)
VIDEO_TEXT_WIDTH = 48       # CLIP hidden size of the tiny TextToVideoSDPipeline  -> conditioning (77, 48)
CLAP_PROJECTION = 16        # CLAP text_embeds width of the tiny AudioLDMPipeline  -> conditioning (1, 16)
CLIP_MAX_LENGTH = 77        # as SD / Zeroscope: prompt_embeds are always (B, 77, D)
CLAP_MAX_LENGTH = 64        # RoBERTa padding length (512 in AudioLDM; the pooled output does not depend on it)

# What the tiny decoders produce by default; code/config/tiny/base.yaml `inference:` mirrors these numbers
# (tests/e2e/test_foundation.py checks that they agree).
TINY_INFERENCE = {"image": dict(steps=2, height=32, width=32), "video": dict(steps=2, height=32, width=32, frames=4),
                  "audio": dict(steps=2, seconds=1.0)}


def inference_sizes() -> dict[str, dict[str, float | int]]:
    """Keyword arguments for each tiny pipeline's __call__ (besides prompt_embeds), keyed by modality."""
    s = TINY_INFERENCE
    return {
        "image": dict(height=s["image"]["height"], width=s["image"]["width"], num_inference_steps=s["image"]["steps"]),
        "video": dict(height=s["video"]["height"], width=s["video"]["width"], num_frames=s["video"]["frames"],
                      num_inference_steps=s["video"]["steps"]),
        "audio": dict(audio_length_in_s=s["audio"]["seconds"], num_inference_steps=s["audio"]["steps"]),
    }


def _toy_words() -> list[str]:
    """Distinct words of the toy world (lower-case, punctuation split off), in first-seen order."""
    import re

    from tiny.toyworld import tokenizer_corpus

    words: dict[str, None] = {}
    for line in tokenizer_corpus():
        for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]", line.lower()):
            words.setdefault(w, None)
    return list(words)


def _learn_merges(words: list[list[str]]) -> list[tuple[str, str]]:
    """Plain BPE: merge the most frequent adjacent pair (ties: alphabetical, so the result is deterministic)
    until every word is one symbol. tokenizers' BpeTrainer breaks ties differently from run to run."""
    words = [list(w) for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for w in words for pair in zip(w, w[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i:i + 2] = [w[i] + w[i + 1]]
                i += 1


def _bpe_files(out: Path, words: list[str], style: str) -> None:
    """vocab.json + merges.txt of a byte-level BPE learned on the toy words, in the released files' layout.

    style "clip": word-final pieces carry "</w>" (CLIP); style "roberta": words after a space start with "Ġ"
    (GPT-2 / RoBERTa). Every toy word becomes one token, and all 256 byte pieces (+ their "</w>" forms for CLIP)
    are in the vocabulary, so any text tokenizes. The transformers tokenizer classes read these files exactly like
    the released ones.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())               # the 256 printable stand-ins for bytes
    if style == "clip":
        spelled = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
        head, tail = alphabet + [c + "</w>" for c in alphabet], ["<|startoftext|>", "<|endoftext|>"]
    elif style == "roberta":
        spelled = [list(w) for w in words] + [["Ġ"] + list(w) for w in words]
        head, tail = ["<s>", "<pad>", "</s>", "<unk>"] + alphabet, ["<mask>"]
    else:
        raise ValueError(f"unknown BPE style {style!r}")
    merges = _learn_merges(spelled)
    vocab = list(dict.fromkeys(head + [a + b for a, b in merges] + tail))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _clip_text(tmp: Path, width: int, seed: int):
    """(CLIPTokenizer, CLIPTextModel) with `width`-dim hidden states over 77 positions."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    _bpe_files(tmp, _toy_words(), "clip")
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp), model_max_length=CLIP_MAX_LENGTH,
                                              pad_token="<|endoftext|>")
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH,
                            projection_dim=width, bos_token_id=vocab["<|startoftext|>"],
                            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    model = CLIPTextModel(config).eval()
    # The text encoder stays random (frozen, as SD's CLIP), but initialised so each position's output is mostly its
    # own token: token embeddings of std 1 (positions keep 0.02), attention / MLP outputs scaled by 0.1. With the
    # default init a caption differs from another by ~10% spread over all 77 positions and the toy decoders barely
    # learned to read it (image ceiling 0.07 all-right vs 0.20 with this, same recipe; README)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        table = model.embeddings.token_embedding.weight
        table.copy_(torch.randn(table.shape, generator=generator))
        for layer in model.encoder.layers:
            layer.self_attn.out_proj.weight.mul_(0.1)
            layer.mlp.fc2.weight.mul_(0.1)
    return tokenizer, model


def _vae(seed: int, in_channels: int = 3):
    """AutoencoderKL with 2 levels (spatial factor 2: 32x32 -> 16x16 latents) and 4 latent channels. One GroupNorm
    group, so a flat colour field keeps its colour through the normalisations (per-channel groups remove it)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=1, sample_size=32,
                         mid_block_add_attention=False)


def toy_scheduler_config() -> dict:
    """The tiny decoders' noise schedule (train_toy_decoders trains on it): cosine betas rescaled to zero terminal
    SNR, v-prediction; DDIM samples it with trailing timesteps, so 2 steps start from pure noise (arXiv 2305.08891)."""
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True,
                steps_offset=1)             # unused with trailing spacing; 1 because SD's pipeline insists


def _save_pipeline(pipe, tmp: Path) -> None:
    """save_pretrained, plus the tokenizer's vocab.json / merges.txt beside tokenizer.json as in the released
    folders (transformers 5 writes only tokenizer.json; older loaders and tools read the pair)."""
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tmp / "_bpe" / name, tmp / "tokenizer" / name)
    shutil.rmtree(tmp / "_bpe")


def write_stable_diffusion(out: Path, seed: int = 0) -> None:
    """Tiny StableDiffusionPipeline: CLIP text (77, 32), UNet2DCondition, AutoencoderKL, DDIM (toy_scheduler_config)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    with atomic_dir(out) as tmp:
        tokenizer, text_encoder = _clip_text(tmp / "_bpe", SD_TEXT_WIDTH, seed)
        torch.manual_seed(seed + 1)
        # sample_size 16 latents x VAE factor 2 = the 32x32 default image. addition_embed_type "text": the caption,
        # attention-pooled, also joins every block's time embedding (a global path beside cross-attention)
        unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=4,
                                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=SD_TEXT_WIDTH, addition_embed_type="text",
                                    addition_embed_type_num_heads=4)
        scheduler = DDIMScheduler(**toy_scheduler_config())
        pipe = StableDiffusionPipeline(vae=_vae(seed + 2), text_encoder=text_encoder, tokenizer=tokenizer,
                                       unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, image_encoder=None, requires_safety_checker=False)
        _save_pipeline(pipe, tmp)


def write_zeroscope(out: Path, seed: int = 0) -> None:
    """Tiny TextToVideoSDPipeline: CLIP text (77, 48), UNet3DCondition, AutoencoderKL, DDIM."""
    import torch
    from diffusers import DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    with atomic_dir(out) as tmp:
        tokenizer, text_encoder = _clip_text(tmp / "_bpe", VIDEO_TEXT_WIDTH, seed + 10)
        torch.manual_seed(seed + 11)
        unet = UNet3DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=4,
                                    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
                                    cross_attention_dim=VIDEO_TEXT_WIDTH)
        scheduler = DDIMScheduler(**toy_scheduler_config())
        pipe = TextToVideoSDPipeline(vae=_vae(seed + 12), text_encoder=text_encoder, tokenizer=tokenizer,
                                     unet=unet.eval(), scheduler=scheduler)
        _save_pipeline(pipe, tmp)


def write_audioldm(out: Path, seed: int = 0) -> None:
    """Tiny AudioLDMPipeline: CLAP text model (text_embeds (B, 16)), UNet2DCondition conditioned through its class
    embedding as AudioLDM's (class_embed_type simple_projection, concatenated to the time embedding; the
    attention blocks' cross_attention_dim equals their width so encoder_hidden_states=None is self-attention),
    a 1-channel "mel" VAE and a SpeechT5HifiGan vocoder at 16 kHz: toy_audio's band spectrogram (32 bands, 20 frames
    a second) and the vocoder that inverts it exactly (its weights set, not trained)."""
    import torch
    from diffusers import AudioLDMPipeline, DDIMScheduler, UNet2DConditionModel
    from transformers import ClapTextConfig, ClapTextModelWithProjection, RobertaTokenizer

    from tiny import toy_audio

    with atomic_dir(out) as tmp:
        _bpe_files(tmp / "_bpe", _toy_words(), "roberta")
        tokenizer = RobertaTokenizer.from_pretrained(str(tmp / "_bpe"), model_max_length=CLAP_MAX_LENGTH)
        torch.manual_seed(seed + 20)
        # RoBERTa positions start after the padding index, hence +2
        text_encoder = ClapTextModelWithProjection(ClapTextConfig(
            vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=CLAP_MAX_LENGTH + 2, projection_dim=CLAP_PROJECTION,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id)).eval()
        torch.manual_seed(seed + 21)
        widths = (16, 32)
        unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=widths, norm_num_groups=8, attention_head_dim=4,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                    cross_attention_dim=widths, class_embed_type="simple_projection",
                                    projection_class_embeddings_input_dim=CLAP_PROJECTION,
                                    class_embeddings_concat=True)
        # 16 kHz, hop 800: 20 frames per second over 32 bands (toy_audio)
        vocoder = toy_audio.build_vocoder()
        scheduler = DDIMScheduler(**toy_scheduler_config())
        pipe = AudioLDMPipeline(vae=_vae(seed + 23, in_channels=1), text_encoder=text_encoder,
                                tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler, vocoder=vocoder)
        _save_pipeline(pipe, tmp)


PIPELINE_WRITERS = {"image": ("stable-diffusion", write_stable_diffusion),
                    "video": ("zeroscope", write_zeroscope),
                    "audio": ("audioldm", write_audioldm)}


def write_pipelines(out: Path, seed: int = 0, only: list[str] | None = None) -> None:
    """Tiny diffusers pipelines: out/stable-diffusion, out/zeroscope, out/audioldm (save_pretrained folders);
    only: those modalities."""
    _quiet()
    for modality, (folder, writer) in PIPELINE_WRITERS.items():
        if only is None or modality in only:
            writer(out / folder, seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="ckpt/tiny", help="output folder (default: ckpt/tiny)")
    p.add_argument("--data", default="data/toy", help="toy data folder (unused: the corpus is toyworld's)")
    p.add_argument("--only", nargs="*", choices=["llm", "imagebind", "pipelines"], default=None)
    p.add_argument("--train", action="store_true",
                   help="then train ImageBind and the decoders on the toy world (train_toy_imagebind.py, "
                        "train_toy_decoders.py; what `make tiny` and the demo use; tests keep the random weights)")
    args = p.parse_args(argv)
    out = Path(args.out)
    parts = args.only or ["llm", "imagebind", "pipelines"]
    writers = {"llm": (write_llm, out / "vicuna", "LLM + tokenizer"),
               "imagebind": (write_imagebind, out / "imagebind" / "imagebind_tiny.pth", "ImageBind"),
               "pipelines": (write_pipelines, out, "diffusion pipelines (stable-diffusion, zeroscope, audioldm)")}
    if args.train:
        # a part already toy-trained with the current recipe is kept, so an interrupted `make tiny` resumes
        from tiny import train_toy_decoders, train_toy_imagebind

        if "imagebind" in parts and train_toy_imagebind.done(writers["imagebind"][1]):
            parts = [p for p in parts if p != "imagebind"]
        if "pipelines" in parts:
            todo = [name for name, (folder, _) in PIPELINE_WRITERS.items()
                    if not train_toy_decoders.done(out / folder)]
            writers["pipelines"] = (lambda path: write_pipelines(path, only=todo), out,
                                    f"diffusion pipelines ({', '.join(PIPELINE_WRITERS[m][0] for m in todo)})")
            if not todo:
                parts = [p for p in parts if p != "pipelines"]
    for part in parts:
        writer, path, what = writers[part]
        try:
            writer(path)
        except (OSError, ValueError) as e:
            print(f"error: {what}: {e}", file=sys.stderr)
            return 2
        print(f"[tiny] {what} -> {path}")
    made = {"random": parts}
    if args.train:
        import torch

        from tiny import train_toy_decoders, train_toy_imagebind

        print(f"[tiny] training the toy components on {torch.get_num_threads()} threads (once per clone)", flush=True)
        made["imagebind"] = train_toy_imagebind.train(out)
        made["decoders"] = train_toy_decoders.train(out, list(train_toy_decoders.FOLDERS))
    if args.only is None:
        # what the tiny checkpoints were made from: random parts, and each toy training's recipe and time
        atomic_write_text(out / ".complete", json.dumps(made, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from nextgpt.cli import run as run_cli  # any failure: one `error:` line, the traceback in a log it names

    raise SystemExit(run_cli(main, "make_tiny_ckpt"))
