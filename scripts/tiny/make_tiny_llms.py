"""Tiny LLMs of the other supported families, built offline, for `model.llm` tests and the "your LLM" walkthrough.

    mistral/   2-layer MistralForCausalLM with grouped-query attention (4 query heads, 2 key/value heads) and the
               tiny Vicuna's sentencepiece tokenizer (scripts/tiny/make_tiny_ckpt.py writes it)
    qwen2/     2-layer Qwen2ForCausalLM (GQA, q/k/v biases) with a byte-level BPE Qwen2Tokenizer learned on the toy
               words: no BOS, <|endoftext|> pad, <|im_start|>/<|im_end|> and a ChatML chat template
               (model.template=chat), eos = <|im_end|> as in the Instruct releases

    python scripts/tiny/make_tiny_llms.py --out ckpt/tiny            # -> ckpt/tiny/mistral, ckpt/tiny/qwen2

Seeded and deterministic; same widths as the tiny Vicuna (hidden 64), so only the LLM differs in a run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tiny import make_tiny_ckpt
from nextgpt.io import atomic_dir

# ChatML, the turn format Qwen2-Instruct uses, written for these tiny models (one system line, then the turns).
CHATML = ("{% for message in messages %}"
          "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
          "<|im_end|>\n{% endif %}"
          "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_mistral(out: Path, seed: int = 0) -> None:
    import torch
    from transformers import LlamaTokenizer, MistralConfig, MistralForCausalLM

    make_tiny_ckpt._quiet()
    with atomic_dir(out) as tmp:
        make_tiny_ckpt.write_tokenizer(tmp)
        tokenizer = LlamaTokenizer.from_pretrained(str(tmp), add_bos_token=True)
        tokenizer.save_pretrained(str(tmp))
        torch.manual_seed(seed)
        sizes = {**make_tiny_ckpt.LLM, "vocab_size": len(tokenizer), "num_key_value_heads": 2}   # GQA 4:2
        config = MistralConfig(**sizes, sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=None)
        MistralForCausalLM(config).save_pretrained(str(tmp))


def write_qwen2(out: Path, seed: int = 0) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    make_tiny_ckpt._quiet()
    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory() as bpe:
        make_tiny_ckpt._bpe_files(Path(bpe), make_tiny_ckpt._toy_words(), "roberta")
        vocab = json.loads((Path(bpe) / "vocab.json").read_text())
        vocab = {t: i for i, t in enumerate(t for t in vocab if t not in ("<s>", "<pad>", "</s>", "<unk>", "<mask>"))}
        merges = [tuple(line.split()) for line in (Path(bpe) / "merges.txt").read_text().splitlines()[1:]]
        tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})
        tokenizer.chat_template = CHATML
        tokenizer.save_pretrained(str(tmp))
        torch.manual_seed(seed)
        sizes = {k: v for k, v in make_tiny_ckpt.LLM.items() if k not in ("vocab_size", "num_key_value_heads")}
        config = Qwen2Config(**sizes, vocab_size=len(tokenizer), num_key_value_heads=2, use_sliding_window=False,
                             bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                             pad_token_id=tokenizer.pad_token_id)
        Qwen2ForCausalLM(config).save_pretrained(str(tmp))


WRITERS = {"mistral": write_mistral, "qwen2": write_qwen2}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="ckpt/tiny", help="parent folder (default: ckpt/tiny)")
    p.add_argument("--only", nargs="*", choices=list(WRITERS), default=None)
    args = p.parse_args(argv)
    for name in args.only or list(WRITERS):
        try:
            WRITERS[name](Path(args.out) / name)
        except (OSError, ValueError) as e:
            print(f"error: tiny {name}: {e}", file=sys.stderr)
            return 2
        print(f"[tiny] {name} -> {Path(args.out) / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
