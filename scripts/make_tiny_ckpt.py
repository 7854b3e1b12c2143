"""Write tiny checkpoints of the real architectures in their real on-disk formats (default: ckpt/tiny/).

    vicuna/            2-layer LlamaForCausalLM (save_pretrained, safetensors) + sentencepiece tokenizer.model
                       trained on the toy captions (nextgpt.toy.tokenizer_corpus)
    imagebind/imagebind_tiny.pth   ImageBind at the parity-fixture sizes (preset "tiny"), torch.save(state_dict)
    stable-diffusion/  tiny StableDiffusionPipeline (CLIP text encoder + tokenizer, UNet2DCondition, VAE)
    zeroscope/         tiny TextToVideoSDPipeline (UNet3DCondition)
    audioldm/          tiny AudioLDMPipeline (CLAP text model, UNet2DCondition with class embedding, VAE, vocoder)

Everything downstream loads these through the same from_pretrained / load_state_dict code as the real files.
Deterministic (seeded); a few MB; seconds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from nextgpt.io import atomic_dir, atomic_write_text  # noqa: E402

LLM = dict(vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)


def write_tokenizer(out: Path, vocab_size: int = 700) -> None:
    """sentencepiece BPE model like LLaMA's (byte fallback, <unk>=0 <s>=1 </s>=2), trained on the toy text."""
    import sentencepiece as spm
    from nextgpt.toy import tokenizer_corpus

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(tokenizer_corpus() * 4) + "\n")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", num_threads=1, minloglevel=2, hard_vocab_limit=False)
        shutil.copy(Path(tmp) / "tokenizer.model", out / "tokenizer.model")


def write_llm(out: Path, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    with atomic_dir(out) as tmp:
        write_tokenizer(tmp)
        tokenizer = LlamaTokenizer.from_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        torch.manual_seed(seed)
        cfg = LlamaConfig(**{**LLM, "vocab_size": len(tokenizer)}, bos_token_id=1, eos_token_id=2, pad_token_id=None)
        model = LlamaForCausalLM(cfg)
        model.save_pretrained(str(tmp))


def write_imagebind(out: Path, seed: int = 0) -> None:
    """Filled by the ImageBind module: nextgpt.imagebind.model with the "tiny" preset."""
    import torch
    from nextgpt.imagebind.model import ImageBindModel, preset

    torch.manual_seed(seed)
    model = ImageBindModel(**preset("tiny"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(out)


def write_pipelines(out: Path, seed: int = 0) -> None:
    """Tiny diffusers pipelines (stable-diffusion/, zeroscope/, audioldm/)."""
    raise NotImplementedError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="ckpt/tiny", help="output folder (default: ckpt/tiny)")
    p.add_argument("--data", default="data/toy", help="toy data folder (unused: the corpus is nextgpt.toy's)")
    p.add_argument("--only", nargs="*", choices=["llm", "imagebind", "pipelines"], default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    parts = args.only or ["llm", "imagebind", "pipelines"]
    if "llm" in parts:
        write_llm(out / "vicuna")
        print(f"[tiny] LLM + tokenizer -> {out / 'vicuna'}")
    if "imagebind" in parts:
        write_imagebind(out / "imagebind" / "imagebind_tiny.pth")
        print(f"[tiny] ImageBind -> {out / 'imagebind' / 'imagebind_tiny.pth'}")
    if "pipelines" in parts:
        write_pipelines(out)
        print(f"[tiny] diffusion pipelines -> {out}/{{stable-diffusion,zeroscope,audioldm}}")
    if args.only is None:
        atomic_write_text(out / ".complete", "ok\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
