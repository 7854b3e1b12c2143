"""A training run's data: the validation gate, the records it rejects left out, and the train / held-out loaders.

    train_loader, train_sampler, eval_loader, eval_sampler = build_run_data(cfg, tokenizer, token_ids, rank,
                                                                            world_size, log)

Training reads exactly the records validation passed: `check_data` runs the cheap check (files exist, .npy
headers; code/validate_data.py does the full one) and `drop_bad_records` rebuilds a dataset without the records it
found bad (only under data.skip_bad_records; otherwise any problem is an error).
"""

from __future__ import annotations

import torch

from nextgpt.data.dataset import NextGPTDataset, build_datasets, build_loader


def check_data(cfg, log) -> dict:
    """Validate every dataset this run reads -> {dataset: {(source, index): Problem}} of the records to leave out.

    Anything wrong raises ValueError naming the first problem (the table goes to the log first), except with
    data.skip_bad_records when every problem is confined to one record: then those records are counted (one line
    per dataset) and returned, to be left out of training by drop_bad_records."""
    from nextgpt.data import validate

    names = list(dict.fromkeys([*cfg.data.datasets, *cfg.data.eval_datasets]))
    # Skipping bad records is exact only if undecodable media are found too: with data.skip_bad_records the media
    # that live encoding will read (no cached feature) are decoded once here.
    report = validate.validate(cfg, names, decode=False, decode_media=cfg.data.skip_bad_records)
    if report.ok:
        return {}
    if not (cfg.data.skip_bad_records and report.only_bad_records):
        log(report.format(max_problems=20))
        report.raise_if_bad(f"code/validate_data.py --config {cfg.source or '<config>'} with this run's --set options")
    bad = report.bad_records()
    for row in report.datasets:
        if records := bad.get(row.name):
            log(f"skipping {len(records)} bad record(s) in {row.name} (data.skip_bad_records; {row.records} records): "
                f"{next(iter(records.values()))}")
    return bad


def drop_bad_records(datasets: dict[str, NextGPTDataset], bad: dict) -> dict[str, NextGPTDataset]:
    """`datasets` without the samples check_data found bad. Records that did not parse are already absent (the
    readers skip them under data.skip_bad_records); this leaves out the ones whose media or caption embedding is
    missing or broken."""
    out = {}
    for name, data in datasets.items():
        records = bad.get(name, {})
        dropped = [records[(s.source, s.index)] for s in data.samples if (s.source, s.index) in records]
        if not dropped:
            out[name] = data
            continue
        keep = [s for s in data.samples if (s.source, s.index) not in records]
        if not keep:
            raise ValueError(f"dataset {name}: no usable records ({len(dropped)} parsed, all bad; first: "
                             f"{dropped[0]})")
        out[name] = NextGPTDataset(name, keep, data.tokenizer, data.token_ids, data.max_length, log=data.log,
                                   skip_bad=data.skip_bad)
    return out


def count_steps(cfg, train_sampler) -> tuple[int, int]:
    """(optimizer steps of the run, per epoch): train.max_steps, else train.epochs over the sampler's plan."""
    accum = cfg.train.gradient_accumulation_steps
    steps_per_epoch = len(train_sampler) // accum
    max_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    if max_steps <= 0:
        raise ValueError(f"{cfg.source}: {len(train_sampler)} micro-batches per rank is less than one step of "
                         f"{accum} accumulation step(s); add data or lower train.micro_batch_size")
    return max_steps, steps_per_epoch


def build_run_data(cfg, tokenizer, token_ids, rank: int, world_size: int, log, pin_memory: bool = False):
    """(train loader, its MixtureSampler, eval loader or None, eval sampler or None) for a training run.

    The held-out split is data.eval_datasets, else data.eval_fraction of every training dataset. pin_memory: the
    run's device is a GPU (nextgpt.runtime.setup decided it)."""
    bad = check_data(cfg, log) if cfg.data.validate else {}
    datasets = drop_bad_records(build_datasets(cfg, tokenizer, token_ids, cfg.data.datasets), bad)
    eval_sets = None
    if cfg.data.eval_datasets:
        eval_sets = drop_bad_records(build_datasets(cfg, tokenizer, token_ids, cfg.data.eval_datasets), bad)
    elif cfg.data.eval_fraction > 0:
        pairs = {name: d.split(cfg.data.eval_fraction, cfg.train.seed) for name, d in datasets.items()}
        datasets = {name: train for name, (train, _) in pairs.items()}
        eval_sets = {held.name: held for _, held in pairs.values()}

    def loader(sets):
        data_loader, sampler = build_loader(cfg, tokenizer, token_ids, rank, world_size, datasets=sets,
                                            pin_memory=pin_memory)
        # A private generator: iter(loader) would otherwise draw a worker seed from the global torch RNG, and a
        # resumed run (which calls iter() at a different point of that stream) would see other dropout masks.
        data_loader.generator = torch.Generator().manual_seed(cfg.train.seed)
        return data_loader, sampler

    train_loader, train_sampler = loader(datasets)
    eval_loader, eval_sampler = loader(eval_sets) if eval_sets else (None, None)
    held = f"; eval {', '.join(f'{n} {len(d)}' for n, d in eval_sets.items())}" if eval_sets else "; no eval split"
    log(f"data: {', '.join(f'{n} {len(d)}' for n, d in datasets.items())} samples; {len(train_sampler)} "
        f"micro-batches per epoch per rank{held}")
    return train_loader, train_sampler, eval_loader, eval_sampler
