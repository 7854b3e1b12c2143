"""The LLM tokenizer with NExT-GPT's 38 added tokens, and their ids.

Signal-token sequences are built by concatenating ids, never by tokenizing a space-joined string: whether spaces
around added tokens survive depends on the tokenizer version (the original tokenised a space-joined string).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

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


# ------------------------------------------------------------------------------------------------------------------
# Conversation templates: resolved with the tokenizer (add_nextgpt_tokens), so they live beside it.
#
# Conversation templates: the text around human and assistant turns (`model.template`).
#
#     vicuna_v0  the original NExT-GPT's "###" template (its prompt_wrap / build_one_instance), token for token:
#                <s>### Human: {q1}\\n### Assistant: {a1}\\n###Human: {q2}\\n### Assistant: {a2}\\n###
#     chat       the tokenizer's own chat template (tokenizer.chat_template, Jinja), for LLMs trained with one
#                (Qwen2-Instruct, Llama-3-Instruct, Mistral-Instruct ...). Its pieces are found by rendering a
#                conversation of sentinel strings once and cutting the text around them.
#
# conversation.encode builds every sample from the five strings of a Template, so the label mask, soft-token
# positions and signal blocks are computed the same way for any template: loss on the assistant text, its signal
# block and `turn_end`; never on the human parts.
#
# A template is resolved once, when the tokenizer is loaded (tokens.load_tokenizer), and carried on TokenIds.

TemplateName = Literal["vicuna_v0", "chat"]
TEMPLATES = ("vicuna_v0", "chat")


@dataclass(frozen=True)
class Template:
    name: str
    bos: bool                       # start every sequence with the tokenizer's BOS id (when it has one)
    first_human: str                # before the first human turn (and before the first medium's <Img>)
    later_human: str                # before every later human turn
    assistant: str                  # ends every human turn; the model answers after it
    turn_end: str                   # ends every assistant turn (supervised)
    stop: str                       # generation stops when the decoded text contains this
    # Special tokens the markup itself uses (e.g. <|im_start|>, <|im_end|>): allowed in the markup, refused in data.
    markup_tokens: tuple[str, ...] = ()


# The original's strings (conversation.py documents how each one is tokenised).
VICUNA_V0 = Template(name="vicuna_v0", bos=True, first_human="### Human: ", later_human="Human: ",
                     assistant="\n### Assistant: ", turn_end="\n###", stop="###")

# Sentinels that no template produces and no tokenizer splits oddly inside a Jinja render: plain ASCII words.
_Q1, _A1, _Q2 = "QQQSENTINELONEQQQ", "AAASENTINELONEAAA", "QQQSENTINELTWOQQQ"


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_template(tokenizer) -> Template:
    """The tokenizer's chat template as a Template. ValueError when it has none or is not turn-regular
    (rendering [q1, a1, q2] must extend the rendering of [q1, a1], and every human turn must end the same way)."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model.template=chat but the tokenizer of {name} has no chat_template "
                         "(use model.template=vicuna_v0)")
    user = lambda text: {"role": "user", "content": text}          # noqa: E731
    bot = lambda text: {"role": "assistant", "content": text}      # noqa: E731
    try:
        prompt1 = _render(tokenizer, [user(_Q1)], True)             # ... q1 <assistant header>
        turn1 = _render(tokenizer, [user(_Q1), bot(_A1)], False)    # ... q1 <assistant header> a1 <turn end>
        prompt2 = _render(tokenizer, [user(_Q1), bot(_A1), user(_Q2)], True)
    except Exception as e:  # noqa: BLE001 - a Jinja template can raise anything (TemplateError, TypeError ...)
        raise ValueError(f"{name}: cannot render its chat template ({type(e).__name__}: {e})") from None
    problems = []
    if prompt1.count(_Q1) != 1 or turn1.count(_A1) != 1 or prompt2.count(_Q2) != 1:
        problems.append("the template does not render each message once")
    elif not turn1.startswith(prompt1):
        problems.append("[q1, a1] does not extend the generation prompt of [q1]")
    elif not prompt2.startswith(turn1):
        problems.append("[q1, a1, q2] does not extend [q1, a1]")
    if problems:
        raise ValueError(f"{name}: chat template not usable as model.template=chat: {problems[0]}")
    first_human, after_q1 = prompt1.split(_Q1)
    turn_end = turn1[len(prompt1):].split(_A1)[1]
    if turn1[len(prompt1):].split(_A1)[0]:
        raise ValueError(f"{name}: chat template puts text between the assistant header and the answer")
    later_human, after_q2 = prompt2[len(turn1):].split(_Q2)
    if after_q2 != after_q1:
        raise ValueError(f"{name}: chat template ends the first and later human turns differently "
                         f"({after_q1!r} vs {after_q2!r})")
    bos_token = getattr(tokenizer, "bos_token", None)
    markup = (first_human, later_human, after_q1, turn_end)
    specials = set(getattr(tokenizer, "all_special_tokens", [])) | set(tokenizer.get_added_vocab())
    markup_tokens = tuple(sorted(t for t in specials if t and any(t in s for s in markup)))
    # The stop: the first special token of the turn end (e.g. <|im_end|>), else the turn end's stripped text.
    stop = next((t for t in sorted(markup_tokens, key=turn_end.find) if t in turn_end), turn_end.strip())
    if not stop:
        raise ValueError(f"{name}: chat template ends an assistant turn with nothing to stop generation at")
    return Template(name="chat",
                    # a template that writes the BOS text itself (Llama-3's <|begin_of_text|>) needs no BOS id
                    bos=bool(bos_token) and not first_human.startswith(bos_token),
                    first_human=first_human, later_human=later_human, assistant=after_q1, turn_end=turn_end,
                    stop=stop, markup_tokens=markup_tokens)


def resolve(name: str, tokenizer) -> Template:
    """`model.template` -> Template for this tokenizer."""
    if name == "vicuna_v0":
        return VICUNA_V0
    if name == "chat":
        return chat_template(tokenizer)
    raise ValueError(f"model.template: {name!r}; allowed: {', '.join(TEMPLATES)}")
