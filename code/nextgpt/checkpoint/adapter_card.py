"""The `adapter/` folder of a checkpoint as a self-contained PEFT adapter: a model card saying what it is and how
to load it, and no absolute paths (PEFT writes the base model's path as given, and its card template is empty).

    finish_adapter(folder, cfg, stage)   after model.llm.save_pretrained(folder): rewrite adapter_config.json's
                                         base_model_name_or_path portably, replace README.md with the card
"""

from __future__ import annotations

import json
from pathlib import Path

from nextgpt.checkpoint.layout import portable_path
from nextgpt.io import atomic_write_text

CARD = """---
library_name: peft
base_model: {base}
tags:
- lora
- nextgpt
---

# NExT-GPT LoRA adapter (stage {stage})

What this is: the LoRA weights (PEFT format; r {r}, alpha {alpha}, on {targets}) that NExT-GPT's stage-{stage}
training put on its frozen LLM, `{base}` (Vicuna-7B v0 for the real model). It is one part of the checkpoint in
the folder above; the rest lives beside it:

- `../delta.safetensors`: the input projection (ImageBind -> LLM), the output projections (LLM -> diffusion
  decoders) and the rows of the {new_tokens} added tokens (`<Img>`, `</Img>`, `[IMG0]`..., `[VID0]`...,
  `[AUD0]`...) in `embed_tokens` / `lm_head`. Those rows are NOT in this adapter.
- `../tokenizer*` files: the base tokenizer plus the added tokens ({vocab} entries).
- `../meta.json`: the fingerprint of the base these weights were trained on; they are only valid on that base.

## Load it with PEFT

The adapter was trained on the base model resized to the checkpoint's tokenizer, so resize first:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

checkpoint = "<this checkpoint folder>"                  # the folder holding adapter/ and delta.safetensors
tokenizer = AutoTokenizer.from_pretrained(checkpoint)    # base tokenizer + the added tokens
base = AutoModelForCausalLM.from_pretrained("{base}")
base.resize_token_embeddings(len(tokenizer))             # before loading the adapter
model = PeftModel.from_pretrained(base, f"{{checkpoint}}/adapter")
```

This gives the LLM with LoRA, but the added tokens' rows are still the resize's random ones. For the whole model
(those rows, both projections, the decoders) load the checkpoint with this repository instead:
`python code/inference.py --config code/config/stage_3.yaml --ckpt <this checkpoint folder>`, or
`nextgpt.checkpoint.load_checkpoint(model, "<this checkpoint folder>")`.
"""


def finish_adapter(folder: str | Path, cfg, stage: int, vocab: int, new_tokens: int) -> None:
    folder = Path(folder)
    base = portable_path(cfg.model.llm)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    lora = cfg.model.lora
    atomic_write_text(folder / "README.md", CARD.format(
        base=base, stage=stage, r=lora.r, alpha=lora.alpha, targets=", ".join(lora.target_modules),
        new_tokens=new_tokens, vocab=vocab))
