"""The LLM tokenizer with NExT-GPT's 38 added tokens, and their ids.

Signal-token sequences are built by concatenating ids, never by tokenizing a space-joined string: whether spaces
around added tokens survive depends on the tokenizer version (the original tokenised a space-joined string).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from nextgpt.modalities import MEDIA_END, MEDIA_START, MODALITIES, added_tokens

IGNORE = -100          # label of an unsupervised position (torch cross_entropy's ignore_index)


@dataclass(frozen=True)
class TokenIds:
    bos: int | None                        # None for tokenizers without one (Qwen2)
    eos: int
    pad: int
    media_start: int                       # <Img>
    media_end: int                         # </Img>
    signal: dict[str, list[int]] = field(default_factory=dict)   # modality -> ids of [IMG0..3] etc.
    # The conversation format (model.template) resolved for this tokenizer; None means vicuna_v0.
    template: "Template | None" = field(default=None, compare=False)

    def modality_of_signal_start(self) -> dict[int, str]:
        return {ids[0]: m for m, ids in self.signal.items()}

    @property
    def new_token_ids(self) -> list[int]:
        ids = [self.media_start, self.media_end]
        for m in MODALITIES:
            ids += self.signal[m]
        return ids


def add_nextgpt_tokens(tokenizer, template: str = "vicuna_v0") -> TokenIds:
    """Add the 38 tokens (idempotent: a tokenizer saved with them already keeps its ids) and return their ids,
    with `template` (model.template) resolved for this tokenizer."""
    from nextgpt.data.templates import resolve

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
        template=resolve(template, tokenizer),
    )


def load_tokenizer(path: str | Path, template: str = "vicuna_v0"):
    """The LLM's tokenizer (Vicuna, any Llama-family or Qwen2 folder, or a saved delta checkpoint)
    -> (tokenizer, TokenIds with `template` resolved)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: tokenizer folder not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot load the tokenizer ({e})") from None
    return tokenizer, add_nextgpt_tokens(tokenizer, template)


# ----------------------------------------------------------------------------------------------------------------
# Signal blocks ([IMG0..3] / [VID0..23] / [AUD0..7]) in a list of ids. The one scanner: conversation.encode records
# blocks while it builds a sample (and checks them with this), collate carries them to the model, generation scans
# its output with it.

@dataclass
class SignalScan:
    blocks: list[tuple[str, int]] = field(default_factory=list)      # (modality, start) of every complete block
    truncated: list[tuple[str, int]] = field(default_factory=list)   # a block that starts right but the ids end
    malformed: list[tuple[str, int]] = field(default_factory=list)   # signal ids out of order (a stray or a gap)


def scan_signal_blocks(ids: Sequence[int], token_ids: TokenIds) -> SignalScan:
    """Every signal block of `ids` in order, plus the truncated / malformed runs (never raises).

    A run of signal ids that is not a complete in-order block is skipped as a whole, so one bad run is reported
    once; a block cut off by the end of `ids` ends the scan (generation stopped inside it).
    """
    signal_of = {i: m for m, signal in token_ids.signal.items() for i in signal}
    scan = SignalScan()
    position, n = 0, len(ids)
    while position < n:
        modality = signal_of.get(ids[position])
        if modality is None:
            position += 1
            continue
        expected = token_ids.signal[modality]
        got = list(ids[position:position + len(expected)])
        if got == expected:
            scan.blocks.append((modality, position))
            position += len(expected)
        elif len(got) < len(expected) and got == expected[:len(got)]:
            scan.truncated.append((modality, position))
            break
        else:
            scan.malformed.append((modality, position))
            while position < n and ids[position] in signal_of:
                position += 1
    return scan


def signal_blocks(ids: Sequence[int], token_ids: TokenIds, where: str = "") -> list[tuple[str, int]]:
    """[(modality, start)] of every signal block in `ids` (training ids or labels); any other signal id -> ValueError
    naming `where`."""
    scan = scan_signal_blocks(ids, token_ids)
    problems = sorted([(p, m, "incomplete") for m, p in scan.truncated] + [(p, m, "bad") for m, p in scan.malformed])
    if problems:
        position, modality, kind = problems[0]
        token = ids[position]
        if kind == "bad" and token == token_ids.signal[modality][0]:
            kind = "incomplete"                 # starts like a block, breaks off inside it
        if kind == "incomplete":
            raise ValueError(f"{where}: incomplete {modality} signal block at position {position}")
        raise ValueError(f"{where}: stray signal token id {token} at position {position}")
    return scan.blocks
