"""Train one NExT-GPT stage (1, 2, 3 or the 8-bit fine-tune): one program, the stage is configuration.

    deepspeed code/train.py --config code/config/stage_1.yaml --ds_config code/dsconfig/stage_1.json
    python code/train.py --config code/config/tiny/stage_1.yaml                  # CPU, one process
    deepspeed --num_gpus 2 code/train.py --config ... --set train.micro_batch_size=2

config -> runtime (device, dtype, rank) -> model -> init_from -> trainable set -> data -> deepspeed.initialize ->
the loop below. Checkpoints go to <train.output_dir>/checkpoint-<step>/ (nextgpt.resume); `--resume auto`
(the default) continues from <train.output_dir>/latest bit-exactly on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `deepspeed code/train.py` from anywhere

import torch  # noqa: E402

from nextgpt import config as config_lib  # noqa: E402
from nextgpt import resume, runtime  # noqa: E402
from nextgpt.modalities import MODALITIES  # noqa: E402


# What NextGPT.forward may return: the weighted sum, its terms (one alignment term per modality) and accuracy.
TERMS = ["loss", "lm", *MODALITIES, "token_acc"]


class TrainingAborted(RuntimeError):
    """The run cannot go on (too many non-finite losses); the message says why."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    config_lib.add_config_args(parser)
    parser.add_argument("--ds_config", "--ds-config", default=None,
                        help="DeepSpeed JSON (default: code/dsconfig/stage_<N>.json on GPUs, cpu.json on CPU)")
    parser.add_argument("--resume", default="auto",
                        help="auto (continue from <output_dir>/latest if present) | none | a checkpoint folder")
    parser.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=None,
                        help="stop after this many optimizer steps (overrides train.max_steps)")
    parser.add_argument("--export-legacy", action="store_true",
                        help="also write pytorch_model.pt in the original key layout beside the final delta")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def default_ds_config(cfg: config_lib.Config) -> Path:
    has_gpu = torch.cuda.is_available()
    name = ("fine_tuning.json" if cfg.model.quantization != "none" else f"stage_{cfg.train.stage}.json") \
        if has_gpu else "cpu.json"
    return config_lib.REPO_ROOT / "code" / "dsconfig" / name


def to_device(value, device: torch.device):
    """Tensors (inside dicts/lists) to `device`; everything else (names, Sample records) as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [v.to(device, non_blocking=True) for v in value]
    return value


class RunLog:
    """Rank-0 logging: tqdm-safe prints, <output_dir>/train.log, metrics.jsonl and TensorBoard scalars."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled, self.output_dir, self.tensorboard = enabled, output_dir, tensorboard
        self.text = self.metrics = self.writer = None
        self.purge_step: int | None = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.text = open(output_dir / "train.log", "a", buffering=1)
        self.metrics = open(output_dir / "metrics.jsonl", "a", buffering=1)

    def resume_at(self, step: int) -> None:
        """Forget the scalars an interrupted run logged after the checkpoint it resumes from (they are redone)."""
        if not self.enabled:
            return
        from nextgpt.io import atomic_write_text

        self.metrics.close()
        path = self.output_dir / "metrics.jsonl"
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.metrics = open(path, "a", buffering=1)
        self.purge_step = step + 1  # TensorBoard drops events at or after this step

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm
        tqdm.write(message)
        self.text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def scalars(self, prefix: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"split": prefix, "step": step, **values}) + "\n")
        if self.tensorboard and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self.purge_step)
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        for f in (self.text, self.metrics, self.writer):
            if f is not None:
                f.close()


def check_data(cfg, log) -> dict:
    """The cheap validation of every dataset this run reads (files exist, .npy headers; code/validate_data.py
    does the full check) -> {dataset: {(source, index): Problem}} of the records to leave out.

    Anything wrong raises ValueError naming the first problem (the table goes to the log first), except with
    data.skip_bad_records when every problem is confined to one record: then those records are counted (one line
    per dataset) and returned, to be left out of training by drop_bad_records."""
    from nextgpt.data import validate

    names = list(dict.fromkeys([*cfg.data.datasets, *cfg.data.eval_datasets]))
    report = validate.validate(cfg, names, decode=False)
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


def drop_bad_records(datasets: dict, bad: dict) -> dict:
    """`datasets` without the samples check_data found bad. Records that did not parse are already absent (the
    readers skip them under data.skip_bad_records); this leaves out the ones whose media or caption embedding is
    missing or broken, so training reads exactly the records validation passed."""
    from nextgpt.data.dataset import NextGPTDataset

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


def build_data(cfg, model, rt, log):
    """(train loader, its MixtureSampler, eval loader or None, eval sampler or None).

    The held-out split is data.eval_datasets, else data.eval_fraction of every training dataset."""
    from nextgpt.data import dataset

    bad = check_data(cfg, log) if cfg.data.validate else {}
    datasets = dataset.build_datasets(cfg, model.tokenizer, model.token_ids, cfg.data.datasets)
    datasets = drop_bad_records(datasets, bad)
    eval_sets = None
    if cfg.data.eval_datasets:
        eval_sets = dataset.build_datasets(cfg, model.tokenizer, model.token_ids, cfg.data.eval_datasets)
        eval_sets = drop_bad_records(eval_sets, bad)
    elif cfg.data.eval_fraction > 0:
        pairs = {name: d.split(cfg.data.eval_fraction, cfg.train.seed) for name, d in datasets.items()}
        datasets = {name: train for name, (train, _) in pairs.items()}
        eval_sets = {held.name: held for _, held in pairs.values()}

    def loader(sets):
        data_loader, sampler = dataset.build_loader(cfg, model.tokenizer, model.token_ids, rt.rank, rt.world_size,
                                                    datasets=sets)
        # A private generator: iter(loader) would otherwise draw a worker seed from the global torch RNG, and a
        # resumed run (which calls iter() at a different point of that stream) would see other dropout masks.
        data_loader.generator = torch.Generator().manual_seed(cfg.train.seed)
        return data_loader, sampler

    train_loader, train_sampler = loader(datasets)
    eval_loader, eval_sampler = loader(eval_sets) if eval_sets else (None, None)
    log(f"data: {', '.join(f'{n} {len(d)}' for n, d in datasets.items())} samples; {len(train_sampler)} "
        f"micro-batches per epoch per rank" + (f"; eval {', '.join(f'{n} {len(d)}' for n, d in eval_sets.items())}"
                                               if eval_sets else "; no eval split"))
    return train_loader, train_sampler, eval_loader, eval_sampler


@torch.no_grad()
def evaluate(engine, loader, sampler, device) -> dict[str, float]:
    """Mean loss, token accuracy and alignment (l2) terms over the held-out split, averaged over ranks."""
    engine.eval()
    sampler.set_epoch(0)  # the same held-out batches at every evaluation
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for batch in loader:
        for name, value in engine(to_device(batch, device)).items():
            sums[name] = sums.get(name, 0.0) + float(value)
            counts[name] = counts.get(name, 0.0) + 1.0
    engine.train()
    result = runtime.mean_over_ranks(sums, counts, TERMS, device)
    l2 = [result[m] for m in MODALITIES if m in result]
    if l2:
        result["l2"] = sum(l2) / len(l2)
    return result


def train(args: argparse.Namespace) -> dict:
    cfg = config_lib.from_args(args)
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    ds_path = Path(args.ds_config) if args.ds_config else default_ds_config(cfg)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = runtime.load_ds_config(ds_path, cfg, world_size)
    rt = runtime.setup(ds_config, ds_path, args.local_rank, verbose=False)  # the reason goes to the run log
    output_dir = cfg.path(cfg.train.output_dir)
    log = RunLog(output_dir, rt.is_main, cfg.train.tensorboard)
    try:
        return _train(cfg, args, ds_config, ds_path, rt, output_dir, log)
    finally:
        log.close()
        runtime.shutdown(rt)


def _train(cfg, args, ds_config, ds_path, rt, output_dir, log) -> dict:
    import deepspeed

    from nextgpt import checkpoint
    from nextgpt.model.nextgpt import build_model, set_trainable

    if rt.is_main:
        config_lib.save(cfg, output_dir / "config.yaml")
        log(f"config {cfg.source} (resolved, saved to {output_dir / 'config.yaml'}):\n{cfg.dump()}")
        log(f"runtime: {rt.reason}")

    # Model: the same seed on every rank so the randomly initialised projectors agree before DeepSpeed starts.
    runtime.seed_everything(cfg.train.seed)
    model = build_model(cfg, device=rt.device, dtype=rt.dtype)
    if cfg.train.init_from:  # a delta folder, a run folder (its `latest`) or an original pytorch_model.pt
        source = cfg.path(cfg.train.init_from)
        loaded = checkpoint.init_from(model, cfg)
        log(f"init_from {source}: {', '.join(sorted(loaded))}")
        if (source / "latest").is_file() and not (source / "done.json").is_file():
            log(f"warning: {source} has no done.json: starting from an unfinished run's latest checkpoint")
    counts = set_trainable(model, cfg)
    log("trainable: " + ", ".join(f"{group} {count:,}" for group, count in counts.items()))

    train_loader, train_sampler, eval_loader, eval_sampler = build_data(cfg, model, rt, log)
    accum = cfg.train.gradient_accumulation_steps
    steps_per_epoch = len(train_sampler) // accum
    max_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    if max_steps <= 0:
        raise ValueError(f"{cfg.source}: {len(train_sampler)} micro-batches per rank is less than one step of "
                         f"{accum} accumulation step(s); add data or lower train.micro_batch_size")
    runtime.fill_ds_config(ds_config, cfg, rt.world_size, max_steps, ds_path)
    if left := runtime.unresolved(ds_config):
        raise ValueError(f"{ds_path}: values still 'auto' with nothing to fill them from: {', '.join(left)}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if cfg.train.optimizer_8bit:  # bitsandbytes 8-bit AdamW replaces the JSON's optimizer (the scheduler stays)
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                                 eps=cfg.train.eps, weight_decay=cfg.train.weight_decay)
        ds_config.pop("optimizer", None)
        ds_config["zero_allow_untested_optimizer"] = True
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                           config=ds_config)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the ZeRO wrapper holds the real one
    log(f"optimizer: {type(base).__module__.split('.')[0]} {type(base).__name__}, ZeRO stage "
        f"{engine.zero_optimization_stage()}, model quantization {cfg.model.quantization}")

    # Resume: trainable weights, optimizer, scheduler, RNGs, sampler position.
    step, bad_steps, saved_at = 0, 0, -1
    consumed = 0  # micro-batches of the current epoch taken from the loader (workers fetch ahead of this)
    start = resume.find_resume(output_dir, args.resume)
    if rt.is_main and (partial := resume.remove_partial(output_dir)):
        log(f"removed {len(partial)} partial file(s) of an interrupted save: {', '.join(p.name for p in partial)}")
    if start is not None:
        state = resume.load(engine, start, rt.rank)
        step, bad_steps, saved_at = state["step"], state["bad_steps"], state["step"]
        train_sampler.load_state_dict(state["sampler"])
        consumed = train_sampler.position
        log(f"resumed from {start} at step {step}")
        log.resume_at(step)
    else:
        runtime.seed_everything(cfg.train.seed + rt.rank)  # per-rank dropout streams

    def save(step: int) -> Path:
        meta = {"stage": cfg.train.stage, "step": step}
        path = resume.save(engine, output_dir, step, rt.rank,
                           {"bad_steps": bad_steps, "sampler": train_sampler.state_dict(consumed=consumed)},
                           lambda folder: checkpoint.save_delta(engine.module, folder, cfg, meta), cfg.train.keep_last)
        log(f"saved {path}")
        return path

    # ---------------------------------------------------------------------------------------------- the loop
    from tqdm import tqdm

    log(f"training {max_steps} steps ({steps_per_epoch} per epoch), global batch {ds_config['train_batch_size']}")
    # The bar is closed (its line finished) before any exception leaves the loop, so main's `error: ...` line
    # starts on a fresh line and the bar is not redrawn after it.
    with tqdm(total=max_steps, initial=step, disable=not rt.is_main, dynamic_ncols=True) as progress:
        batches = iter(train_loader)
        window = {"time": time.time(), "samples": 0, "tokens": 0}
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        while step < max_steps:
            try:
                batch = next(batches)
            except StopIteration:  # the sampler moved to the next epoch by itself (new plan from seed + epoch)
                batches, consumed = iter(train_loader), 0
                continue
            consumed += 1
            batch = to_device(batch, rt.device)
            out = engine(batch)
            loss = out["loss"]
            if runtime.any_rank(not bool(torch.isfinite(loss)), rt.device):
                # Skip the micro-batch on every rank (no backward: its gradients never reach the optimizer).
                bad_steps += 1
                log(f"step {step}: non-finite loss {loss.item()} ({bad_steps} so far) in "
                    f"{[s.where for s in batch['samples']][:4]}")
                if bad_steps > cfg.train.max_bad_steps:
                    raise TrainingAborted(f"{bad_steps} non-finite losses, more than train.max_bad_steps "
                                          f"({cfg.train.max_bad_steps}); last at step {step}: lower train.lr or "
                                          "check the data")
                continue
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            lr = engine.get_lr()[0]  # the lr this step uses (the scheduler moves on inside engine.step)
            engine.step()
            for name, value in out.items():  # a term may be missing from a micro-batch (no such modality in it)
                sums[name] = sums.get(name, 0.0) + float(value.detach())
                counts[name] = counts.get(name, 0.0) + 1.0
            window["samples"] += batch["input_ids"].shape[0] * rt.world_size
            window["tokens"] += int(batch["attention_mask"].sum()) * rt.world_size  # estimate: this rank's x world
            if not boundary:
                continue

            step += 1
            elapsed = max(time.time() - window["time"], 1e-9)
            grad_norm = engine.get_global_grad_norm()
            terms = runtime.mean_over_ranks(sums, counts, TERMS, rt.device)  # the global batch, not rank 0's share
            scalars = {**terms, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "samples_per_s": window["samples"] / elapsed, "tokens_per_s": window["tokens"] / elapsed}
            log.scalars("train", step, scalars)
            progress.update(1)
            progress.set_postfix(loss=f"{terms['loss']:.4f}", acc=f"{terms.get('token_acc', 0.0):.3f}")
            if step % cfg.train.log_every == 0 or step == 1:
                log(f"step {step}/{max_steps} " + " ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
            sums, counts = {}, {}
            if eval_loader is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                result = evaluate(engine, eval_loader, eval_sampler, rt.device)
                log.scalars("eval", step, result)
                log(f"eval step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in result.items()))
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < max_steps:
                save(step)
                saved_at = step
            window = {"time": time.time(), "samples": 0, "tokens": 0}  # rates exclude eval and save time

    final = save(step) if saved_at != step else resume.checkpoint_path(output_dir, step)
    if args.export_legacy and rt.is_main:
        checkpoint.export_legacy(engine.module, final / "pytorch_model.pt")
        log(f"exported {final / 'pytorch_model.pt'}")
    if rt.is_main:
        resume.write_done(output_dir, step, final, {"stage": cfg.train.stage, "bad_steps": bad_steps})
        log(f"done: {final} ({step} steps, {bad_steps} skipped micro-batches)")
    runtime.barrier()
    return {"step": step, "checkpoint": final, "bad_steps": bad_steps}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except TrainingAborted as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
