"""`make demo`: the whole NExT-GPT pipeline on a CPU in minutes, with tiny models and toy data it builds itself.

    tiny checkpoints -> toy data -> caption embeddings + ImageBind features -> stage 1 -> 2 -> 3 (DeepSpeed, CPU)
    -> inference: a question about a toy image, then requests for an image, a video and a sound

Every step prints its progress and keeps a log in runs/demo/logs/. A finished step leaves a stamp (the same files
the Makefile chains on: ckpt/tiny/.complete, data/toy/.complete, the embedding manifests, each stage's done.json)
and is skipped when the demo runs again; --fresh starts over. At the end it prints a report (per-stage loss and
token accuracy at start and end, stage-1 accuracy of the untrained vs the trained model on the same toy captions,
where every checkpoint and output is) and writes runs/demo/loss_curves.png.

    python scripts/demo.py [--fresh] [--workdir DIR] [--stage1-steps N --stage2-steps N --stage3-steps N]

--workdir DIR builds everything under DIR (DIR/ckpt/tiny, DIR/data/toy, DIR/runs/demo) instead of the repository,
by pointing every tiny-config path there with --set overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))

from nextgpt import config as config_lib  # noqa: E402
from nextgpt.io import atomic_write_text  # noqa: E402

TINY = ROOT / "code" / "config" / "tiny"
CPU_DS_CONFIG = ROOT / "code" / "dsconfig" / "cpu.json"
# Generated folders of the tiny configs (relative to the repository root); --workdir moves them.
GENERATED_PREFIXES = ("ckpt/tiny", "data/toy", "runs/demo")
DEFAULT_STEPS = {1: 150, 2: 100, 3: 150}


class DemoError(RuntimeError):
    """A step failed; the message names the step and its log."""


@dataclass
class Layout:
    work: Path

    @property
    def ckpt(self) -> Path:
        return self.work / "ckpt" / "tiny"

    @property
    def data(self) -> Path:
        return self.work / "data" / "toy"

    @property
    def runs(self) -> Path:
        return self.work / "runs" / "demo"

    def overrides(self, stage: str) -> list[str]:
        """--set strings moving every generated path of code/config/tiny/<stage>.yaml under the workdir."""
        if self.work.resolve() == ROOT.resolve():
            return []
        out: list[str] = []

        def walk(prefix: str, value) -> None:
            if isinstance(value, dict):
                for key, item in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, item)
            elif isinstance(value, str) and any(value == p or value.startswith(p + "/") for p in GENERATED_PREFIXES):
                out.append(f"{prefix}={self.work / value}")

        walk("", config_lib.load(TINY / f"{stage}.yaml").to_dict())
        return out

    def config(self, stage: str, *extra: str):
        return config_lib.load(TINY / f"{stage}.yaml", [*self.overrides(stage), *extra])


# ----------------------------------------------------------------------------------------------------------------
# Running steps

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
# Stage-1 token accuracy of a model on the toy captions (the same captions for the untrained and trained model)

def stage1_accuracy(cfg, checkpoint: Path | None, limit: int = 256) -> dict:
    """Mean LM loss and token accuracy over the first `limit` stage-1 samples, teacher-forced, batch by batch."""
    import torch
    from torch.utils.data import DataLoader

    from nextgpt import checkpoint as checkpoint_lib
    from nextgpt.data import collate, dataset
    from nextgpt.model.nextgpt import build_model

    torch.manual_seed(cfg.train.seed)        # the untrained projector is the one stage 1 starts from
    model = build_model(cfg, device=torch.device("cpu"), dtype=torch.float32)
    if checkpoint is not None:
        checkpoint_lib.load_delta(model, checkpoint_lib.resolve_checkpoint(checkpoint))
    model.eval()
    train_set, eval_set = dataset.build_datasets(cfg, model.tokenizer, model.token_ids, cfg.data.datasets)
    samples = eval_set if eval_set is not None else train_set
    indices = list(range(min(limit, len(samples))))
    loader = DataLoader(torch.utils.data.Subset(samples, indices), batch_size=cfg.train.micro_batch_size,
                        collate_fn=collate.Collator.from_config(cfg, model.token_ids))
    totals = {"lm": 0.0, "token_acc": 0.0}
    batches = 0
    with torch.no_grad():
        for batch in loader:
            out = model(batch)
            for name in totals:
                totals[name] += float(out[name])
            batches += 1
    return {"samples": len(indices), "split": "eval" if eval_set is not None else "train",
            **{k: v / max(batches, 1) for k, v in totals.items()}}


# ----------------------------------------------------------------------------------------------------------------
# Report

def read_metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            if r.get("split") == "train"]


def start_end(records: list[dict], key: str, window: int = 5) -> tuple[float, float] | None:
    """(first step's value, mean of the last `window` steps' values) of a logged scalar, or None."""
    values = [r[key] for r in records if key in r]
    if not values:
        return None
    tail = values[-window:]
    return values[0], sum(tail) / len(tail)


def plot_curves(stages: dict[int, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
    for axis, (stage, records) in zip(axes[0], stages.items()):
        steps = [r["step"] for r in records]
        axis.plot(steps, [r["loss"] for r in records], color="tab:blue", label="loss")
        if records and "lm" in records[0] and any(r["lm"] != r["loss"] for r in records):
            axis.plot(steps, [r["lm"] for r in records], color="tab:cyan", label="lm", linewidth=0.8)
        axis.set_title(f"stage {stage}")
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        accuracy_axis = axis.twinx()
        accuracy_axis.plot(steps, [r.get("token_acc", float("nan")) for r in records], color="tab:orange",
                           label="token acc")
        accuracy_axis.set_ylim(0, 1)
        accuracy_axis.set_ylabel("token accuracy")
        lines = axis.get_legend_handles_labels()
        more = accuracy_axis.get_legend_handles_labels()
        axis.legend(lines[0] + more[0], lines[1] + more[1], loc="center right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo outputs and start over")
    parser.add_argument("--workdir", default=str(ROOT), help="where ckpt/tiny, data/toy, runs/demo go")
    for stage, steps in DEFAULT_STEPS.items():
        parser.add_argument(f"--stage{stage}-steps", type=int, default=steps, help=f"stage-{stage} optimizer steps")
    parser.add_argument("--launcher", choices=["deepspeed", "python"], default="deepspeed",
                        help="train through the deepspeed launcher (default) or a plain python process")
    args = parser.parse_args(argv)
    try:
        return demo(args)
    except (DemoError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def demo(args) -> int:
    started = time.time()
    layout = Layout(Path(args.workdir).resolve())
    python = sys.executable
    if args.fresh:
        for folder in (layout.ckpt, layout.data, layout.runs):
            if folder.exists():
                print(f"--fresh: removing {folder}", flush=True)
                shutil.rmtree(folder)
    layout.runs.mkdir(parents=True, exist_ok=True)
    cfg = {stage: layout.config(f"stage_{stage}") for stage in (1, 2, 3)}
    steps = Steps(11, layout.runs / "logs")

    def tool(script: str, *arguments: str):
        return lambda log: run_command([python, str(ROOT / script), *arguments], log)

    def with_config(stage: str) -> list[str]:
        extra = []
        for text in layout.overrides(stage):
            extra += ["--set", text]
        return ["--config", str(TINY / f"{stage}.yaml"), *extra]

    steps("tiny checkpoints", layout.ckpt / ".complete",
          tool("scripts/make_tiny_ckpt.py", "--out", str(layout.ckpt), "--data", str(layout.data)))
    steps("toy data", layout.data / ".complete", tool("scripts/make_toy_data.py", "--out", str(layout.data)))
    steps("caption embeddings (decoders' text encoders)", cfg[3].path(cfg[3].data.embed_dir) / "manifest.json",
          tool("code/process_embeddings.py", *with_config("stage_3"), "--all"))
    steps("features (ImageBind, stage-1 cache)", cfg[1].path(cfg[1].data.feature_dir) / "manifest.json",
          tool("code/process_embeddings.py", *with_config("stage_1"), "--all", "--features"))

    accuracy_path = layout.runs / "stage1_accuracy.json"
    accuracy = json.loads(accuracy_path.read_text()) if accuracy_path.exists() else {}

    def measure(which: str, checkpoint: Path | None):
        def action(log: Path) -> None:
            result = stage1_accuracy(cfg[1], checkpoint)
            accuracy[which] = result
            atomic_write_text(accuracy_path, json.dumps(accuracy, indent=2) + "\n")
            print(f"  {which}: token accuracy {result['token_acc']:.3f}, LM loss {result['lm']:.3f} "
                  f"on {result['samples']} {result['split']} samples", flush=True)
        return action

    # Stamp = the key in stage1_accuracy.json (an untrained model needs no file of its own)
    steps("untrained stage-1 accuracy", accuracy_path if "untrained" in accuracy else None,
          measure("untrained", None))

    outputs = {stage: cfg[stage].path(cfg[stage].train.output_dir) for stage in (1, 2, 3)}
    for stage in (1, 2, 3):
        command = [str(ROOT / "code" / "train.py"), *with_config(f"stage_{stage}"),
                   "--ds_config", str(CPU_DS_CONFIG), "--max-steps", str(getattr(args, f"stage{stage}_steps"))]
        if args.launcher == "deepspeed":
            command = [python, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
                       "--master_port", str(free_port()), *command]
        else:
            command = [python, *command]
        steps(f"stage {stage} training", outputs[stage] / "done.json",
              lambda log, command=command: run_command(command, log))

    steps("trained stage-1 accuracy", accuracy_path if "trained" in accuracy else None,
          measure("trained", outputs[1]))

    inference_dir = layout.runs / "inference"
    image = first_toy_image(layout.data)
    requests = [f"<Image>{image}</Image> What is the image about?",
                "Can you show me a picture of a red circle on a black background?",
                "Please generate a video of a blue square moving left.",
                "I would like you to make a sound of a high beeping tone."]

    def infer(log: Path) -> None:
        if inference_dir.exists():
            shutil.rmtree(inference_dir)
        run_command([python, str(ROOT / "code" / "inference.py"), *with_config("stage_3"),
                     "--ckpt", str(outputs[3]), "--out", str(inference_dir),
                     "--set", "inference.do_sample=false"], log, stdin_text="\n".join(requests) + "\nexit\n")
        atomic_write_text(inference_dir / "done.json", json.dumps({"requests": requests}, indent=2) + "\n")

    steps("inference (image in; image, video, sound out)", inference_dir / "done.json", infer)

    # -------------------------------------------------------------------------------------------------- report
    metrics = {stage: read_metrics(outputs[stage]) for stage in (1, 2, 3)}
    curves = layout.runs / "loss_curves.png"
    plot_curves(metrics, curves)
    print(f"[demo 11/11] report\n", flush=True)
    report = ["NExT-GPT demo (tiny models, toy data, CPU)", ""]
    for stage in (1, 2, 3):
        loss, acc = start_end(metrics[stage], "loss"), start_end(metrics[stage], "token_acc")
        line = f"  stage {stage}: {len(metrics[stage])} steps"
        if loss:
            line += f", loss {loss[0]:.3f} -> {loss[1]:.3f}"
        if acc:
            line += f", token accuracy {acc[0]:.3f} -> {acc[1]:.3f}"
        report.append(line + " (first step -> mean of the last 5)")
    if "untrained" in accuracy and "trained" in accuracy:
        u, t = accuracy["untrained"], accuracy["trained"]
        report.append(f"  stage-1 token accuracy on the same {t['samples']} toy {t['split']} captions: untrained "
                      f"{u['token_acc']:.3f} -> trained {t['token_acc']:.3f} (LM loss {u['lm']:.3f} -> {t['lm']:.3f})")
    report += ["", "  checkpoints:"]
    for stage in (1, 2, 3):
        done = outputs[stage] / "done.json"
        name = json.loads(done.read_text()).get("checkpoint", "") if done.exists() else ""
        report.append(f"    stage {stage}: {outputs[stage] / name}")
    report += ["", f"  inference outputs ({inference_dir}):"]
    for path in sorted(inference_dir.glob("*")):
        if path.name != "done.json":
            text = f"  \"{path.read_text().strip()}\"" if path.suffix == ".txt" else ""
            report.append(f"    {path.name}{text}")
    report += ["", f"  loss curves: {curves}", f"  logs: {layout.runs / 'logs'}",
               f"  time: {time.time() - started:.0f} s this run"]
    text = "\n".join(report)
    print(text, flush=True)
    atomic_write_text(layout.runs / "report.txt", text + "\n")
    return 0


def first_toy_image(data: Path) -> Path:
    images = sorted((data / "T_X_pair_data" / "cc3m" / "images").glob("*"))
    if not images:
        raise FileNotFoundError(f"{data / 'T_X_pair_data' / 'cc3m' / 'images'}: no toy images (run the toy data step)")
    return images[0]


if __name__ == "__main__":
    raise SystemExit(main())
