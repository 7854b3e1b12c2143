"""Train one NExT-GPT stage (1, 2, 3 or the 8-bit fine-tune): one program, the stage is configuration.

    deepspeed code/train.py --config code/config/stage_1.yaml --ds_config code/dsconfig/stage_1.json
    python code/train.py --config code/config/tiny/stage_1.yaml                  # CPU, one process
    deepspeed --num_gpus 2 code/train.py --config ... --set train.micro_batch_size=2

config -> runtime (device, dtype, rank) -> model (+ init_from, trainable set) -> data (nextgpt.data.loaders) ->
engine (nextgpt.training.deepspeed.build_engine) -> the loop below, which adds up NextGPT.forward's dict of losses (nextgpt.training.runlog).
Checkpoints go to <train.output_dir>/checkpoint-<step>/ (nextgpt.checkpoint.resume); `--resume auto` (the default)
continues from <train.output_dir>/latest bit-exactly on CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from nextgpt import config as config_lib
from nextgpt import cli, runtime
from nextgpt.checkpoint import resume
from nextgpt.checkpoint import resume_checks
from nextgpt.eval.run import heldout_loss
from nextgpt.training import peers, runlock
from nextgpt.training.runlog import RunLog, TermMeans
from nextgpt.runtime import to_device
from nextgpt.training.stop import StopRequest


class TrainingAborted(RuntimeError):
    """The run cannot go on (too many non-finite losses); the message says why."""

    exit_code = 1  # nextgpt.cli: documented "training aborted" status


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    config_lib.add_config_args(parser)
    parser.add_argument("--ds_config", "--ds-config", default=None,
                        help="DeepSpeed JSON (default: code/dsconfig/gpu.json on GPUs, cpu.json on CPU)")
    parser.add_argument("--resume", default="auto",
                        help="auto (continue from <output_dir>/latest if present) | none | a checkpoint folder")
    parser.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=None,
                        help="stop after this many optimizer steps (overrides train.max_steps; 0: check config, "
                             "model and data, train nothing)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume although the config changed (learning rate, steps, batch, ...); the change "
                             "is recorded in every later checkpoint's meta.json")
    parser.add_argument("--export-legacy", action="store_true",
                        help="also write pytorch_model.pt in the original key layout beside the final delta")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def evaluate(engine, loader, sampler, device) -> dict[str, float]:
    """Loss, token accuracy and alignment (l2) terms over the held-out split, over ranks: the one held-out loss
    (nextgpt.eval.run.heldout_loss, token-weighted), the same number `make eval` reports for the checkpoint."""
    sampler.set_epoch(0)  # the same held-out batches at every evaluation
    return heldout_loss(engine, loader, device, l2_mean=True)


def train(args: argparse.Namespace) -> dict:
    cfg = config_lib.from_args(args)
    if args.max_steps is not None:
        if args.max_steps < 0:
            raise ValueError(f"--max-steps: must be >= 0, got {args.max_steps}")
        cfg.train.max_steps = args.max_steps
    ds_path = Path(args.ds_config) if args.ds_config else runtime.default_ds_config()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = runtime.load_ds_config(ds_path, cfg, world_size)
    rt = runtime.setup(ds_config, ds_path, args.local_rank, verbose=False,  # the reason goes to the run log
                       timeout=cfg.train.dist_timeout)
    output_dir = cfg.path(cfg.train.output_dir)
    lock = log = None
    beat = peers.Heartbeat(rt.rank, rt.world_size)  # names a rank that died (nextgpt.training.peers)
    try:
        # Every rank writes its ZeRO partition and rank state into output_dir at each save: one folder for all.
        peers.prove_shared({"train.output_dir": output_dir}, rt.rank)
        beat.start()
        # One run per output folder (nextgpt.training.runlock); its run id names this run's temporary folders.
        lock, run_id = runlock.acquire_collective(output_dir, rt.is_main, "training")
        cli.set_log(output_dir / "train.log")  # where main's error line sends the traceback
        log = RunLog(output_dir, rt.is_main, cfg.train.report_to, cfg.to_dict())
        for note in lock.notes if lock else []:
            log(note)
        # SIGINT / SIGTERM / a dead launcher: stop at the end of the step, save, exit 130/143 (nextgpt.training.stop).
        with StopRequest(watch_launcher="LOCAL_RANK" not in rt.env_we_set) as stop:
            return _train(cfg, args, ds_config, ds_path, rt, output_dir, log, stop, run_id)
    except RuntimeError as e:  # a failed collective (gloo / NCCL) when a peer died: one line naming it
        if not isinstance(e, TrainingAborted) and (lost := beat.explain(e, output_dir)) is not None:
            raise lost from e
        raise
    finally:
        beat.stop()
        if log is not None:
            log.close()
        if lock is not None:
            lock.release()
        runtime.shutdown(rt)


def _train(cfg, args, ds_config, ds_path, rt, output_dir, log, stop, run_id) -> dict:
    from nextgpt.checkpoint import delta as checkpoint
    from nextgpt.checkpoint import legacy
    from nextgpt.data.loaders import build_run_data, count_steps
    from nextgpt.eval.training import GenerationChecks
    from nextgpt.training.deepspeed import build_ds_config, build_engine, check_compiled_ops, param_groups
    from nextgpt.model.nextgpt import build_model
    from nextgpt.model.trainable import set_trainable
    from nextgpt.model import caption_encoder, denoising

    # An op the dsconfig makes DeepSpeed compile (offload.json: cpu_adam) needs its tools: refused now, in one line,
    # not after minutes of loading. The 8-bit fine-tune's optimizer comes from code: the JSON's builds nothing.
    if not cfg.train.optimizer_8bit:
        for note in check_compiled_ops(ds_config, ds_path, rt.device.type == "cuda"):
            log(note)
    # What to resume: the newest checkpoint that verifies, written by as many processes, with the same config
    # unless --allow-config-change; checked before anything is loaded or written (nextgpt.checkpoint.resume_checks).
    start, changes = resume_checks.plan(output_dir, args.resume, cfg.to_dict(), rt.world_size,
                                        args.allow_config_change, log)
    if rt.is_main:
        config_lib.save(cfg, output_dir / "config.yaml")
        log(f"config {cfg.source} (resolved, saved to {output_dir / 'config.yaml'}):\n{cfg.dump()}")
        log(f"runtime: {rt.reason}")

    # Model: the same seed on every rank so the randomly initialised projectors agree before DeepSpeed starts.
    runtime.seed_everything(cfg.train.seed)
    model = build_model(cfg, device=rt.device, dtype=rt.dtype)
    caption_encoder.attach(model, cfg, rt.device, rt.dtype)  # data.caption_embeds=online: targets made in the step
    model.denoising = denoising.build(cfg, rt.device, rt.dtype)  # gen_<modality> weights: frozen UNets + VAEs
    checkpoint.init_from(model, cfg, log)  # train.init_from: the previous stage's delta or an original .pt
    counts = set_trainable(model, cfg)
    log("trainable: " + ", ".join(f"{group} {count:,}" for group, count in counts.items()))

    train_loader, train_sampler, eval_loader, eval_sampler = build_run_data(cfg, model.tokenizer, model.token_ids,
                                                                            rt.rank, rt.world_size, log,
                                                                            pin_memory=rt.device.type == "cuda")
    checks = GenerationChecks(cfg, eval_loader.dataset.datasets, log) if eval_loader is not None else None
    if args.max_steps == 0:
        log("--max-steps 0: config, model and data checked; trained 0 steps, nothing saved")
        return {"step": 0, "checkpoint": None, "bad_steps": 0}
    max_steps, steps_per_epoch = count_steps(cfg, train_sampler)
    # The run's DeepSpeed JSON, built once now that the step count is known, and not changed after.
    params = param_groups(model, cfg)
    ds_config = build_ds_config(ds_config, cfg, rt.world_size, max_steps, params, ds_path)
    engine = build_engine(model, cfg, ds_config, params)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the ZeRO wrapper holds the real one
    log(f"optimizer: {type(base).__module__.split('.')[0]} {type(base).__name__}, ZeRO stage "
        f"{engine.zero_optimization_stage()}, model quantization {cfg.model.quantization}")

    # Resume: trainable weights, optimizer, scheduler, RNGs, sampler position.
    step, bad_steps, saved_at, skipped_records = 0, 0, -1, 0
    consumed = 0  # micro-batches of the current epoch taken from the loader (workers fetch ahead of this)
    history: list[dict] = []  # config changes made on resume: [{"step", "changes"}], in meta.json from then on
    if rt.is_main and (partial := resume.remove_partial(output_dir)):
        log(f"removed {len(partial)} partial file(s) of an interrupted save: {', '.join(p.name for p in partial)}")
    if start is not None:
        state = resume.load(engine, start, rt.rank)
        step, bad_steps, saved_at = state["step"], state["bad_steps"], state["step"]
        train_sampler.load_state_dict(state["sampler"])
        consumed = train_sampler.position
        history = state.get("config_changes", []) + ([{"step": step, "changes": changes}] if changes else [])
        log(f"resumed from {start} at step {step}")
        log.resume_at(step)
    else:
        runtime.seed_everything(cfg.train.seed + rt.rank)  # per-rank dropout streams

    def save(step: int) -> Path:
        meta = {"stage": cfg.train.stage, "step": step, **({"config_changes": history} if history else {})}
        path = resume.save(engine, output_dir, step, rt.rank,
                           {"bad_steps": bad_steps, "sampler": train_sampler.state_dict(consumed=consumed),
                            "config_changes": history},
                           lambda folder: checkpoint.save_delta(engine.module, folder, cfg, meta), cfg.train.keep_last,
                           run_id)
        log(f"saved {path}")
        return path

    # ---------------------------------------------------------------------------------------------- the loop
    from tqdm import tqdm

    log(f"training {max_steps} steps ({steps_per_epoch} per epoch), global batch {ds_config['train_batch_size']}")
    # The bar is closed (its line finished) before any exception leaves the loop, so main's `error: ...` line
    # starts on a fresh line and the bar is not redrawn after it.
    with tqdm(total=max_steps, initial=step, disable=not rt.is_main, dynamic_ncols=True) as progress:
        batches = iter(train_loader)
        terms = TermMeans()  # this step's loss terms and throughput
        stop.arm()  # from here a signal stops the loop at the end of the step instead of raising at once
        while step < max_steps:
            try:
                batch = next(batches)
            except StopIteration:  # the sampler moved to the next epoch by itself (new plan from seed + epoch)
                batches, consumed = iter(train_loader), 0
                continue
            consumed += 1
            for line in batch.pop("skipped", []):  # records whose cached vectors failed their read check
                skipped_records += 1
                log(f"1 record skipped at step {step} ({skipped_records} so far, data.skip_bad_records): {line}")
            batch = to_device(batch, rt.device)
            batch["step"] = step  # seeds the denoising loss's noise per (step, target): resume draws the same
            out = engine(batch)
            loss = out["loss"]
            if runtime.any_rank(not bool(torch.isfinite(loss)), rt.device):
                # Skip the micro-batch on every rank (no backward: its gradients never reach the optimizer).
                bad_steps += 1
                where = ", ".join(s.where for s in batch["samples"][:4]) + (", ..." if len(batch["samples"]) > 4
                                                                           else "")
                log(f"step {step}: non-finite loss {loss.item()} ({bad_steps} so far) in {where}")
                if bad_steps > cfg.train.max_bad_steps:
                    raise TrainingAborted(f"{bad_steps} non-finite losses, more than train.max_bad_steps "
                                          f"({cfg.train.max_bad_steps}); last at step {step} in {where}: lower "
                                          "train.lr or check the data")
                continue
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            lr = engine.get_lr()[0]  # the lr this step uses (the scheduler moves on inside engine.step)
            engine.step()
            terms.add(out, batch, rt.world_size)
            if not boundary:
                continue

            step += 1
            grad_norm = engine.get_global_grad_norm()
            means = terms.means(rt.device)
            scalars = {**means, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       **terms.rates()}
            log.scalars("train", step, scalars)
            progress.update(1)
            progress.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means.get('token_acc', 0.0):.3f}")
            if step % cfg.train.log_every == 0 or step == 1:
                log(f"step {step}/{max_steps} " + " ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
            if eval_loader is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                result = evaluate(engine, eval_loader, eval_sampler, rt.device) | checks.run(model, step)
                log.scalars("eval", step, result)
                log.media(step, checks.pending)  # W&B (train.report_to: wandb); write_media then clears them
                checks.write_media(log.writer, step)
                log(f"eval step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in result.items()))
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < max_steps:
                save(step)
                saved_at = step
            if step < max_steps and runtime.any_rank(stop.requested, rt.device):  # all ranks stop after this step
                if saved_at != step:
                    save(step)
                    saved_at = step
                raise stop.interrupted(step, f"checkpoint-{step}",
                                       f"the same command (--resume auto continues from checkpoint-{step})")
            terms = TermMeans()  # made after eval and save: the rates exclude their time

    final = save(step) if saved_at != step else resume.checkpoint_path(output_dir, step)
    if args.export_legacy and rt.is_main:
        legacy.export_legacy(engine.module, final / "pytorch_model.pt")
        log(f"exported {final / 'pytorch_model.pt'}")
    if rt.is_main:
        resume.write_done(output_dir, step, final, {"stage": cfg.train.stage, "bad_steps": bad_steps})
        log(f"done: {final} ({step} steps, {bad_steps} skipped micro-batches"
            + (f", {skipped_records} record(s) skipped for bad cached vectors" if skipped_records else "") + ")")
    runtime.barrier()
    return {"step": step, "checkpoint": final, "bad_steps": bad_steps}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Every failure ends in one `error:` line (exit 2; TrainingAborted 1; 130/143 interrupted), the traceback in
    # <output_dir>/train.log (nextgpt.cli).
    return cli.run(lambda: train(args) and 0, "train")


if __name__ == "__main__":
    sys.exit(main())
