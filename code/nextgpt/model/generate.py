"""The generation path that inference.py, app.py and evaluate.py share: conversations -> replies (+ media).

    Conversation(turns human/gpt/.../human, media) --template (prompt_for_generation)--> ids (L,) + soft-token slots
    --NextGPT.embed (input_proj(ImageBind feature) written in)--> inputs_embeds (B, L, D), left-padded
    --LLM.generate (sampled or greedy; stops at model.stop, "###" for vicuna_v0, or </s>; with
      Sampling.force_signal a started block is completed in order: SignalBlocks)--> new ids per row
    --Conversation.require: a block of each required modality the reply lacks is put at its end--> ids per row
    --tokens.scan_signal_blocks--> (modality, start) of each complete [IMG0..3] / [VID0..23] / [AUD0..7] block
    --one forward over prompt + answer (right-padded)--> hidden_states[hidden_layer] (B, L', D)
    --NextGPT.project at each block--> conditioning (1, T, D_out) per output
    --Decoders (each pipeline loaded on first use), optional--> Decoded media, optionally written as png/mp4/wav

The conditioning comes from the same positions as in training (the signal tokens as inputs), so the last token of a
block needs no extra generation step (the original's generate ran a separate loop for the signal tokens). A block
cut off by max_new_tokens is reported in Reply.truncated, signal ids out of order in Reply.malformed.

    replies = generate(model, [Conversation.of("show me a cat")], Sampling.from_config(cfg.inference), seed=13,
                       decoders=Decoders(cfg), out_dir="runs/x")
    for piece in stream(model, conversation, sampling, seed): ...   # str pieces of the reply, then the Reply

Batched rows are independent conversations; sampling draws from one generator for the whole batch, so a row's
sampled reply depends on its batch (greedy replies do not).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from nextgpt.config import InferenceConfig
from nextgpt.data.types import Media, Turn
from nextgpt.tokens import scan_signal_blocks

logger = logging.getLogger("nextgpt")


_DEFAULTS = InferenceConfig()  # the sampling defaults live in the config schema (inference.*), not here too


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = _DEFAULTS.max_new_tokens
    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.top_p
    do_sample: bool = _DEFAULTS.do_sample
    # constrained decoding (SignalBlocks): once [IMG0] / [VID0] / [AUD0] is generated the rest of its block follows
    # in order, a block's later ids never appear outside one, and no block starts that max_new_tokens would cut
    force_signal: bool = _DEFAULTS.force_signal

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @classmethod
    def from_config(cls, settings, **overrides) -> "Sampling":
        """From cfg.inference (max_new_tokens, temperature, top_p, do_sample, force_signal), with per-request
        overrides."""
        values = dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                      top_p=settings.top_p, do_sample=settings.do_sample, force_signal=settings.force_signal)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class Conversation:
    """A chat so far: turns alternate human/gpt and end with a human turn; every input medium sits at the start
    of the first human turn (the only place the template has for media, as in training)."""
    turns: list[Turn]
    media: list[Media] = field(default_factory=list)
    # modalities the reply must carry (inference.py --require, evaluate on its generation requests): a block of
    # each that the model did not write is put at the end of its answer, and decoded like a generated one
    require: tuple[str, ...] = ()

    def __post_init__(self):
        from nextgpt.modalities import get

        self.require = tuple(self.require)
        for modality in self.require:
            get(modality)                           # an unknown modality is an error here, not a missing output

    @classmethod
    def of(cls, text: str, media: Sequence[Media] = (), require: Sequence[str] = ()) -> "Conversation":
        return cls([Turn("human", text)], list(media), tuple(require))


@dataclass
class Output:
    """One generated medium."""
    modality: str
    conditioning: torch.Tensor                  # (1, T, D_out) from output_proj[modality], on the model's device
    decoded: object | None = None               # nextgpt.model.decoders.Decoded when decoders were given
    path: Path | None = None                    # the written file when out_dir was given


@dataclass
class Reply:
    text: str                                   # the answer up to (not including) "###", signal tokens included
    token_ids: list[int]                        # generated ids up to and including the stop
    outputs: list[Output] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)    # modalities whose block max_new_tokens cut off
    malformed: list[str] = field(default_factory=list)    # modalities whose signal ids came out of order
    display_text: str = ""                      # `text` without the signal-token strings (what a person reads)
    appended: list[str] = field(default_factory=list)     # required modalities whose block was put at the end

    def as_turn(self) -> Turn:
        """The gpt turn to append to the conversation; its signal block is rebuilt from ids by the template (it
        holds one block: the first generated modality)."""
        return Turn("gpt", self.display_text, self.outputs[0].modality if self.outputs else None)


# ----------------------------------------------------------------------------------------------------------------
def _prepare(model, conversations: Sequence[Conversation]):
    """-> (input_ids (B, L) left-padded, attention_mask (B, L), media positions (N, 2), features (N, F) | None,
    per-row prompt ids)."""
    from nextgpt.data.conversation import prompt_for_generation

    if not conversations:
        raise ValueError("no conversations to generate for")
    encoded = [prompt_for_generation(c.turns, c.media, model.tokenizer, model.token_ids) for c in conversations]
    longest = max(len(e.input_ids) for e in encoded)
    context = getattr(model.causal_lm.config, "max_position_embeddings", None)
    if context is not None and longest >= context:
        raise ValueError(f"the conversation is {longest} tokens; the model's context is {context} "
                         "(shorten the prompt or clear the conversation)")
    pad = model.token_ids.pad
    rows, mask, positions = [], [], []
    for row, e in enumerate(encoded):
        shift = longest - len(e.input_ids)      # left padding: every row's answer starts at column `longest`
        rows.append([pad] * shift + e.input_ids)
        mask.append([0] * shift + [1] * len(e.input_ids))
        positions += [[row, shift + p] for p in e.media_positions]
    device = model.device
    media = [m for c in conversations for m in c.media]       # the same order as `positions`
    features = model.encode_media([m.path for m in media], [m.modality for m in media]) if media else None
    return (torch.tensor(rows, device=device), torch.tensor(mask, device=device),
            torch.tensor(positions, dtype=torch.long, device=device).view(-1, 2), features,
            [e.input_ids for e in encoded])


class SignalBlocks:
    """Constrained decoding of signal blocks (Sampling.force_signal), a transformers logits processor.

    After a block's id k the only allowed next id is its id k+1, so a started block always completes in order;
    ids k >= 1 are never allowed elsewhere (no stray or out-of-order signal ids); a block does not start when
    fewer new tokens remain than it has ids (max_new_tokens would cut it). scores (B, V) -> (B, V).
    Written here because no library processor forces a multi-token continuation only after a trigger id
    (transformers' force_words / constraints need beam search and place the words anywhere)."""

    def __init__(self, signal: dict[str, list[int]], max_new_tokens: int):
        self.follows = {a: b for ids in signal.values() for a, b in zip(ids, ids[1:])}    # id -> the next id
        self.inner = sorted(i for ids in signal.values() for i in ids[1:])
        self.starts = {ids[0]: len(ids) for ids in signal.values()}
        self.max_new_tokens = max_new_tokens
        self.prompt_length: int | None = None     # input_ids' length at the first call: the prompt

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        remaining = self.max_new_tokens - (input_ids.shape[1] - self.prompt_length)
        banned = self.inner + [start for start, n in self.starts.items() if n > remaining]
        scores = scores.clone()
        scores[:, banned] = -torch.inf
        for row, last in enumerate(input_ids[:, -1].tolist()):
            if last in self.follows:                  # inside a block: its next id, nothing else
                forced = self.follows[last]
                scores[row] = -torch.inf
                scores[row, forced] = 0.0
        return scores


def _llm_generate(model, input_ids, attention_mask, positions, features, sampling: Sampling, streamer=None):
    """-> (B, L + new) ids; the prompt's soft tokens are given as inputs_embeds."""
    from transformers import LogitsProcessorList

    inputs_embeds, _ = model.embed(input_ids, positions, features)
    options = (dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
               if sampling.do_sample else dict(do_sample=False))
    if sampling.force_signal:
        options["logits_processor"] = LogitsProcessorList([SignalBlocks(model.token_ids.signal,
                                                                        sampling.max_new_tokens)])
    result = model.causal_lm.generate(
        input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
        max_new_tokens=sampling.max_new_tokens, stop_strings=[model.stop], tokenizer=model.tokenizer,
        pad_token_id=model.token_ids.pad, eos_token_id=model.token_ids.eos, return_dict_in_generate=True,
        streamer=streamer, **options)
    return result.sequences


def _cut_at_stop(model, generated: list[int]) -> list[int]:
    """Ids up to and including the token that completes "###" (and before any EOS / padding)."""
    for k in range(len(generated)):
        if generated[k] == model.token_ids.eos:
            return generated[:k]
        if model.stop in model.tokenizer.decode(generated[max(0, k - 3):k + 1]):
            return generated[:k + 1]
    return generated


def _append_blocks(model, generated: list[int], modalities: Sequence[str]) -> list[int]:
    """The answer's ids with a block of each modality put at its end: before the stop ("###") when there is one;
    signal ids left at the end (a block max_new_tokens cut) are dropped first, so the new block stands alone."""
    body, tail = list(generated), []
    while body and model.stop in model.tokenizer.decode(body):
        tail.insert(0, body.pop())
    signal_ids = {i for ids in model.token_ids.signal.values() for i in ids}
    while body and body[-1] in signal_ids:
        body.pop()
    for modality in modalities:
        body += model.token_ids.signal[modality]
    return body + tail


def _finish(model, sequences, prompts: list[list[int]], positions, features, decoders, decoder_settings,
            seed: int | None, out_dir, counts, requires: Sequence[Sequence[str]] = ()) -> list[Reply]:
    """Generated ids -> Replies: text, signal-block scan (+ required blocks), conditioning from one forward,
    optional decode/write. requires: per row, the modalities its reply must carry (Conversation.require)."""
    longest = max(len(p) for p in prompts)
    replies, rows_with_blocks = [], []
    signal_strings = [t for ids in model.token_ids.signal.values() for t in model.tokenizer.convert_ids_to_tokens(ids)]
    for row, prompt in enumerate(prompts):
        sequence = sequences[row].tolist()
        # With input_ids given, transformers returns prompt + new tokens; without, only the new ones.
        generated = sequence[longest:] if len(sequence) > longest and sequence[longest - len(prompt):longest] == prompt \
            else sequence
        generated = _cut_at_stop(model, generated)
        required = list(dict.fromkeys(requires[row])) if row < len(requires) else []
        have = {m for m, _ in scan_signal_blocks(generated, model.token_ids).blocks}
        appended = [m for m in required if m not in have]
        if appended:
            generated = _append_blocks(model, generated, appended)
        text = model.tokenizer.decode(generated, skip_special_tokens=True).split(model.stop)[0].strip()
        display = text
        for token in signal_strings:
            display = display.replace(token, "")
        scan = scan_signal_blocks(generated, model.token_ids)
        reply = Reply(text=text, token_ids=generated, truncated=[m for m, _ in scan.truncated],
                      malformed=[m for m, _ in scan.malformed], display_text=" ".join(display.split()),
                      appended=appended)
        for modality in reply.truncated + reply.malformed:
            logger.warning("generation: %s signal block %s; no %s output", modality,
                           "cut by max_new_tokens" if modality in reply.truncated else "malformed", modality)
        replies.append(reply)
        if scan.blocks:
            rows_with_blocks.append((row, [(m, len(prompt) + start) for m, start in scan.blocks]))
    if rows_with_blocks:
        _conditioning(model, rows_with_blocks, prompts, replies, positions, longest, features)
    if decoders is not None:
        for reply in replies:
            decode(reply, decoders, seed, decoder_settings, out_dir, counts)
    return replies


def decode(reply: Reply, decoders, seed: int | None = None, decoder_settings: dict | None = None,
           out_dir: str | Path | None = None, counts: dict[str, int] | None = None) -> Reply:
    """Decode every output of `reply` (Output.decoded) and, with out_dir, write <modality>_<n>.<ext> there
    (Output.path; n from `counts`, which is updated). generate / stream do this when given decoders."""
    from nextgpt.model.decoders import write

    counts = {} if counts is None else counts
    for output in reply.outputs:
        settings = (decoder_settings or {}).get(output.modality)
        output.decoded = decoders.decode(output.modality, output.conditioning, seed=seed, settings=settings)
        if out_dir is not None:
            output.path = write(output.decoded, out_dir, counts.get(output.modality, 0))
            counts[output.modality] = counts.get(output.modality, 0) + 1
    return reply


def _conditioning(model, rows_with_blocks, prompts, replies, positions, longest, features) -> None:
    """One forward over prompt + answer of every row with a block (unpadded prompts, right-padded: causal attention
    keeps the padding out of every real position), then output_proj at each block."""
    full = [prompts[row] + replies[row].token_ids for row, _ in rows_with_blocks]
    width = max(len(ids) for ids in full)
    pad = model.token_ids.pad
    device = model.device
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in full], device=device)
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in full], device=device)
    # media positions were made for the left-padded prompts: back to this batch's rows and unpadded columns
    new_row = {row: i for i, (row, _) in enumerate(rows_with_blocks)}
    keep, moved = [], []
    for k, (row, column) in enumerate(positions.tolist()):
        if row in new_row:
            keep.append(k)
            moved.append([new_row[row], column - (longest - len(prompts[row]))])
    media_positions = torch.tensor(moved, dtype=torch.long, device=device).view(-1, 2)
    media_features = features[keep] if features is not None and keep else None
    embeds, token_embeds = model.embed(input_ids, media_positions, media_features)
    out = model.causal_lm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True, use_cache=False)
    hidden_states = out.hidden_states[model.hidden_layer]                 # (B', L', D)
    for i, (row, blocks) in enumerate(rows_with_blocks):
        for modality, start in blocks:
            if modality not in model.output_proj:
                logger.warning("generation: %s signal block but no %s output projector", modality, modality)
                continue
            conditioning = model.project(modality, hidden_states, token_embeds, [(i, start)])   # (1, T, D_out)
            replies[row].outputs.append(Output(modality, conditioning))


def _seed(seed: int | None) -> None:
    if seed is not None:             # CPU and every CUDA device: the same conversations + seed -> the same replies
        torch.manual_seed(seed)


@torch.no_grad()
def generate(model, conversations: Sequence[Conversation], sampling: Sampling, seed: int | None, decoders=None,
             decoder_settings: dict | None = None, out_dir: str | Path | None = None,
             counts: dict[str, int] | None = None) -> list[Reply]:
    """Replies to a batch of conversations, in order. seed: reseed torch (and the decoders) first; None: use the
    current random state (and the decoders' own seed).

    decoders: a nextgpt.model.decoders.Decoders to turn each output's conditioning into media (else only the
        conditioning is returned); decoder_settings: {modality: ImageDecoding | ...} for this request;
    out_dir: write each decoded medium as <modality>_<n>.<ext> there, n from `counts` (updated; default from 0).
    """
    was_training = model.training
    model.eval()
    try:
        input_ids, mask, positions, features, prompts = _prepare(model, conversations)
        _seed(seed)
        sequences = _llm_generate(model, input_ids, mask, positions, features, sampling)
        return _finish(model, sequences, prompts, positions, features, decoders, decoder_settings, seed, out_dir,
                       {} if counts is None else counts, [c.require for c in conversations])
    finally:
        model.train(was_training)


def stream(model, conversation: Conversation, sampling: Sampling, seed: int | None, decoders=None,
           decoder_settings: dict | None = None, out_dir: str | Path | None = None,
           counts: dict[str, int] | None = None) -> Iterator["str | Reply"]:
    """Like generate() for one conversation, but yields the reply's text as it is generated (str pieces, signal
    tokens and the closing "###" included as the tokenizer decodes them), then the finished Reply (decoded media
    and files included) as the last item."""
    from transformers import TextIteratorStreamer

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            input_ids, mask, positions, features, prompts = _prepare(model, [conversation])
        streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def run() -> None:                   # the LLM generates in a thread; this generator relays its text
            try:
                with torch.no_grad():
                    result["sequences"] = _llm_generate(model, input_ids, mask, positions, features, sampling,
                                                        streamer)
            except BaseException as e:       # re-raised below, in the caller's thread
                result["error"] = e
                streamer.end()

        _seed(seed)
        thread = threading.Thread(target=run, name="nextgpt-generate", daemon=True)
        thread.start()
        for piece in streamer:
            if piece:
                yield piece
        thread.join()
        if "error" in result:
            raise result["error"]
        with torch.no_grad():
            (reply,) = _finish(model, result["sequences"], prompts, positions, features, decoders,
                               decoder_settings, seed, out_dir, {} if counts is None else counts,
                               [conversation.require])
        yield reply
    finally:
        model.train(was_training)
