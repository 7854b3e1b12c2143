"""The types that pass between readers, the conversation builder, collate and the model.

    reader (catalog entry) -> Sample -> conversation.encode(sample, tokenizer, token_ids, max_length) -> Encoded
    list[Encoded] -> collate.collate(...) -> batch dict (documented in collate.py) -> NextGPT.forward(batch)

Every stage is a conversation: stage 1 is [human: prompt + input medium, gpt: caption]; stage 2 is
[human: caption, gpt: caption + signal block]; stage 3 is the instruction file's conversation.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Turn:
    role: str                          # "human" | "gpt"
    text: str
    # gpt turns only: the modality whose signal block ([IMG0..3] / [VID0..23] / [AUD0..7]) follows the text
    output_modality: str | None = None


@dataclass
class Media:
    modality: str                      # image | video | audio
    path: str                          # absolute path of the media file (may be absent when features are cached)
    name: str                          # media file name: the key of the feature cache <feature_dir>/<name>.npy


@dataclass
class Target:
    modality: str                      # which output projector
    embed_path: str                    # <embed_dir>/<media file name>.npy: caption embedding, (T, D) or (D,)
    caption: str = ""
    # the target medium itself (<media folder>/<media file name>): read only by the denoising loss
    # (train.loss_weights gen_<modality>, model/denoising.py); may be absent otherwise. Derived from the record's
    # name and the catalog's folder, so not part of a target's identity (==)
    media_path: str = field(default="", compare=False)


@dataclass
class Sample:
    dataset: str                       # catalog name, e.g. cc3m_enc
    source: str                        # file the record came from (for error messages)
    index: int                         # record index in that file
    turns: list[Turn]
    # At most one input medium, placed as <Img>{soft token}</Img> at the start of the first human turn.
    media: list[Media] = field(default_factory=list)
    # One caption embedding per signal block, in the order the blocks appear in the gpt turns.
    targets: list[Target] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.source} record {self.index}"


@dataclass
class Encoded:
    """One tokenised sample. Positions index `input_ids`; the soft-token position holds a placeholder id."""
    input_ids: list[int]               # starts with BOS
    labels: list[int]                  # same length; -100 where not supervised
    media_positions: list[int]         # index of each medium's soft token in input_ids (same order as sample.media)
    sample: Sample
    # (modality, start) of each signal block in input_ids, recorded by conversation.encode as it builds them;
    # None for an Encoded made by hand (collate then scans the ids once with tokens.signal_blocks)
    signal_blocks: list[tuple[str, int]] | None = None
