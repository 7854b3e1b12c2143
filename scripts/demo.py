"""`make demo`: the whole NExT-GPT pipeline on a CPU in minutes, with tiny models and toy data it builds itself.

    tiny checkpoints (ImageBind and the decoders trained on the toy world, once) -> the tiny Vicuna learns the toy
    language -> toy data -> caption embeddings + ImageBind features -> stage 1 -> its held-out evaluation,
    untrained vs trained -> stage 2 -> stage 3 (DeepSpeed on the CPU) -> the held-out evaluation of the base model
    vs the stage 1/2/3 checkpoints and the toy judge's reading of the generated media (= make eval CONFIG=tiny) ->
    inference: a question about a toy image, then requests for an image, a video and a sound, each judged

Every step but one is the command a user runs (the Makefile's with CONFIG=tiny): scripts/tiny/make_tiny_ckpt.py
--train, scripts/tiny/make_toy_data.py, scripts/tiny/judge_eval.py, code/process_embeddings.py, code/train.py, code/evaluate.py, code/inference.py, each
with the tiny configs and `--set` overrides for --workdir and the demo's step budgets (STAGE_SETTINGS). The one
exception is the toy-language warm-up below: the original has no such step (its Vicuna is already trained).

The tiny Vicuna of make_tiny_ckpt is random; the real one has read the web. So that stage 1 can show what it is
for (a frozen LLM that already speaks learns to describe media through input_proj), the demo first trains the
tiny LLM on the toy world's text in the chat template, a few hundred plain PyTorch steps, and writes it back into
ckpt/tiny/vicuna (with pretrained.json). The three stages then run exactly as on real checkpoints.

Every step prints its progress and keeps a log in runs/demo/logs/. A finished step leaves a stamp (the files the
Makefile chains on: ckpt/tiny/.complete, data/toy/.complete, each stage's done.json; runs/demo/stamps/ for the
rest) and is skipped when the demo runs again; --fresh starts over. At the end it prints a report (loss and token
accuracy of every stage at start and end, stage-1 accuracy of the untrained vs the trained model on the same
held-out toy captions, the evaluation table of the base model vs the three stages (loss, token accuracy, BLEU-4,
CIDEr-D, signal-token emission rate, l2 / cosine, ImageBind score), where every checkpoint and output is) and writes
runs/demo/loss_curves.png.

    python scripts/demo.py [--fresh] [--workdir DIR] [--pretrain-steps N] [--stage1-steps N ...]

--workdir DIR builds everything under DIR (DIR/ckpt/tiny, DIR/data/toy, DIR/runs/demo) instead of the repository,
by pointing every tiny-config path there with --set overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from nextgpt import cli
from nextgpt.io import atomic_write_text
from nextgpt.runtime import free_port
from tiny.tiny_workspace import tiny_env_at

CPU_DS_CONFIG = ROOT / "code" / "dsconfig" / "cpu.json"
DEFAULT_STEPS = {1: 600, 2: 100, 3: 2000}
PRETRAIN_STEPS = 200
# More toy media than make_toy_data's defaults (48 / 24 / 12): the held-out stage-1 captions then number ~50,
# and input_proj sees enough media to generalise. Seconds to render and encode.
TOY_COUNTS = {"images": 192, "videos": 48, "audios": 24}
# Demo settings on top of the tiny configs, printed with each command. Stage 1 holds out 20% of the toy media
# (train.py's data.eval_fraction split, evaluated every 100 steps) so its accuracy is measured on unseen media.
# The learning rates are what the tiny models need to learn within the step budget (measured on 2 CPU cores).
STAGE_SETTINGS = {1: ["data.eval_fraction=0.2", "train.eval_every=100", "train.lr=3.0e-2", "train.log_every=100"],
                  2: ["train.log_every=50"],
                  3: ["train.lr=5.0e-3", "train.log_every=250"]}
# The base-vs-stages evaluation is `make eval CONFIG=tiny` made cheaper so the demo stays short: 4 held-out records
# per dataset (~35 requests per checkpoint) and one decoded medium per modality for the ImageBind score.
EVAL_ARGS = ["--limit", "4", "--decode", "1"]


class DemoError(RuntimeError):
    """A step failed; the message names the step and its log (which holds the step's own error line)."""

    exit_code = 2  # nextgpt.cli: the message is the whole story, no traceback of ours to point at


# ----------------------------------------------------------------------------------------------------------------
# Running steps

def run_command(command: list[str], log_path: Path, stdin_text: str | None = None) -> None:
    """Run a step's command, echoing its output live and keeping it in log_path; DemoError on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(command) + "\n").encode())
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL)
        if stdin_text is not None:
            process.stdin.write(stdin_text.encode())
            process.stdin.close()
        while chunk := process.stdout.read1(4096):     # raw chunks: tqdm's \r updates stay progress bars
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
        code = process.wait()
    if code != 0:
        raise DemoError(f"exit status {code}; see {log_path}")


class Steps:
    """Numbered steps with stamps: a step whose stamp exists is reported as done and skipped."""

    def __init__(self, total: int, logs: Path):
        self.total, self.logs, self.number, self.times = total, logs, 0, {}

    def __call__(self, name: str, stamp: Path | None, action) -> None:
        self.number += 1
        head = f"[demo {self.number}/{self.total}] {name}"
        if stamp is not None and stamp.exists():
            print(f"{head}: done before ({stamp}), skipped", flush=True)
            return
        print(f"\n{head} ...", flush=True)
        start = time.time()
        try:
            action(self.logs / f"{self.number:02d}_{name.split()[0].lower()}.log")
        except DemoError as e:
            raise DemoError(f"step {self.number} ({name}) failed: {e}") from None
        self.times[name] = time.time() - start
        print(f"{head}: finished in {self.times[name]:.0f} s", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The tiny Vicuna learns the toy language (what pre-training + chat tuning gave the real Vicuna)

def toy_chat_corpus() -> list[str]:
    """The toy world's text in the conversation template: captions, captions after caption requests, requests for
    media answered in words ("Here is a video for you."), and the text-only questions. No media and no signal
    tokens: describing media and producing them are what the three stages teach."""
    from tiny import toyworld as toy
    from nextgpt.data.conversation import ASSISTANT, HUMAN_PREFIX, TURN_END

    def chat(question: str, answer: str) -> str:
        return f"{HUMAN_PREFIX}{question}{ASSISTANT}{answer}{TURN_END}"

    lines = []
    for modality, captions in (("image", toy.image_captions()), ("video", toy.video_captions()),
                               ("audio", toy.audio_captions())):
        noun = toy.GENERATION_NOUNS[modality][0]
        for k, (caption, *_) in enumerate(captions):
            lines += [caption, chat("generate a caption", caption), chat(toy.comprehension_prompt(modality, k), caption),
                      chat(toy.generation_prompt(modality, caption, k), f"Here is {noun} for you.")]
    lines += [chat(q, a) for q, a in [*toy.text_qa(), *toy.CHAT_OPENERS, *toy.image_questions("red", "circle", "blue")]]
    return lines


def pretrain_tiny_llm(folder: Path, steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0) -> dict:
    """Next-token training of the LLM in `folder` on toy_chat_corpus(); the folder is replaced atomically, its
    tokenizer files kept as they are, and pretrained.json (steps, losses) written inside."""
    import random

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from nextgpt.io import atomic_dir

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    lines = toy_chat_corpus()
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    history: list[tuple[int, float]] = []
    model.train()
    start = time.time()
    for step in range(1, steps + 1):
        batch = tokenizer(rng.sample(lines, batch_size), return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)       # (B, L), no loss on padding
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        history.append((step, float(loss)))
        if step == 1 or step % 25 == 0 or step == steps:
            print(f"  step {step}/{steps} loss {float(loss):.3f} ({time.time() - start:.0f} s)", flush=True)
    record = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "lines": len(lines),
              "loss_start": history[0][1], "loss_end": sum(v for _, v in history[-10:]) / len(history[-10:]),
              "history": history}
    with atomic_dir(folder) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)      # tokenizer files as make_tiny_ckpt wrote them
        model.save_pretrained(str(tmp))
        atomic_write_text(tmp / "pretrained.json", json.dumps(record) + "\n")
    return record


# ----------------------------------------------------------------------------------------------------------------
# Report

def read_metrics(output_dir: Path, split: str = "train") -> list[dict]:
    """The records train.py appended to <output_dir>/metrics.jsonl for one split (train | eval)."""
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("split") == split]


def start_end(records: list[dict], key: str, window: int = 5) -> tuple[float, float] | None:
    """(mean of the first `window` steps, mean of the last `window` steps) of a logged scalar, or None."""
    values = [r[key] for r in records if key in r]
    if not values:
        return None
    head, tail = values[:window], values[-window:]
    return sum(head) / len(head), sum(tail) / len(tail)


def moving_average(values, window: int) -> list[float]:
    """Trailing mean over up to `window` values (the first points average what exists so far)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(panels: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> None:
    """One panel per training run: loss curves on the left axis, token accuracies (dashed) on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    for axis, (title, curves) in zip(axes[0], panels.items()):
        accuracy_axis = None
        for label, points in curves.items():
            if not points:
                continue
            steps, values = zip(*points)
            target = axis
            style = {"linestyle": "-"}
            if "acc" in label:
                accuracy_axis = accuracy_axis or axis.twinx()
                target, style = accuracy_axis, {"linestyle": "--"}
            colour = next(colours)
            if len(values) > 20:        # batches alternate between datasets: show the raw steps faintly, smoothed
                target.plot(steps, values, color=colour, alpha=0.2, linewidth=0.6)
                values = moving_average(values, 10)
            target.plot(steps, values, color=colour, label=label, linewidth=1.2,
                        marker="o" if len(values) < 10 else None, markersize=3, **style)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        handles, labels = axis.get_legend_handles_labels()
        if accuracy_axis is not None:
            accuracy_axis.set_ylim(0, 1)
            accuracy_axis.set_ylabel("token accuracy")
            more = accuracy_axis.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        axis.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3,
                    frameon=False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo outputs and start over")
    parser.add_argument("--workdir", default=str(ROOT), help="where ckpt/tiny, data/toy, runs/demo go")
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS,
                        help=f"toy-language steps of the tiny Vicuna (default {PRETRAIN_STEPS})")
    for stage, steps in DEFAULT_STEPS.items():
        parser.add_argument(f"--stage{stage}-steps", type=int, default=steps,
                            help=f"stage-{stage} optimizer steps (default {steps})")
    # Opt-in: on this 2-core CPU the toy training takes about an hour and its decoders do not yet draw what is asked
    # (README "The toy world, trained and judged"), so the default demo keeps ImageBind and the decoders random.
    parser.add_argument("--trained-toy", action="store_true",
                        help="train ImageBind and the decoders on the toy world first (once per clone; about an hour "
                             "on 2 CPU cores), so generated media can be judged")
    parser.add_argument("--judged-requests", type=int, default=12,
                        help="judged requests per modality and checkpoint of trained-on combinations (default 12, "
                             "and then every held-out combination; below 12 also at most that many held-out)")
    parser.add_argument("--launcher", choices=["deepspeed", "python"], default="deepspeed",
                        help="train through the deepspeed launcher (default) or a plain python process")
    args = parser.parse_args(argv)
    return cli.run(lambda: demo(args), "demo")  # a failed step: one `error:` line naming its log, exit 2


def demo(args) -> int:
    started = time.time()
    work = Path(args.workdir).resolve()
    # ckpt/tiny, data/toy and runs/ under the workdir; every path of the tiny configs pointed there (--set)
    env = tiny_env_at(work, work / "ckpt" / "tiny", work / "data" / "toy")
    runs = work / "runs" / "demo"
    python = sys.executable
    if args.fresh:
        for folder in (env.ckpt, env.data, runs):
            if folder.exists():
                print(f"--fresh: removing {folder}", flush=True)
                shutil.rmtree(folder)
    runs.mkdir(parents=True, exist_ok=True)
    stamps = runs / "stamps"
    settings = {stage: STAGE_SETTINGS[stage] for stage in (1, 2, 3)}
    cfg = {stage: env.config(stage, *settings[stage]) for stage in (1, 2, 3)}
    outputs = {stage: cfg[stage].path(cfg[stage].train.output_dir) for stage in (1, 2, 3)}
    llm_folder = cfg[1].path(cfg[1].model.llm)
    steps = Steps(13, runs / "logs")
    with_config = env.argv            # ['--config', code/config/tiny/<stage>.yaml, '--set', ...]

    def tool(script: str, *arguments: str):
        return lambda log: run_command([python, str(ROOT / script), *arguments], log)

    # 1-2: tiny checkpoints of the real architectures; the tiny Vicuna learns the toy language
    # --trained-toy: ImageBind and the decoders learn the toy world (once per clone; README "The toy world, trained
    # and judged"), so generated media can be judged
    steps("tiny checkpoints" + (" + toy-trained ImageBind and decoders" if args.trained_toy else ""),
          env.ckpt / ".complete",
          tool("scripts/tiny/make_tiny_ckpt.py", "--out", str(env.ckpt), "--data", str(env.data),
               *(["--train"] if args.trained_toy else [])))
    steps("toy-language pre-training of the tiny Vicuna", llm_folder / "pretrained.json",
          lambda log: pretrain_tiny_llm(llm_folder, args.pretrain_steps))

    # 3-5: toy data; caption embeddings (stage 2/3 targets); ImageBind features (stage 1/3 inputs)
    steps("toy data", env.data / ".complete", tool("scripts/tiny/make_toy_data.py", "--out", str(env.data),
                                                    *[f"--{kind}={count}" for kind, count in TOY_COUNTS.items()]))

    def process(what: str, stages: tuple[str, ...], *extra: str):
        def action(log: Path) -> None:
            for stage in stages:                 # process_embeddings skips what an earlier stage already wrote
                run_command([python, str(ROOT / "code" / "process_embeddings.py"), *with_config(stage), "--all",
                             *extra], log.with_name(f"{log.stem}_{stage}.log"))
            atomic_write_text(stamps / f"{what}.done", "ok\n")
        return action

    steps("caption embeddings (the decoders' text encoders)", stamps / "embeddings.done",
          process("embeddings", ("stage_2", "stage_3")))
    steps("ImageBind features (stage 1 and 3 inputs)", stamps / "features.done",
          process("features", ("stage_1", "stage_3"), "--features"))

    # 6-7: stage 1; the held-out evaluation of the untrained model (fresh input_proj) and the trained one
    stage1_eval = runs / "stage1_eval"
    evaluate = tool("code/evaluate.py", *with_config(1, *settings[1]), "--ckpt", "base", str(outputs[1]),
                    "--out", str(stage1_eval), "--decode", "0")

    def train(stage: int):
        command = [str(ROOT / "code" / "train.py"), *with_config(stage, *settings[stage]),
                   "--ds_config", str(CPU_DS_CONFIG), "--max-steps", str(getattr(args, f"stage{stage}_steps"))]
        if args.launcher == "deepspeed":
            command = [python, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
                       "--master_port", str(free_port()), *command]
        else:
            command = [python, *command]

        def action(log: Path) -> None:
            if settings[stage]:
                print(f"  demo settings: {' '.join(settings[stage])}", flush=True)
            run_command(command, log)
        return action

    # A stage finished on another base (e.g. `make stage3 CONFIG=tiny` before the toy-language pre-training changed
    # the tiny Vicuna) is not skipped: a delta is only valid on its own base (nextgpt.checkpoint.fingerprint). It is trained
    # again, and so is everything after it (their deltas were trained on top of it).
    from nextgpt.checkpoint.fingerprint import stale_run

    stale = next((stage for stage in (1, 2, 3) if stale_run(outputs[stage], cfg[stage])), None)
    if stale is not None:
        print(f"stage {stale}: {stale_run(outputs[stale], cfg[stale])}: stages {stale}-3 are trained again",
              flush=True)
        for stage in range(stale, 4):
            shutil.rmtree(outputs[stage], ignore_errors=True)
        if stale == 1:                                                          # measured on that base too
            shutil.rmtree(stage1_eval, ignore_errors=True)
        shutil.rmtree(runs / "inference", ignore_errors=True)
    # The base-vs-stages evaluation and the inference used the checkpoints as they were: any stage about to be
    # trained (stale, removed by hand, or never finished) makes them stale too.
    every_stage = runs / "eval"
    if not all((outputs[stage] / "done.json").exists() for stage in (1, 2, 3)):
        shutil.rmtree(every_stage, ignore_errors=True)
        shutil.rmtree(runs / "inference", ignore_errors=True)

    steps("stage 1 training (encoder side: input_proj)", outputs[1] / "done.json", train(1))
    steps("stage-1 held-out evaluation, untrained vs trained (code/evaluate.py)", stage1_eval / "metrics.json",
          evaluate)
    accuracy = stage1_accuracy(stage1_eval / "metrics.json")

    # 8-9: stages 2 and 3
    steps("stage 2 training (decoder side: output_proj)", outputs[2] / "done.json", train(2))
    steps("stage 3 training (instructions: LoRA + both projections)", outputs[3] / "done.json", train(3))

    # 10: the held-out evaluation of the base model vs every stage's checkpoint: the emission rate of signal tokens
    # rises from 0 (the base model never emits them) once stage 3 has taught the instructions
    steps("held-out evaluation, base vs stages 1-3 (code/evaluate.py; make eval CONFIG=tiny, fewer records)",
          every_stage / "metrics.json",
          tool("code/evaluate.py", *with_config("eval"), "--ckpt", "base", *(str(outputs[s]) for s in (1, 2, 3)),
               *EVAL_ARGS, "--out", str(every_stage)))

    # 11: what the generated media show (scripts/tiny/judge_eval.py; the second half of make eval CONFIG=tiny):
    # (a) each decoder fed the true caption embedding, (b) end to end per checkpoint, captioning, ImageBind
    judged = runs / "judged"
    steps("judged evaluation: the toy judge reads the generated media (scripts/tiny/judge_eval.py)",
          judged / "judged.md",
          tool("scripts/tiny/judge_eval.py", *with_config("eval"), "--ckpt", "base",
               *(str(outputs[s]) for s in (1, 2, 3)), "--trained", str(args.judged_requests),
               "--captions", str(min(8, args.judged_requests)),
               *(["--held", str(args.judged_requests)] if args.judged_requests < 12 else []), "--out", str(judged)))

    # 12: inference through the interactive CLI, greedy
    inference_dir = runs / "inference"
    image, caption = first_toy_image(env.data)
    requests = [f"<Image>{image}</Image> What is the image about?",
                # the toy instruction data's wording (toyworld.GENERATION_PROMPTS + a toy caption)
                "Can you show me a picture of a red circle on a black background",
                "Please generate a video of a blue square moving left",
                "I would like you to make a sound of a high beeping tone"]

    def infer(log: Path) -> None:
        if inference_dir.exists():
            shutil.rmtree(inference_dir)
        run_command([python, str(ROOT / "code" / "inference.py"), *with_config(3, "inference.do_sample=false"),
                     "--ckpt", str(outputs[3]), "--out", str(inference_dir)], log,
                    stdin_text="\n".join(requests) + "\nexit\n")
        atomic_write_text(inference_dir / "requests.json",
                          json.dumps({"requests": requests, "input_caption": caption}, indent=2) + "\n")

    steps("inference (an image in; an image, a video and a sound out)", inference_dir / "requests.json", infer)

    # 13: report
    print(f"\n[demo {steps.total}/{steps.total}] report\n", flush=True)
    pretrained = json.loads((llm_folder / "pretrained.json").read_text())
    train_metrics = {stage: read_metrics(outputs[stage]) for stage in (1, 2, 3)}
    panels = {f"tiny Vicuna, toy language ({pretrained['steps']} steps)": {"lm loss": pretrained["history"]}}
    for stage in (1, 2, 3):
        records = train_metrics[stage]
        curves = {"loss": [(r["step"], r["loss"]) for r in records]}
        curves.update({f"{m} l2": [(r["step"], r[m]) for r in records if m in r] for m in ("image", "video", "audio")
                       if any(m in r for r in records)})
        curves["token acc"] = [(r["step"], r["token_acc"]) for r in records if "token_acc" in r]
        evaluations = read_metrics(outputs[stage], "eval")
        if evaluations:
            curves["held-out token acc"] = [(r["step"], r["token_acc"]) for r in evaluations]
        if stage == 1 and "untrained" in accuracy and "trained" in accuracy and records:
            curves["held-out acc, untrained / trained"] = [(0, accuracy["untrained"]["token_acc"]),
                                                           (records[-1]["step"], accuracy["trained"]["token_acc"])]
        panels[f"stage {stage}"] = curves
    curves_path = runs / "loss_curves.png"
    plot_curves(panels, curves_path)

    lines = ["NExT-GPT demo: tiny models, toy data, CPU", "",
             f"  tiny Vicuna on the toy language: {pretrained['steps']} steps, LM loss "
             f"{pretrained['loss_start']:.3f} -> {pretrained['loss_end']:.3f}"]
    for stage in (1, 2, 3):
        records = train_metrics[stage]
        loss, acc = start_end(records, "loss"), start_end(records, "token_acc")
        line = f"  stage {stage}: {len(records)} steps"
        if loss:
            line += f", loss {loss[0]:.3f} -> {loss[1]:.3f}"
        if acc:
            line += f", token accuracy {acc[0]:.3f} -> {acc[1]:.3f}"
        lines.append(line + "   (mean of the first 5 steps -> of the last 5)")
    if "untrained" in accuracy and "trained" in accuracy:
        u, t = accuracy["untrained"], accuracy["trained"]
        lines.append(f"  stage-1 token accuracy on the same {t['samples']} held-out toy captions: "
                     f"untrained {u['token_acc']:.3f} -> trained {t['token_acc']:.3f}   "
                     f"(LM loss {u['heldout_lm']:.3f} -> {t['heldout_lm']:.3f}; BLEU-4 of greedy captions "
                     f"{u.get('bleu4', float('nan')):.3f} -> {t.get('bleu4', float('nan')):.3f}; {stage1_eval / 'report.md'})")
    lines += every_stage_table(every_stage / "metrics.json")
    lines += ["", "  checkpoints:", f"    tiny Vicuna (toy language): {llm_folder}"]
    for stage in (1, 2, 3):
        done = outputs[stage] / "done.json"
        name = json.loads(done.read_text()).get("checkpoint", "") if done.exists() else ""
        lines.append(f"    stage {stage}: {outputs[stage] / name}")
    lines += ["", f"  inference ({inference_dir}, log {steps.logs}):"]
    asked = json.loads((inference_dir / "requests.json").read_text())
    for n, request in enumerate(asked["requests"]):
        reply = inference_dir / f"reply_{n}.txt"
        answer = reply.read_text().strip() if reply.exists() else "(no reply)"
        truth = f"   (the image's caption: {asked['input_caption']!r})" if "<Image>" in request else ""
        lines.append(f"    > {request}\n      {short_signals(answer)!r}{truth}")
    lines += judged_media(asked["requests"], inference_dir)
    if (judged / "judged.md").is_file():
        lines += ["", f"  judged evaluation ({judged / 'judged.md'}): the share of requests whose media show what "
                      "was asked, per attribute; (a) the decoder fed the true caption embedding (the ceiling), "
                      "(b) end to end; held-out = colour x shape combinations no training saw", ""]
        lines += ["    " + row for row in (judged / "judged.md").read_text().splitlines()]
    step_times = ", ".join(f"{name.split(' (')[0]} {seconds:.0f} s" for name, seconds in steps.times.items())
    lines += ["", f"  loss curves: {curves_path}", f"  logs: {steps.logs}",
              f"  time: {time.time() - started:.0f} s for this run" + (f" ({step_times})" if step_times else "")]
    text = "\n".join(lines)
    print(text, flush=True)
    atomic_write_text(runs / "report.txt", text + "\n")
    return 0


def stage1_accuracy(metrics_path: Path) -> dict:
    """{"untrained" | "trained": evaluate.py's metrics (token_acc, heldout_lm, bleu4, ...) + "samples"} from its
    metrics.json (base first, then the stage-1 checkpoint); {} before that step has run."""
    if not metrics_path.is_file():
        return {}
    summary = json.loads(metrics_path.read_text())
    samples = sum(summary.get("requests", {}).values())
    base, trained = summary["checkpoints"][:2]
    return {"untrained": {**base["metrics"], "samples": samples}, "trained": {**trained["metrics"], "samples": samples}}


def every_stage_table(metrics_path: Path) -> list[str]:
    """Report lines for the base-vs-stages evaluation: evaluate.py's table (one row per checkpoint) and the
    signal-token emission rate per requested modality, base -> last checkpoint; [] before that step has run."""
    from nextgpt.eval.report import ORDER, table

    if not metrics_path.is_file():
        return []
    summary = json.loads(metrics_path.read_text())
    runs = summary["checkpoints"]
    requests = ", ".join(f"{kind} {count}" for kind, count in summary.get("requests", {}).items())
    lines = ["", f"  held-out evaluation, base vs stages 1-3 ({metrics_path.with_name('report.md')}; "
                 f"requests: {requests}):", ""]
    lines += ["    " + row for row in table(runs).splitlines()]
    first, last = runs[0], runs[-1]
    rates = [f"{modality} {first['metrics'][key]:.2f} -> {last['metrics'][key]:.2f}"
             for modality in ORDER if isinstance(first["metrics"].get(key := f"emission.{modality}"), (int, float))
             and isinstance(last["metrics"].get(key), (int, float))]
    if rates:
        # emission.text is the share of text-only requests answered with no signal block (1.0 is right)
        lines += ["", f"  signal-token emission rate, {first['name']} -> {last['name']}: {', '.join(rates)}"]
    return lines


def judged_media(requests: list[str], folder: Path) -> list[str]:
    """Report lines: each written medium, what its request asked and what the toy judge sees in it. The n-th request
    for a modality wrote <modality>_<n> (inference.py numbers media per modality)."""
    from tiny import judge

    lines, seen = [], {}
    for request in requests:
        asked = judge.expected(request)
        if asked is None or "<" in request:
            continue
        modality, want = asked
        n = seen[modality] = seen.get(modality, -1) + 1
        path = next(folder.glob(f"{modality}_{n}.*"), None)
        if path is None:
            lines.append(f"    {modality} asked ({', '.join(want.values())}): no file (no signal block in the reply)")
            continue
        got = judge.judge_file(path)
        right = sum(got.get(k) == v for k, v in want.items())
        lines.append(f"    {path.name}: asked {', '.join(want.values())}; the judge sees "
                     f"{', '.join(got[k] for k in want)} ({right}/{len(want)} right)")
    return lines or ["    media written: none (no signal block in the replies)"]


def short_signals(text: str) -> str:
    """"x[VID0][VID1]...[VID23]" -> "x[VID0..23]" for the report (the reply files keep every token)."""
    import re

    return re.sub(r"\[([A-Z]+)0\](?:\[\1\d+\])*\[\1(\d+)\]", r"[\g<1>0..\g<2>]", text)


def first_toy_image(data: Path) -> tuple[Path, str]:
    """(path, caption) of the first record of the toy cc3m.json."""
    pairs = data / "T_X_pair_data" / "cc3m"
    try:
        record = json.loads((pairs / "cc3m.json").read_text())[0]
    except (FileNotFoundError, IndexError, json.JSONDecodeError) as e:
        raise FileNotFoundError(f"{pairs / 'cc3m.json'}: no toy image record ({e}); run the toy data step") from None
    return pairs / "images" / record["image_name"], record["caption"]


if __name__ == "__main__":
    from nextgpt.cli import run as run_cli  # any failure: one `error:` line, the traceback in a log it names

    raise SystemExit(run_cli(main, "demo"))
