"""Suffix backward: the LLM pass of a training step with gradients only where a trainable parameter reaches.

By causality the hidden state at position t depends only on inputs 0..t. When the LLM body is frozen (stages 1-2),
an input depends on a trainable parameter only at a new token (<Img>, </Img>, signal tokens: PEFT's trainable rows)
or a soft token (input_proj). Before row r's first such position, split[r], nothing needs a backward through the
LLM, so that prefix runs once under no_grad and keeps its key/value cache; the suffix (the signal block and what
follows it in stage 2, ~K+2 tokens) runs with gradients, attending to the cache. The backward of frozen weights
needs activation gradients only, so a step costs ≈ 2N*T forward + 2N*S backward instead of 4N*T (N parameters,
T tokens, S = suffix length: 4 image / 24 video / 8 audio signal tokens + "###").

The LM loss covers the same shifted targets as the full pass: a prefix position's logits are its no-grad final
hidden state times lm_head computed WITH grad (so lm_head's new rows, e.g. [IMG0]'s row predicted from the last
prefix position, still get their gradient).

    prefix pass  inputs_embeds[:, :P] (B, P, D), 2D padding mask -> last hidden (B, P, D), cache (B, h, P, d)/layer
    suffix pass  inputs_embeds at split[r] + j (B, S, D), position ids split[r] + j,
                 4D mask (B, 1, S, P + S): cache column k < split[r]; suffix column j' <= j (causal)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nextgpt.model import llm as llm_utils
from nextgpt.tokens import IGNORE

ATTENTION_WITH_4D_MASK = ("sdpa", "eager")      # flash-attention kernels take no custom 4D mask
# A bf16 matmul over M rows does 2·M FLOPs per weight (2 bytes): below the GPU's ridge point (peak FLOP/s over
# memory bandwidth; H100/H200 989 TFLOP/s / 3.35 TB/s ≈ 295, A100 ≈ 153) it is bound by reading the weights, and
# a pass costs the same as one with ridge rows. Conservative: the H100's.
GPU_RIDGE_ROWS = 300


def worth_splitting(batch_size: int, length: int, split: list[int], lengths: list[int],
                    ridge_rows: int = GPU_RIDGE_ROWS) -> bool:
    """Roofline of the LLM passes: full = forward + backward over B·L rows; split = a no-grad forward over B·P
    plus the suffix's forward and backward over B·S. Each pass costs max(rows, ridge_rows). At micro-batch 1 on a
    GPU every pass is weight-bound, so three passes lose to two; with enough rows the split saves ~half. The split
    must save 10%: the extra pass and the cache cost time too (make bench: stage 1's split saved 4% of the FLOPs
    and ran 14% slower)."""
    prefix, suffix = max(split), max(n - s for n, s in zip(lengths, split))
    full = 2 * max(batch_size * length, ridge_rows)
    parts = max(batch_size * prefix, ridge_rows) + 2 * max(batch_size * suffix, ridge_rows)
    return parts < 0.9 * full


def token_sums(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, V) logits, (B, T) targets (IGNORE where unsupervised) -> (CE sum in fp32, #correct, #supervised)."""
    logits = logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    with torch.no_grad():
        valid = targets != IGNORE
        correct = ((logits.argmax(-1) == targets) & valid).sum()
    return loss, correct, valid.sum()


def trainable_inputs(model) -> tuple[bool, set[int], bool] | None:
    """What makes an LLM input depend on a trainable parameter -> (every position?, those token ids, soft tokens?);
    None when a parameter inside the LLM body trains (LoRA, ...): then every hidden state needs the backward."""
    llm = model.llm
    embed_rows = llm_utils.token_rows_parameter(llm, "embed_tokens")
    embed_base = llm_utils.base_token_weight(llm, "embed_tokens")
    head = {id(llm_utils.base_token_weight(llm, "lm_head")), id(llm_utils.token_rows_parameter(llm, "lm_head"))}
    for parameter in model.causal_lm.parameters():
        if parameter.requires_grad and id(parameter) not in head | {id(embed_rows), id(embed_base)}:
            return None
    token_ids = set(model.token_ids.new_token_ids) if embed_rows is not None and embed_rows.requires_grad else set()
    return embed_base.requires_grad, token_ids, model.input_proj.weight.requires_grad


def split_points(input_ids: torch.Tensor, lengths: list[int], media_positions: torch.Tensor | None,
                 blocks: dict[str, list[tuple[int, int]]], inputs: tuple[bool, set[int], bool]) -> list[int]:
    """Per row: the first position whose input depends on a trainable parameter, or that starts a signal block
    (its hidden states feed the output projector), else the row's length."""
    every, token_ids, soft = inputs
    if every:
        return [0] * len(lengths)
    split = list(lengths)
    for starts in blocks.values():
        for row, start in starts:
            split[row] = min(split[row], start)
    if soft and media_positions is not None:
        for row, position in media_positions.tolist():
            split[row] = min(split[row], position)
    if token_ids:
        hits = torch.isin(input_ids, torch.tensor(sorted(token_ids), device=input_ids.device))
        for row, position in hits.nonzero().tolist():          # row-major: the first hit of a row comes first
            split[row] = min(split[row], position)
    return split


def split_forward(causal_lm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                  split: list[int], lengths: list[int], output_hidden_states: bool):
    """-> (lm loss, token accuracy, suffix hidden_states tuple of (B, S, D) or None); hidden at (row, t) is at
    (row, t - split[row]) of the suffix tensors."""
    batch_size, length = attention_mask.shape
    device, dtype = inputs_embeds.device, inputs_embeds.dtype
    prefix = max(split)                                                    # P
    suffix = max(n - s for n, s in zip(lengths, split))                   # S
    # labels padded so that every shifted target index below is in range: (B, L + S + 1)
    labels_ext = torch.cat([labels, labels.new_full((batch_size, suffix + 1), IGNORE)], dim=1)
    split_t = torch.tensor(split, device=device)
    lengths_t = torch.tensor(lengths, device=device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = torch.zeros((), device=device, dtype=torch.long)

    cache = None
    if prefix > 0:
        with torch.no_grad():
            out = causal_lm.get_decoder()(inputs_embeds=inputs_embeds[:, :prefix].detach(),
                                          attention_mask=attention_mask[:, :prefix], use_cache=True)
        cache = out.cache
        columns = torch.arange(prefix, device=device)
        targets = labels_ext[:, 1:prefix + 1].masked_fill(columns[None, :] >= split_t[:, None], IGNORE)  # (B, P)
        # lm_head (with grad: its new rows train) only where a target is supervised: (n, D) -> (n, V)
        supervised = targets != IGNORE
        logits = causal_lm.get_output_embeddings()(out.last_hidden_state[supervised])
        pieces = token_sums(logits[None], targets[supervised][None])
        loss_sum, correct, count = loss_sum + pieces[0], correct + pieces[1], count + pieces[2]
        del out, logits

    hidden_states = None
    if suffix > 0:
        steps = torch.arange(suffix, device=device)
        index = split_t[:, None] + steps[None, :]                              # (B, S) absolute positions
        valid = index < lengths_t[:, None]
        gather = index.clamp(max=length - 1)
        suffix_embeds = inputs_embeds.gather(1, gather[..., None].expand(-1, -1, inputs_embeds.shape[-1]))
        allowed = torch.zeros(batch_size, suffix, prefix + suffix, dtype=torch.bool, device=device)
        if prefix > 0:
            allowed[:, :, :prefix] = (torch.arange(prefix, device=device)[None, :] < split_t[:, None])[:, None, :]
        causal = steps[None, :] <= steps[:, None]                              # (S, S): query j sees j' <= j
        allowed[:, :, prefix:] = causal[None] & valid[:, None, :]
        allowed[:, :, prefix:] |= torch.eye(suffix, dtype=torch.bool, device=device)[None]   # padding sees itself
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        out = causal_lm(inputs_embeds=suffix_embeds, attention_mask=mask[:, None], position_ids=index,
                        cache=cache, use_cache=cache is not None, output_hidden_states=output_hidden_states)
        targets = labels_ext.gather(1, index + 1).masked_fill(~valid, IGNORE)  # (B, S)
        pieces = token_sums(out.logits, targets)
        loss_sum, correct, count = loss_sum + pieces[0], correct + pieces[1], count + pieces[2]
        hidden_states = out.hidden_states if output_hidden_states else None
    loss = loss_sum / count.clamp(min=1)
    accuracy = correct.float() / count.clamp(min=1).float()
    return loss, accuracy, hidden_states
