"""The loss terms of NextGPT.forward: the shifted LM loss with token accuracy, the alignment of the output
projectors with the caption embeddings, and the check that every signal block is taught by the labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nextgpt.modalities import MODALITIES
from nextgpt.tokens import IGNORE

# What NextGPT.forward may return: the weighted sum, its terms (one alignment and one denoising term per modality,
# model/denoising.py) and accuracy.
TERMS = ["loss", "lm", *MODALITIES, *(m.generation_loss_key for m in MODALITIES.values()), "token_acc"]

L2_EPS = 1e-6     # under the sqrt: the distance's gradient stays finite when a token is matched exactly


def alignment_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """l2: mean over tokens of the Euclidean distance (the original's l2_loss(...).mean()); mse: mean squared error.

    Both in fp32; (n, T, D) each.
    """
    difference = prediction.float() - target.float()
    if kind == "l2":
        return torch.sqrt(difference.pow(2).sum(-1) + L2_EPS).mean()
    return difference.pow(2).mean()  # mse (the config's Literal allows only these two)


def lm_loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted cross entropy (mean over supervised targets, fp32) and next-token accuracy on the same targets.

    Accuracy = correct / supervised, i.e. the original's gen_acc without its +1 in the denominator (reference
    §2.6; its skipped position-0 prediction always has label -100 here, so that part is the same).
    """
    shifted_logits = logits[:, :-1].float()                       # (B, L-1, V)
    targets = labels[:, 1:]                                       # (B, L-1)
    loss = F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE)
    with torch.no_grad():
        valid = targets != IGNORE
        correct = (shifted_logits.argmax(-1) == targets) & valid
        accuracy = correct.sum().float() / valid.sum().clamp(min=1).float()
    return loss, accuracy


def check_signal_labels(labels: torch.Tensor, blocks: dict[str, list[tuple[int, int]]], signal_ids: dict,
                        samples) -> None:
    """Every signal block is supervised with its own ids (a block the labels do not teach is a data bug).

    labels (B, L); blocks {modality: [(row, start)]}; signal_ids {modality: [id] * num_signal_tokens}."""
    for modality, starts in blocks.items():
        n = MODALITIES[modality].num_signal_tokens
        rows = torch.tensor([r for r, _ in starts for _ in range(n)], device=labels.device)
        columns = torch.tensor([s + i for _, s in starts for i in range(n)], device=labels.device)
        expected = torch.tensor(signal_ids[modality], device=labels.device).repeat(len(starts))
        bad = (labels[rows, columns] != expected).view(len(starts), n).any(1)
        if bool(bad.any()):
            row, start = starts[int(bad.nonzero()[0, 0])]
            where = samples[row].where if samples else f"batch row {row}"
            raise ValueError(f"{where}: the labels do not hold the {modality} signal block at position {start}")
