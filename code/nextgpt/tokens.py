"""The LLM tokenizer with NExT-GPT's 38 added tokens, and their ids.

Signal-token sequences are built by concatenating ids, never by tokenizing a space-joined string: whether spaces
around added tokens survive depends on the tokenizer version (reference §1.4, defect 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nextgpt.modalities import MEDIA_END, MEDIA_START, MODALITIES, added_tokens


@dataclass(frozen=True)
class TokenIds:
    bos: int
    eos: int
    pad: int
    media_start: int                       # <Img>
    media_end: int                         # </Img>
    signal: dict[str, list[int]] = field(default_factory=dict)   # modality -> ids of [IMG0..3] etc.

    def modality_of_signal_start(self) -> dict[int, str]:
        return {ids[0]: m for m, ids in self.signal.items()}

    @property
    def new_token_ids(self) -> list[int]:
        ids = [self.media_start, self.media_end]
        for m in MODALITIES:
            ids += self.signal[m]
        return ids


def add_nextgpt_tokens(tokenizer) -> TokenIds:
    """Add the 38 tokens (idempotent: a tokenizer saved with them already keeps its ids) and return their ids."""
    tokenizer.add_tokens([t for t in added_tokens() if t not in tokenizer.get_vocab()])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token      # as the original: pad = </s>, right padding
    tokenizer.padding_side = "right"

    def one_id(token: str) -> int:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"tokenizer splits the added token {token!r} into {len(ids)} ids {ids}")
        return ids[0]

    return TokenIds(
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        media_start=one_id(MEDIA_START),
        media_end=one_id(MEDIA_END),
        signal={m.name: [one_id(t) for t in m.signal_tokens] for m in MODALITIES.values()},
    )


def load_tokenizer(path: str | Path):
    """LlamaTokenizer from a Vicuna folder (or a saved delta checkpoint) -> (tokenizer, TokenIds)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: tokenizer folder not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot load the tokenizer ({e})") from None
    return tokenizer, add_nextgpt_tokens(tokenizer)
