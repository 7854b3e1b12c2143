"""Evaluate a loaded NExT-GPT on held-out records: what code/evaluate.py runs per checkpoint, and what train.py's
held-out evaluation adds (eval/training.py: GenerationChecks).

    sets  = held_out_datasets(cfg, tokenizer, token_ids)          # data.eval_datasets, else data.eval_fraction
    items = build_items(cfg, sets, limit)                         # records -> requests + what to compare with
    metrics, records = evaluate_model(model, items, cfg, options)

A held-out record becomes one request (its turns up to the asked human turn, its input media) of one kind:
    caption   the record has an input medium and a text answer (stage 1, LLaVA): BLEU-4 / CIDEr-D of the reply
              against the answer; the reply must carry no signal block
    generate  an answer with a signal block (stage 2 captions, T->T+X instructions): the reply must carry exactly
              one complete block of that modality (emission rate); its projector output is compared with the
              record's caption embedding (l2, cos); decoded, the medium is scored against the caption by ImageBind
    text      no medium in, none out (Alpaca): the reply must carry no signal block
Replies are greedy by default, so a request's reply does not depend on its batch; --sample uses cfg.inference's
sampling under the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from nextgpt.eval import metrics as M
from nextgpt.modalities import MODALITIES
from nextgpt.model.losses import TERMS
from nextgpt.runtime import mean_over_ranks, to_device
from nextgpt.tokens import IGNORE

CAPTION, GENERATE, TEXT = "caption", "generate", "text"


@dataclass
class Item:
    key: str                              # "<dataset>/<record index>"
    dataset: str
    kind: str                             # caption | generate | text
    conversation: object                  # nextgpt.model.generate.Conversation
    requested: str                        # modality asked for, or "text"
    references: list[str] = field(default_factory=list)    # reference answers (caption / text items)
    embed_path: str = ""                  # caption embedding of the asked medium (generate items)
    score_text: str = ""                  # what the generated medium should show: the caption, else the request


@dataclass
class Options:
    seed: int = 13
    batch_size: int = 8
    sample: bool = False                  # sample as cfg.inference says (else greedy)
    decode: int = 4                       # generated media decoded (and ImageBind-scored) per modality; 0: none
    progress: bool = True


# ----------------------------------------------------------------------------------------------------------------
# The held-out split

def held_out_datasets(cfg, tokenizer, token_ids, log=print) -> dict:
    """{name: NextGPTDataset} of the held-out split, as train.py holds it out: data.eval_datasets, else the
    data.eval_fraction share of every data.datasets entry (the same seeded split). ValueError when there is none."""
    from nextgpt.data.dataset import build_datasets

    where = cfg.source or "the config"
    if cfg.data.eval_datasets:
        sets = build_datasets(cfg, tokenizer, token_ids, cfg.data.eval_datasets, log=log)
    elif cfg.data.eval_fraction > 0:
        sets = {}
        for dataset in build_datasets(cfg, tokenizer, token_ids, cfg.data.datasets, log=log).values():
            held = dataset.split(cfg.data.eval_fraction, cfg.train.seed)[1]
            sets[held.name] = held
    else:
        raise ValueError(f"empty held-out split: {where} sets neither data.eval_datasets nor data.eval_fraction "
                         "(e.g. --set data.eval_fraction=0.1)")
    if not any(len(d) for d in sets.values()):
        raise ValueError(f"empty held-out split: no records in {', '.join(sets)} ({where})")
    return sets


def build_items(cfg, datasets: dict, limit: int = 0) -> list[Item]:
    """Held-out records -> requests, in dataset order, at most `limit` per dataset (0: all)."""
    from nextgpt.data.types import Turn
    from nextgpt.model.generate import Conversation

    items: list[Item] = []
    for name, dataset in datasets.items():
        samples = dataset.samples[:limit] if limit else dataset.samples
        for sample in samples:
            turns = list(sample.turns)
            if turns and turns[0].role == "human" and not turns[0].text.strip():
                turns[0] = Turn("human", cfg.train.prompt)        # a pair record: "caption this medium"
            asked = next((i for i, t in enumerate(turns) if t.role == "gpt" and t.output_modality), None)
            key = f"{name}/{sample.index}"
            if asked is not None:
                modality = turns[asked].output_modality
                target = next((t for t in sample.targets if t.modality == modality), None)
                request = turns[asked - 1].text
                caption = target.caption if target is not None and target.caption else request
                require = (modality,) if modality in cfg.inference.require else ()    # inference.require
                items.append(Item(key, name, GENERATE, Conversation(turns[:asked], list(sample.media), require),
                                  modality, embed_path=target.embed_path if target is not None else "",
                                  score_text=caption))
                continue
            last = max((i for i, t in enumerate(turns) if t.role == "gpt"), default=None)
            if last is None:
                continue
            kind = CAPTION if sample.media else TEXT
            items.append(Item(key, name, kind, Conversation(turns[:last], list(sample.media)), M.TEXT,
                              references=[turns[last].text]))
    if not items:
        raise ValueError(f"empty held-out split: no request could be made from {', '.join(datasets)}")
    return items


# ----------------------------------------------------------------------------------------------------------------
# One model

class FeatureMemo:
    """ImageBind features of input media by path, kept across models: they do not depend on the checkpoint, so
    evaluating k checkpoints encodes every held-out input once, not k times."""

    def __init__(self) -> None:
        self.features: dict[str, torch.Tensor] = {}           # path -> (F,) float32 on the CPU

    def attach(self, model) -> None:
        """Route model.encode_media (used by nextgpt.model.generate) through the memo."""
        encode = model.encode_media

        def encode_media(paths: Sequence[str], modalities: Sequence[str]) -> torch.Tensor:     # -> (N, F)
            missing = [(p, m) for p, m in dict.fromkeys(zip(paths, modalities)) if p not in self.features]
            if missing:
                encoded = encode([p for p, _ in missing], [m for _, m in missing])
                for (path, _), row in zip(missing, encoded):
                    self.features[path] = row.float().cpu()
            return torch.stack([self.features[p] for p in paths]).to(model.device)

        model.encode_media = encode_media

    @staticmethod
    def detach(model) -> None:
        """Back to the model's own encode_media (training reads its inputs without the memo)."""
        model.__dict__.pop("encode_media", None)


def _bar(iterable, total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _sampling(cfg, options: Options):
    from nextgpt.model.generate import Sampling

    return Sampling.from_config(cfg.inference, **({} if options.sample else {"do_sample": False}))


def generate_replies(model, items: Sequence[Item], cfg, options: Options) -> list:
    """Replies to every item, in batches of options.batch_size (one seed per batch, derived from options.seed)."""
    from nextgpt.model.generate import generate

    sampling = _sampling(cfg, options)
    batches = [list(items[i:i + options.batch_size]) for i in range(0, len(items), options.batch_size)]
    replies = []
    for index, batch in enumerate(_bar(batches, len(batches), "generate", options.progress)):
        replies += generate(model, [item.conversation for item in batch], sampling, seed=options.seed + index)
    return replies


# ----------------------------------------------------------------------------------------------------------------
# The held-out loss: one function, for train.py's in-training evaluation and for code/evaluate.py (make eval)

TOKEN_WEIGHTED = ("loss", "lm", "token_acc")


@torch.no_grad()
def heldout_loss(model, batches, device: torch.device, l2_mean: bool = False) -> dict[str, float]:
    """{term: mean} of NextGPT.forward's loss terms with the answers given, over every batch and every rank (each
    rank passes its share; every rank calls this). `model`: a NextGPT or the DeepSpeed engine around one.

    Token-weighted: loss, lm and token_acc count each batch by its supervised tokens, so they are the means over
    the split's tokens, whatever the batch size, the padding or the number of ranks (a mean of micro-batch means
    would count a token of a short answer more than one of a long answer, and change with the batching). The
    alignment terms (one value per batch that holds the modality) count each batch once. l2_mean adds "l2", the
    mean of the alignment terms present."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = to_device(batch, device)
            out = model(batch)
            tokens = float((batch["labels"][:, 1:] != IGNORE).sum())    # the shifted LM loss's targets
            for name, value in out.items():
                weight = tokens if name in TOKEN_WEIGHTED else 1.0
                sums[name] = sums.get(name, 0.0) + float(value) * weight
                weights[name] = weights.get(name, 0.0) + weight
    finally:
        model.train(was_training)
    result = mean_over_ranks(sums, weights, TERMS, device)
    if l2_mean and (l2 := [result[m] for m in MODALITIES if m in result]):
        result["l2"] = sum(l2) / len(l2)
    return result


def teacher_forced(model, cfg, datasets: dict, options: Options) -> dict[str, float]:
    """The held-out loss (heldout_loss, as train.py's evaluation) of the held-out datasets, in batches of
    options.batch_size, as heldout_loss / heldout_lm / token_acc / heldout_l2.<modality>."""
    from torch.utils.data import ConcatDataset, DataLoader

    from nextgpt.data.collate import Collator
    from nextgpt.data.dataset import caption_shapes

    collator = Collator(model.token_ids, feature_dir=cfg.path(cfg.data.feature_dir) if cfg.data.feature_dir else None,
                        caption_shapes=caption_shapes(cfg))
    parts = [d for d in datasets.values() if len(d)]
    loader = DataLoader(ConcatDataset(parts), batch_size=options.batch_size, collate_fn=collator)
    result = heldout_loss(model, _bar(loader, len(loader), "held-out loss", options.progress), model.device)
    return {("heldout_" + k if k in ("loss", "lm") else "token_acc" if k == "token_acc" else f"heldout_l2.{k}"): v
            for k, v in result.items()}


def _load_embedding(path: str) -> torch.Tensor:
    import numpy as np

    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"{path or '<none>'}: caption embedding missing (run `make embeddings`)")
    return torch.from_numpy(np.load(path).astype("float32"))


def evaluate_model(model, items: Sequence[Item], cfg, options: Options, media_dir: Path | None = None,
                   decoders=None, scorer=None, clip=None, datasets: dict | None = None,
                   replies: list | None = None) -> tuple[dict[str, float], list[dict]]:
    """-> (metrics {name: value}, one record per item). See the module docstring for what is measured.

    decoders / scorer / clip: nextgpt.model.decoders.Decoders, eval.embedders.ImageBindScorer / ClipScorer, or
    None to skip decoding / the ImageBind score / the CLIP score. datasets: the held-out NextGPTDatasets, for the
    teacher-forced loss (skipped when None). media_dir: where decoded media are written.
    """
    replies = generate_replies(model, items, cfg, options) if replies is None else replies
    records: list[dict] = []
    alignments: dict[str, list[dict]] = {}
    to_decode: list[tuple[int, object]] = []
    decoded_count: dict[str, int] = {}
    for index, (item, reply) in enumerate(zip(items, replies)):
        outcome = M.emission(reply.token_ids, item.requested, model.token_ids)
        record = {"key": item.key, "kind": item.kind, "requested": item.requested, "reply": reply.display_text,
                  "emission": outcome}
        if item.kind == GENERATE and outcome == M.OK and reply.outputs:
            conditioning = reply.outputs[0].conditioning                      # (1, T, D_out)
            if item.embed_path:
                scores = M.alignment(conditioning.float().cpu(), _load_embedding(item.embed_path).unsqueeze(0))
                alignments.setdefault(item.requested, []).append(scores)
                record.update(scores)
            if decoders is not None and decoded_count.get(item.requested, 0) < options.decode:
                decoded_count[item.requested] = decoded_count.get(item.requested, 0) + 1
                to_decode.append((index, conditioning))
        if item.references:
            record["references"] = item.references
        records.append(record)

    out: dict[str, float] = {}
    rates = M.emission_rates((item.requested, record["emission"]) for item, record in zip(items, records))
    for requested, value in rates.items():
        out[f"emission.{requested}"] = value["rate"]
    captions = {item.key: record["reply"] for item, record in zip(items, records) if item.kind == CAPTION}
    if captions:
        references = {item.key: item.references for item in items if item.kind == CAPTION}
        out.update(M.caption_scores(captions, references))
    for modality, values in alignments.items():
        out[f"l2.{modality}"] = M.mean([v["l2"] for v in values])
        out[f"cos.{modality}"] = M.mean([v["cos"] for v in values])

    if to_decode:
        media_dir = Path(media_dir) if media_dir is not None else None
        counts: dict[str, int] = {}
        for index, conditioning in _bar(to_decode, len(to_decode), "decode", options.progress):
            item = items[index]
            decoded = decoders.decode(item.requested, conditioning, seed=options.seed)
            records[index]["decoded"] = decoded
            if media_dir is not None:
                path = decoders.write(decoded, media_dir, counts.get(item.requested, 0))
                counts[item.requested] = counts.get(item.requested, 0) + 1
                records[index]["media"] = str(path)
        written = [i for i, _ in to_decode if "media" in records[i]]
        if scorer is not None and written:
            scores = scorer.score([records[i]["media"] for i in written], [items[i].requested for i in written],
                                  [items[i].score_text for i in written])
            by_modality: dict[str, list[float]] = {}
            for i, score in zip(written, scores.tolist()):
                records[i]["imagebind"] = score
                by_modality.setdefault(items[i].requested, []).append(score)
            out.update({f"imagebind.{m}": M.mean(v) for m, v in by_modality.items()})
        images = [i for i in written if items[i].requested == "image"]
        if clip is not None and images:
            scores = clip.score([records[i]["media"] for i in images], [items[i].score_text for i in images])
            for i, score in zip(images, scores.tolist()):
                records[i]["clip"] = score
            out["clip.image"] = M.mean(scores.tolist())
    if datasets is not None:
        out.update(teacher_forced(model, cfg, datasets, options))
    return {k: v for k, v in out.items() if v is not None and math.isfinite(v)}, records
