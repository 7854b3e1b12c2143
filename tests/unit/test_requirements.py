"""requirements.txt pins nothing that nothing uses: every package is imported somewhere in code/, scripts/ or
tests/, or is listed below with the library that needs it (pinned so that the tested set installs as tested)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMPORT_NAMES = {"pyyaml": "yaml", "pillow": "PIL", "huggingface-hub": "huggingface_hub", "protobuf": "google.protobuf"}
NEEDED_BY_A_LIBRARY = {
    "tokenizers": "transformers' fast tokenizers",
    "huggingface-hub": "transformers / diffusers / peft, and its `hf download` command in make check-ckpt's hints",
    "accelerate": "peft, transformers' low_cpu_mem_usage and 8-bit loading",
    "sentencepiece": "LlamaTokenizer (the Vicuna tokenizer.model)",
    "protobuf": "LlamaTokenizer's sentencepiece model conversion",
    "einops": "deepspeed",
}


def requirement_names() -> list[str]:
    names = []
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.append(re.split(r"[=<>!~\[; ]", line)[0].lower())
    return names


def test_every_pinned_package_is_used():
    sources = "\n".join(p.read_text(errors="ignore") for folder in ("code", "scripts", "dev", "tests")
                        for p in (REPO / folder).rglob("*.py"))
    unused = []
    for name in requirement_names():
        if name in NEEDED_BY_A_LIBRARY:
            continue
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        if not re.search(rf"^\s*(import|from)\s+{re.escape(module)}\b", sources, re.MULTILINE):
            unused.append(name)
    assert not unused, f"pinned in requirements.txt but imported nowhere: {unused}"
    assert "soxr" not in requirement_names()
