"""Fault injection through the real commands: kill -9 and resume, kills while a checkpoint is written, a killed
process_embeddings, and one table of faults (bad inputs, signals, locks, corrupt checkpoints, ...) driving one
runner. Prints pass counts per section and a `by class:` line; `make chaos`.

    python dev/chaos/run.py                      # everything (~25 min on 2 busy CPU cores)
    python dev/chaos/run.py --quick              # fewer kills, the quick subset of the table
    python dev/chaos/run.py --classes signals lock
    python dev/chaos/run.py --cases config_typo wrong_type_set
    python dev/chaos/run.py --list               # the table: class, name, what it breaks

Sections
  resume       kill -9 `code/train.py` (tiny configs, stages 1-3, checkpoint every 2 steps) after a random number
               of logged steps plus a random delay, rerun with `--resume auto`, compare the final trained tensors
               (delta.safetensors, and adapter/ in stage 3) bit for bit with an uninterrupted run of the same config.
  write        kill -9 while checkpoint-4 is being written (its temporary folder exists): `latest` must still name
               checkpoint-2, which must be complete (meta.json hashes, state/ loadable), no checkpoint-4 may
               exist; the resumed run must end bit-identical to the uninterrupted one.
  embeddings   kill -9 `code/process_embeddings.py` (caption embeddings, then ImageBind features) once some items
               are written; the rerun must exit 0 with every item present, a valid .npy of the right shape, equal to
               an uninterrupted run's, no temporary files, and a manifest counting them.
  app          the web demo under load (chaos/app_load.py): concurrent gradio_client sessions mixing text, image
               generation, uploads at / over the size limit, long generations, clients that disconnect mid-reply
  inputs       the fault table (Case rows; run_case runs each in a fresh process): the run must end with a one-line
               `error: ...` naming the problem and a non-zero exit (the row's exit code when it names one), or exit 0
               with a counted skip / the promised recovery; never a traceback or output that looks complete.

Classes of the table (`--list` shows every row)
  data           malformed / incomplete records, unknown dataset, missing or wrong-shaped caption embeddings
  media          missing / corrupt / empty media and checkpoints, undecodable files under data.skip_bad_records
  images         16-bit, RGBA, palette+transparency, CMYK, EXIF-rotated images encode (finite features); a
                 decompression bomb is refused before decoding, or a counted skip
  config         typos, wrong types, dsconfig contradictions, fp16 on CPU, --max-steps 0 (trains nothing, exit 0),
                 train.epochs=0 and negative steps (one line naming the key)
  values         NaN / inf / float16-for-float32 embeddings and features (validate_data.py exit 1); a NaN feature,
                 complex64 / string caption embeddings read by train.py (one line naming file and record, or a
                 counted skip under data.skip_bad_records); non-finite
                 losses (aborted naming the samples, or counted skips)
  cache          a caption edited after the embeddings (stale at training; recomputed by process_embeddings), one
                 media name with two captions, features of another ImageBind checkpoint
  signals        SIGINT / SIGTERM / Ctrl-C twice to train.py; SIGTERM and kill -9 to the `deepspeed` launcher and
                 Ctrl-C / SIGTERM to `python -m nextgpt.launch` (what make runs) with 2 ranks: every rank stops after
                 its step, the checkpoint verifies, nothing runs on; one process resumes bit-identical. Per launcher
                 form (the `deepspeed` command, deepspeed.launcher.runner / .launch, torchrun, nextgpt.launch, none):
                 SIGTERM to the outermost process only (left unreaped 3 s) and SIGINT to the process group, every
                 rank stopped within one step of the signal; a 1-rank run per form resumed bit-identical
  lock           a second run into a live run's folder, a stale lock of a dead process, a lock of another host
  checkpoint     truncated optimizer / rank state, flipped delta byte, deleted model states in the latest checkpoint
                 (falls back to the previous one, said, ends bit-identical), the same named explicitly, none valid
  resume-config  lr / batch changed (refused naming the key and --allow-config-change), steps changed with the flag
                 (recorded in meta.json), 1 -> 2 and 2 -> 1 processes (refused in one line)
  storage        output path is a file, disk full during a save (tmpfs; the previous checkpoint intact), read-only
                 output (bind mount), inference --out a file (reply printed first); mounts need root, else "not run"
  distributed    two "nodes" (scripts/tiny/nodes.py): kill -9 of node 1's rank, of node 1's whole launcher tree, of
                 rank 0, SIGSTOP of a rank: the survivor stops within train.dist_timeout naming the dead rank,
                 `latest` verifies and both nodes resume to the end; node 1 with its own disk at the output folder /
                 the caption-embedding folder: both refuse at start (root)

Everything runs in --workdir (default runs/chaos/): a tiny workspace (tiny checkpoints + toy data, built once by
scripts/tiny/tiny_workspace.py) and hard-linked copies of its data that each case breaks. Exit status: 0 when
every check passed, 1 otherwise; --json writes the per-check results.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from bench.common import REPO, machine_line, print_table, write_json, workspace
from nextgpt.training.stop import proc_stat

PYTHON = sys.executable
TRAIN = str(REPO / "code" / "train.py")
PROCESS = str(REPO / "code" / "process_embeddings.py")
VALIDATE = str(REPO / "code" / "validate_data.py")
INFERENCE = str(REPO / "code" / "inference.py")
TRACEBACK = "Traceback (most recent call last)"
STEPS = 8                  # steps of every training run here
SAVE_EVERY = 2
PAIRS = {"image": ("cc3m", "cc3m_enc"), "video": ("webvid", "webvid_enc"), "audio": ("audiocap", "audiocap_enc")}


@dataclass
class Check:
    section: str
    name: str
    ok: bool
    detail: str
    output: str = ""                    # the tail of what the command printed, for failures
    extra: dict = field(default_factory=dict)
    klass: str = ""                     # the failure class it covers (CLASSES); the section when empty

    @property
    def failure_class(self) -> str:
        return self.klass or self.section


# ----------------------------------------------------------------------------------------------------------------
# Processes

def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RANK", None)              # each child is its own single-process run
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", "1")       # bench_common.set_threads: 2 threads crawl on a busy 2-core machine
    return env


def start(command: list[str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    try:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)
    finally:
        log.close()


def run(command: list[str], log_path: Path, timeout: float = 600) -> tuple[int, str, str]:
    """-> (exit status, stdout, stderr); both streams are also saved to log_path."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=timeout)
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = -1, str(e.stdout or ""), str(e.stderr or "") + f"\n[chaos] timed out after {timeout} s"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(f"$ {' '.join(command)}\n[exit {rc}]\n--- stdout\n{out}\n--- stderr\n{err}")
    return rc, out, err


def kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()


def tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


PROGRESS_BAR = re.compile(r"^\s*\d+%\|.*\|")


def error_line(text: str) -> tuple[str | None, list[str], bool]:
    """(the last `error: ...` line, the non-empty lines printed after it, whether it shares its line with a
    progress bar that was not ended first)."""
    lines = [p.strip() for p in re.split(r"[\r\n]", text) if p.strip()]
    for index in range(len(lines) - 1, -1, -1):
        line = lines[index]
        if line.startswith("error:"):
            return line, lines[index + 1:], False
        if PROGRESS_BAR.match(line) and "error:" in line:
            return line[line.index("error:"):], lines[index + 1:], True
    return None, [], False


def last_line(text: str) -> str:
    """The last non-empty line (tqdm redraws with carriage returns; each redraw counts as a line)."""
    parts = [p.strip() for p in re.split(r"[\r\n]", text) if p.strip()]
    return parts[-1] if parts else ""


# ----------------------------------------------------------------------------------------------------------------
# Training runs and their checkpoints

def train_sets(out: Path, init_from: Path | None) -> list[str]:
    """The --set overrides of every chaos training run into `out`."""
    return [f"train.output_dir={out}", f"train.save_every={SAVE_EVERY}", "train.report_to=[]", "train.log_every=1",
            "train.keep_last=2", f"train.init_from={init_from}" if init_from else "train.init_from="]


def train_command(env, stage: int, out: Path, init_from: Path | None, *extra: str, args: tuple[str, ...] = ()
                  ) -> list[str]:
    return [PYTHON, TRAIN, *env.argv(f"stage_{stage}", *train_sets(out, init_from), *extra), "--max-steps",
            str(STEPS), *args]


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 0
    return sum(1 for line in text.split("\n")[:-1] if '"split": "train"' in line)


def final_checkpoint(out: Path) -> Path:
    name = (out / "latest").read_text().strip()
    return out / name


def trained_tensors(checkpoint: Path) -> dict:
    """Every tensor a delta folder holds: delta.safetensors, plus adapter/*.safetensors (LoRA) when present."""
    from safetensors.torch import load_file

    tensors = dict(load_file(str(checkpoint / "delta.safetensors")))
    for f in sorted((checkpoint / "adapter").glob("*.safetensors")) if (checkpoint / "adapter").is_dir() else []:
        tensors.update({f"adapter/{f.name}/{k}": v for k, v in load_file(str(f)).items()})
    return tensors


def compare(a: dict, b: dict) -> str | None:
    """None when both hold the same names with bit-identical tensors, else what differs."""
    import torch

    if set(a) != set(b):
        return f"different tensor names: {sorted(set(a) ^ set(b))[:4]}"
    differing = []
    for name in sorted(a):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(-1).view(torch.uint8) if x.numel() else x,
                                                                     y.view(-1).view(torch.uint8) if y.numel() else y):
            diff = (x.float() - y.float()).abs().max().item() if x.shape == y.shape else float("nan")
            differing.append(f"{name} (max |diff| {diff:.3g})")
    return None if not differing else f"{len(differing)}/{len(a)} tensors differ: {', '.join(differing[:3])}"


def checkpoint_problems(checkpoint: Path) -> list[str]:
    """What is wrong with a training checkpoint folder (empty: complete and loadable)."""
    import hashlib

    import torch

    problems = []
    meta_path = checkpoint / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        return [f"{meta_path}: {e}"]
    for name, digest in meta.get("files", {}).items():
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"{path}: listed in meta.json, missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            problems.append(f"{path}: sha256 differs from meta.json")
    if "delta.safetensors" not in meta.get("files", {}):
        problems.append(f"{meta_path}: lists no delta.safetensors")
    state = checkpoint / "state"
    for f in [state / "rank_0.pt", *sorted((state / "deepspeed").glob("*.pt"))]:
        try:
            torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:                                 # noqa: BLE001 - any failure means incomplete
            problems.append(f"{f}: does not load ({type(e).__name__}: {str(e)[:80]})")
    if not (state / "deepspeed").is_dir() or not list((state / "deepspeed").glob("*optim_states.pt")):
        problems.append(f"{state / 'deepspeed'}: no optimizer state")
    return problems


class References:
    """Uninterrupted runs of stages 1-3 (stage N+1 initialised from stage N), built on first use."""

    def __init__(self, env, root: Path, log: Callable[[str], None]):
        self.env, self.root, self.log = env, root, log
        self.runs: dict[int, Path] = {}

    def init_from(self, stage: int) -> Path | None:
        return self.run(stage - 1) if stage > 1 else None

    def run(self, stage: int) -> Path:
        if stage in self.runs:
            return self.runs[stage]
        init_from = self.init_from(stage)
        out = self.root / f"reference_stage_{stage}"
        # Rebuilt at every invocation: the code under test (and the thread count) may have changed since.
        shutil.rmtree(out, ignore_errors=True)
        self.log(f"  reference: stage {stage}, {STEPS} steps, uninterrupted")
        rc, out_text, err = run(train_command(self.env, stage, out, init_from), self.root / f"reference_{stage}.log")
        if rc != 0:
            raise RuntimeError(f"the uninterrupted stage-{stage} run failed (exit {rc}): {last_line(err)}; "
                               f"see {self.root / f'reference_{stage}.log'}")
        self.runs[stage] = out
        return out

    def tensors(self, stage: int) -> dict:
        return trained_tensors(final_checkpoint(self.run(stage)))


# ----------------------------------------------------------------------------------------------------------------
# Section: kill -9 at random points, resume, compare

def section_resume(env, root: Path, refs: References, kills: int, rng: random.Random, log) -> list[Check]:
    checks = []
    for trial in range(kills):
        stage = 1 + trial % 3
        reference = refs.tensors(stage)
        out = root / f"resume_{trial}_stage_{stage}"
        command = train_command(env, stage, out, refs.init_from(stage))
        for attempt in range(3):                                 # a kill after the run finished tests nothing
            shutil.rmtree(out, ignore_errors=True)
            kill_after = rng.randint(1, STEPS - 1)                # logged steps before the kill
            delay = rng.uniform(0.0, 0.08)                        # within a step (steps take ~50-150 ms here)
            process = start(command, root / f"resume_{trial}.kill.log")
            while process.poll() is None and logged_steps(out) < kill_after:
                time.sleep(0.002)
            time.sleep(delay)
            finished = process.poll() is not None or (out / "done.json").exists()
            kill(process)
            if not finished:
                break
        latest = (out / "latest").read_text().strip() if (out / "latest").is_file() else "none"
        where = f"stage {stage}: killed after step {logged_steps(out)} (+{delay * 1000:.0f} ms), latest={latest}"
        if finished:
            checks.append(Check("resume", f"kill {trial + 1}", False, f"{where}: the run ended before the kill "
                                f"(exit {process.returncode}) in 3 attempts; nothing was tested",
                                tail((root / f"resume_{trial}.kill.log").read_text())))
            continue
        rc, stdout, stderr = run(command, root / f"resume_{trial}.resume.log")
        if rc != 0:
            checks.append(Check("resume", f"kill {trial + 1}", False, f"{where}: the resumed run exited {rc}",
                                tail(stderr or stdout)))
            continue
        difference = compare(trained_tensors(final_checkpoint(out)), reference)
        resumed_from = re.search(r"resumed from \S+ at step (\d+)", stdout + stderr)
        detail = f"{where}; resumed at step {resumed_from.group(1) if resumed_from else '0 (fresh start)'}"
        checks.append(Check("resume", f"kill {trial + 1}", difference is None,
                            detail + ("; final tensors bit-identical" if difference is None else f"; {difference}"),
                            extra=dict(stage=stage, kill_after=kill_after, delay=delay, latest_at_kill=latest)))
        log(f"  {'ok  ' if difference is None else 'FAIL'} {detail}")
    return checks


# ----------------------------------------------------------------------------------------------------------------
# Section: kill while a checkpoint is being written

def write_phase(written: list[str]) -> str:
    """Which parts of a checkpoint folder were on disk at the kill."""
    parts = [("delta.safetensors", "delta"), ("meta.json", "meta.json"),
             ("state/deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt", "optimizer state"),
             ("state/rank_0.pt", "rank_0.pt")]
    have = [label for name, label in parts if name in written]
    return f"{len(written)} files on disk: {', '.join(have) if have else 'none of delta/meta/state'}"


def temporary_of(out: Path, name: str) -> Path | None:
    """The temporary folder `.<name>.<run id>.tmp` a run writes checkpoint <name> into, None while there is none."""
    try:
        with os.scandir(out) as entries:
            for entry in entries:
                if entry.name.startswith(f".{name}.") and entry.name.endswith(".tmp"):
                    return Path(entry.path)
    except FileNotFoundError:
        pass
    return None


def write_window(env, root: Path, log) -> float:
    """Seconds checkpoint-4's temporary folder exists in an undisturbed stage-1 run (the kill window)."""
    out = root / "write_calibration"
    shutil.rmtree(out, ignore_errors=True)
    target = f"checkpoint-{2 * SAVE_EVERY}"
    process = start(train_command(env, 1, out, None), root / "write_calibration.log")
    while process.poll() is None and temporary_of(out, target) is None:
        time.sleep(0.0005)
    appeared = time.perf_counter()
    while process.poll() is None and temporary_of(out, target) is not None:
        time.sleep(0.0005)
    window = time.perf_counter() - appeared
    kill(process)
    log(f"  a checkpoint write takes {window * 1000:.0f} ms here (temporary folder to rename)")
    return max(window, 0.002)


def section_write(env, root: Path, refs: References, trials: int, rng: random.Random, log) -> list[Check]:
    from nextgpt.checkpoint import resume_checks

    checks = []
    reference = refs.tensors(1)
    previous, target = f"checkpoint-{SAVE_EVERY}", f"checkpoint-{2 * SAVE_EVERY}"
    window = write_window(env, root, log)
    for trial in range(trials):
        out = root / f"write_{trial}"
        result = None
        for attempt in range(4):                                 # the write window is short: retry a missed one
            shutil.rmtree(out, ignore_errors=True)
            delay = rng.uniform(0.0, 0.9 * window) / (attempt + 1)
            command = train_command(env, 1, out, None)
            process = start(command, root / f"write_{trial}.kill.log")
            while process.poll() is None and temporary_of(out, target) is None:
                time.sleep(0.0005)
            time.sleep(delay)
            kill(process)
            temporary = temporary_of(out, target)
            inside = temporary is not None and not (out / target).exists()
            if inside:
                result = (delay, sorted(str(p.relative_to(temporary)) for p in temporary.rglob("*") if p.is_file()))
                break
        if result is None:
            checks.append(Check("write", f"kill in write {trial + 1}", False,
                                f"never killed inside the write of {target} in 4 attempts (nothing tested)"))
            continue
        delay, written = result
        problems = []
        latest = (out / "latest").read_text().strip() if (out / "latest").is_file() else None
        if latest != previous:
            problems.append(f"latest names {latest!r}, expected {previous}")
        if (out / target).exists():
            problems.append(f"{target} exists after a kill inside its write")
        problems += checkpoint_problems(out / previous)
        try:
            chosen = resume_checks.find_resume(out, "auto")
            if chosen is None or chosen.name != previous:
                problems.append(f"resume_checks.find_resume picks {chosen}, expected {previous}")
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"resume_checks.find_resume: {e}")
        rc, stdout, stderr = run(command, root / f"write_{trial}.resume.log")
        if rc != 0:
            problems.append(f"the resumed run exited {rc}: {last_line(stderr)}")
        else:
            difference = compare(trained_tensors(final_checkpoint(out)), reference)
            if difference:
                problems.append(f"after resuming: {difference}")
        detail = (f"killed {delay * 1000:.1f} ms into the {window * 1000:.0f} ms write of {target} "
                  f"({write_phase(written)}); latest={latest}")
        ok = not problems
        checks.append(Check("write", f"kill in write {trial + 1}", ok,
                            detail + ("; previous checkpoint complete and chosen; resumed bit-identical" if ok else
                                      "; " + "; ".join(problems))))
        log(f"  {'ok  ' if ok else 'FAIL'} {checks[-1].detail}")
    return checks


# ----------------------------------------------------------------------------------------------------------------
# Section: kill process_embeddings mid-run

def npy_items(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.npy") if not p.name.startswith("."))


def section_embeddings(env, root: Path, rng: random.Random, log) -> list[Check]:
    import numpy as np

    from nextgpt.data.embeddings import check_npy

    checks = []
    jobs = [("caption embeddings", "stage_3", "embed_dir", [], "--batch-size=2"),
            ("ImageBind features", "stage_1", "feature_dir", ["--features"], "--batch-size=2")]
    for label, stage, key, flags, batch in jobs:
        reference = root / f"embeddings_reference_{key}"
        folder = root / f"embeddings_killed_{key}"
        for path in (reference, folder):
            shutil.rmtree(path, ignore_errors=True)

        def command(target: Path) -> list[str]:
            return [PYTHON, PROCESS, *env.argv(stage, f"data.{key}={target}"), "--all", *flags, batch]

        rc, _, err = run(command(reference), root / f"embeddings_reference_{key}.log")
        if rc != 0:
            checks.append(Check("embeddings", label, False, f"the uninterrupted run exited {rc}", tail(err)))
            continue
        expected = {p.name: np.load(p) for p in npy_items(reference)}
        kill_at = rng.randint(1, max(1, len(expected) // 2))
        process = start(command(folder), root / f"embeddings_killed_{key}.kill.log")
        while process.poll() is None and len(npy_items(folder)) < kill_at:
            time.sleep(0.002)
        finished = process.poll() is not None
        kill(process)
        at_kill = len(npy_items(folder))
        if finished:
            checks.append(Check("embeddings", label, False, f"the run ended before the kill; nothing tested"))
            continue
        rc, stdout, stderr = run(command(folder), root / f"embeddings_killed_{key}.rerun.log")
        problems = []
        if rc != 0:
            problems.append(f"rerun exited {rc}: {last_line(stderr)}")
        found = {p.name: p for p in npy_items(folder)}
        if set(found) != set(expected):
            problems.append(f"{len(found)} items, expected {len(expected)} "
                            f"(missing {sorted(set(expected) - set(found))[:3]})")
        bad = [f"{name}: {why}" for name, p in found.items() if (why := check_npy(p)) is not None]
        # Bit-identical is not expected everywhere: the rerun batches the remaining items differently, and a
        # batched forward may round differently (seen: 6e-8 on ImageBind features); 1e-5 relative is the bar.
        arrays = {name: np.load(p) for name, p in found.items() if name in expected}
        identical = sum(np.array_equal(a, expected[name]) for name, a in arrays.items())
        unequal = [name for name, a in arrays.items() if not np.allclose(a, expected[name], rtol=1e-5, atol=1e-6)]
        leftovers = sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name)
        problems += bad[:3] + ([f"{len(unequal)} items differ from the uninterrupted run: {unequal[:3]}"]
                               if unequal else [])
        problems += [f"temporary files left: {leftovers[:3]}"] if leftovers else []
        manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else None
        counted = (sum(s["count"] for s in manifest["modalities"].values()) if manifest and "modalities" in manifest
                   else manifest.get("count") if manifest else None)
        if counted != len(expected):
            problems.append(f"manifest counts {counted}, {len(expected)} items exist")
        ok = not problems
        checks.append(Check("embeddings", label, ok,
                            f"killed with {at_kill}/{len(expected)} items written; rerun: " +
                            (f"every item present and valid, manifest complete; {identical}/{len(arrays)} "
                             "bit-identical to the uninterrupted run, all within 1e-5" if ok
                             else "; ".join(problems))))
        log(f"  {'ok  ' if ok else 'FAIL'} {label}: {checks[-1].detail}")
    return checks


# ----------------------------------------------------------------------------------------------------------------
# Section: bad inputs through the real commands

@dataclass
class Case:
    """One row of the fault table. The runner (run_case) builds the broken inputs, runs the command (or lets
    `drive` run it: signals, a concurrent run), then checks what every row promises: no traceback, and either a
    one-line `error: ...` naming one of `keywords` with a non-zero exit (`exit_codes` when given), or, for
    `skip` / `succeed` rows, exit 0 (+ a counted skip). `expect_text` must appear anywhere in the output;
    `check(case, env, text)` adds row-specific checks (checkpoint verifies, resumed run bit-identical, ...)."""
    name: str
    problem: str
    # (case folder, env) -> command; creates the broken inputs inside the case folder
    build: Callable[[Path, object], list[str]]
    keywords: tuple[str, ...]            # the error line must contain at least one (case-insensitive)
    skip: bool = False                   # the user asked for skipping: exit 0 + a counted skip
    skip_pattern: str = r"\bskipp(?:ing|ed)\b\D{0,40}\d+|\d+\D{0,40}\bskipped\b"   # "skipping 3 ...", "3 ... skipped"
    quick: bool = False                  # in the --quick subset
    klass: str = ""                      # failure class (CLASSES); set from CASE_CLASS by name when empty
    succeed: bool = False                # the command must work (exit 0), e.g. falling back to a good checkpoint
    exit_codes: tuple[int, ...] = ()     # the exit status expected (empty: any non-zero; 0 for skip / succeed)
    error_line: bool = True              # a failure must end in an `error:` line (validate_data's exit 1: a table)
    expect_text: tuple[str, ...] = ()    # each must appear in the output (case-insensitive)
    fresh_output: bool = True            # <case>/out starts empty: a failed run must not leave checkpoints there
    launcher: bool = False               # run through the deepspeed launcher: its own log lines may follow
    # (command, case folder, log path) -> (exit, stdout, stderr); default: run to completion
    drive: Callable[[list[str], Path, Path], tuple[int, str, str]] | None = None
    check: Callable[[Path, object, str], list[str]] | None = None
    needs: str = ""                      # "root": mounts a small tmpfs / read-only bind (reported, not failed, without)


def data_copy(case: Path, env) -> Path:
    """A hard-linked copy of the workspace data (files are replaced, never edited in place)."""
    target = case / "data"
    if not target.exists():
        shutil.copytree(env.data, target, copy_function=os.link)
    return target


def replace_file(path: Path, content: bytes) -> None:
    path.unlink(missing_ok=True)                       # break the hard link before writing
    path.write_bytes(content)


def data_overrides(data: Path, features: Path | None = None) -> list[str]:
    return [f"data.root={data}", f"data.embed_dir={data / 'embed'}",
            f"data.feature_dir={features if features is not None else data / 'features'}"]


def first_record(data: Path, modality: str) -> dict:
    folder, _ = PAIRS[modality]
    return json.loads((data / "T_X_pair_data" / folder / f"{folder}.json").read_text())[0]


def media_file(data: Path, modality: str) -> Path:
    from nextgpt.modalities import MODALITIES

    m = MODALITIES[modality]
    folder, _ = PAIRS[modality]
    return data / "T_X_pair_data" / folder / m.media_folder / first_record(data, modality)[m.pair_key]


def train_case(stage: int, *overrides: str, args: tuple[str, ...] = (), data_fn=None):
    """A train.py case: data copy (optionally broken by data_fn(data)), output in <case>/out."""
    def build(case: Path, env) -> list[str]:
        data = data_copy(case, env)
        extra = list(data_fn(data, case, env) or []) if data_fn else []
        return [PYTHON, TRAIN, *env.argv(f"stage_{stage}", *data_overrides(data), f"train.output_dir={case / 'out'}",
                                          "train.init_from=", "train.report_to=[]", *overrides, *extra),
                "--max-steps", "2", *args]
    return build


def features_case(modality: str, breaker, *overrides: str):
    """process_embeddings --features on one pair dataset whose first medium breaker(path) broke."""
    def build(case: Path, env) -> list[str]:
        data = data_copy(case, env)
        breaker(media_file(data, modality))
        return [PYTHON, PROCESS, *env.argv("stage_1", *data_overrides(data, case / "features"), *overrides),
                "--all", "--features", "--datasets", PAIRS[modality][1]]
    return build


def missing(path: Path) -> None:
    path.unlink()


def corrupt(path: Path) -> None:
    replace_file(path, b"this is not a media file\x00\xff" * 64)


def empty(path: Path) -> None:
    replace_file(path, b"")


def cases() -> list[Case]:
    from nextgpt.modalities import MODALITIES

    def edit_pairs(modality: str, fn):
        def data_fn(data: Path, case: Path, env):
            folder, _ = PAIRS[modality]
            path = data / "T_X_pair_data" / folder / f"{folder}.json"
            records = json.loads(path.read_text())
            replace_file(path, fn(records, path))
        return data_fn

    def truncate_json(records, path):
        return path.read_bytes()[: len(path.read_bytes()) // 2]

    def drop_caption(records, path):
        del records[1]["caption"]
        return json.dumps(records, indent=2).encode()

    def wrong_shape(data: Path, case: Path, env):
        import numpy as np

        name = first_record(data, "image")["image_name"]
        buffer = case / "wrong.npy"
        np.save(buffer, np.zeros((77, 7), np.float32))
        replace_file(data / "embed" / f"{name}.npy", buffer.read_bytes())

    def nan_embedding(data: Path, case: Path, env):
        import numpy as np

        from nextgpt.io import atomic_save_npy

        for record in json.loads((data / "T_X_pair_data" / "cc3m" / "cc3m.json").read_text())[:8]:
            target = data / "embed" / f"{record['image_name']}.npy"
            array = np.load(target)
            target.unlink()
            atomic_save_npy(target, np.full_like(array, np.nan))

    def delete_embedding(data: Path, case: Path, env):
        (data / "embed" / f"{first_record(data, 'image')['image_name']}.npy").unlink()

    def llm_without_weights(data: Path, case: Path, env):
        llm = case / "vicuna"
        shutil.copytree(env.ckpt / "vicuna", llm, copy_function=os.link)
        for f in llm.glob("*.safetensors"):
            f.unlink()
        return [f"model.llm={llm}"]

    def bad_ds_config(case: Path) -> Path:
        config = json.loads((REPO / "code" / "dsconfig" / "cpu.json").read_text())
        config["train_batch_size"] = 7
        path = case / "batch_mismatch.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def yaml_typo(case: Path) -> Path:
        path = case / "typo.yaml"
        base = REPO / "code" / "config" / "tiny" / "stage_1.yaml"
        path.write_text(f"base: {base}\ntrain:\n  learning_rate: 1.0e-4\n")
        return path

    def with_file(make, stage: int, flag: str):
        def build(case: Path, env) -> list[str]:
            command = train_case(stage)(case, env)
            if flag == "--config":
                command[command.index("--config") + 1] = str(make(case))
            else:
                command += [flag, str(make(case))]
            return command
        return build

    def corrupt_pth(content: Callable[[bytes], bytes]):
        def build(case: Path, env) -> list[str]:
            data = data_copy(case, env)
            pth = case / "imagebind_tiny.pth"
            pth.write_bytes(content(env.imagebind.read_bytes()))
            return [PYTHON, PROCESS, *env.argv("stage_1", *data_overrides(data, case / "features"),
                                               f"model.imagebind={pth}"),
                    "--all", "--features", "--datasets", "cc3m_enc"]
        return build

    def missing_pth(case: Path, env) -> list[str]:
        data = data_copy(case, env)
        return [PYTHON, PROCESS, *env.argv("stage_1", *data_overrides(data, case / "features"),
                                           f"model.imagebind={case / 'nowhere' / 'imagebind_huge.pth'}"),
                "--all", "--features", "--datasets", "cc3m_enc"]

    def live_missing_pth(case: Path, env) -> list[str]:
        data = data_copy(case, env)
        return [PYTHON, TRAIN, *env.argv("stage_1", *data_overrides(data, case / "no_features"),
                                         f"model.imagebind={case / 'nowhere' / 'imagebind_huge.pth'}",
                                         f"train.output_dir={case / 'out'}", "train.report_to=[]"),
                "--max-steps", "2"]

    def live_corrupt_image(case: Path, env) -> list[str]:
        data = data_copy(case, env)
        images = media_file(data, "image").parent
        for image in sorted(images.iterdir()):                # every image: the first batch must meet one
            corrupt(image)
        return [PYTHON, TRAIN, *env.argv("stage_1", *data_overrides(data, case / "no_features"),
                                         f"train.output_dir={case / 'out'}", "train.report_to=[]",
                                         "data.datasets=[cc3m_enc]"),
                "--max-steps", "2"]

    def live_corrupt_some_images(case: Path, env) -> list[str]:
        data = data_copy(case, env)
        images = media_file(data, "image").parent
        for image in sorted(images.iterdir())[:3]:            # present, not decodable; the rest are fine
            corrupt(image)
        return [PYTHON, TRAIN, *env.argv("stage_1", *data_overrides(data, case / "no_features"),
                                         f"train.output_dir={case / 'out'}", "train.report_to=[]",
                                         "data.datasets=[cc3m_enc]", "data.skip_bad_records=true"),
                "--max-steps", "2"]

    def corrupt_init_from(case: Path, env) -> list[str]:
        data = data_copy(case, env)
        delta = case / "stage_1_delta"
        delta.mkdir(parents=True, exist_ok=True)
        (delta / "delta.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"bad\": json" + b"\0" * 64)
        (delta / "meta.json").write_text("{}")
        return [PYTHON, TRAIN, *env.argv("stage_2", *data_overrides(data), f"train.output_dir={case / 'out'}",
                                         f"train.init_from={delta}", "train.report_to=[]"), "--max-steps", "2"]

    def inference_missing(case: Path, env) -> list[str]:
        return [PYTHON, INFERENCE, *env.argv("stage_3", f"inference.out_dir={case / 'out'}"),
                "--ckpt", str(case / "nowhere" / "stage_3"), "--prompt", "draw a red circle"]

    def resume_bogus(case: Path, env) -> list[str]:
        (case / "not_a_checkpoint").mkdir(parents=True, exist_ok=True)
        return train_case(1, args=("--resume", str(case / "not_a_checkpoint")))(case, env)

    table = [
        Case("missing_llm_weights", "LLM folder without its weights file", train_case(1, data_fn=llm_without_weights),
             ("vicuna", "safetensors", "weights", "model")),
        Case("missing_imagebind", "ImageBind .pth missing (process_embeddings --features)", missing_pth,
             ("imagebind_huge.pth",), quick=True),
        Case("missing_imagebind_live", "ImageBind .pth missing, stage 1 without a feature cache (train.py)",
             live_missing_pth, ("imagebind_huge.pth",)),
        Case("corrupt_pth", "ImageBind .pth of random bytes", corrupt_pth(lambda b: os.urandom(4096)),
             ("imagebind_tiny.pth",), quick=True),
        Case("truncated_pth", "ImageBind .pth cut in half", corrupt_pth(lambda b: b[: len(b) // 2]),
             ("imagebind_tiny.pth",)),
        Case("corrupt_init_from", "init_from delta.safetensors corrupt (train.py stage 2)", corrupt_init_from,
             ("delta.safetensors",)),
        Case("inference_missing_ckpt", "inference.py --ckpt pointing nowhere", inference_missing, ("nowhere",)),
        Case("resume_not_checkpoint", "--resume naming a folder that is no checkpoint", resume_bogus,
             ("not_a_checkpoint",)),
    ]
    for modality, breakers in (("image", (missing, corrupt, empty)), ("audio", (missing, corrupt, empty)),
                               ("video", (missing, corrupt, empty))):
        ext = MODALITIES[modality].extensions[0].lstrip(".")
        for breaker in breakers:
            kind = breaker.__name__
            table.append(Case(f"{kind}_{ext}", f"{kind} .{ext} (process_embeddings --features)",
                              features_case(modality, breaker), (f".{ext}",),
                              quick=(modality == "image" and kind != "missing"), klass="media"))
        table.append(Case(f"skip_missing_{ext}", f"missing .{ext} with data.skip_bad_records=true: counted skip",
                          features_case(modality, missing, "data.skip_bad_records=true"), (), skip=True,
                          quick=modality == "audio", klass="media"))
    table += [
        Case("corrupt_jpg_live", "corrupt .jpg files, stage 1 without a feature cache (train.py)", live_corrupt_image,
             (".jpg",)),
        Case("skip_corrupt_jpg_live", "corrupt .jpg files, stage 1 live encoding, data.skip_bad_records=true: "
             "counted skip", live_corrupt_some_images, (), skip=True, klass="media"),
        Case("malformed_json", "pair JSON cut in half (train.py stage 1)",
             train_case(1, data_fn=edit_pairs("image", truncate_json)), ("cc3m.json",), quick=True),
        Case("missing_field", "record without its caption (train.py stage 1)",
             train_case(1, data_fn=edit_pairs("image", drop_caption)), ("caption",), quick=True),
        Case("skip_missing_field", "record without its caption, data.skip_bad_records=true: counted skip",
             train_case(1, "data.skip_bad_records=true", data_fn=edit_pairs("image", drop_caption)), (), skip=True),
        Case("unknown_dataset", "data.datasets names an unknown dataset",
             train_case(1, "data.datasets=[cc3m_enc,nope]"), ("nope",), quick=True),
        Case("wrong_shape_embedding", "caption embedding (77, 7) where the decoder needs (77, 32) (stage 2)",
             train_case(2, data_fn=wrong_shape), (".jpg.npy", "shape")),
        Case("missing_embedding", "caption embedding file missing (stage 2)", train_case(2, data_fn=delete_embedding),
             (".jpg.npy",)),
        Case("config_typo", "--set train.lrr=1e-4", train_case(1, "train.lrr=1e-4"), ("lrr",), quick=True),
        Case("config_file_typo", "YAML with an unknown key (train.learning_rate)", with_file(yaml_typo, 1, "--config"),
             ("learning_rate",)),
        Case("wrong_type_set", "--set train.micro_batch_size=four", train_case(1, "train.micro_batch_size=four"),
             ("micro_batch_size",), quick=True),
        Case("ds_batch_mismatch", "dsconfig train_batch_size 7 vs YAML 4 x 1 x 1",
             with_file(bad_ds_config, 1, "--ds_config"), ("train_batch_size",), quick=True),
        Case("fp16_on_cpu", "code/dsconfig/fp16.json on a CPU",
             train_case(1, args=("--ds_config", str(REPO / "code" / "dsconfig" / "fp16.json"))), ("fp16",),
             quick=True),
        Case("no_room_for_signal_tokens", "model.max_length=12: no signal block fits (stage 2)",
             train_case(2, "model.max_length=12"), ("max_length",), quick=True),
        Case("non_finite_loss", "NaN caption embeddings, train.max_bad_steps=0 (stage 2)",
             train_case(2, "train.max_bad_steps=0", "data.datasets=[cc3m_dec]", data_fn=nan_embedding),
             ("non-finite",), quick=True),
        Case("skip_non_finite_loss", "NaN caption embeddings, train.max_bad_steps=100: counted skips (stage 2)",
             train_case(2, "train.max_bad_steps=100", "data.datasets=[cc3m_dec]", data_fn=nan_embedding), (),
             skip=True, skip_pattern=r"(\d+) skipped micro-batches"),
    ]
    return table + scenario_cases() + distributed_cases()


# ----------------------------------------------------------------------------------------------------------------
# Failure classes beyond bad inputs: signals, the run lock, corrupt checkpoints, resuming with another config or
# process count, storage, zero steps, values, image modes. Same table, same runner (run_case); `drive` runs what
# needs more than one process or a signal, `check` verifies what must survive.

CLASSES = ("resume", "write", "embeddings", "data", "media", "images", "config", "values", "cache", "signals",
           "lock", "checkpoint", "resume-config", "storage", "distributed")
CASE_CLASS = {  # the class of each bad-input row of cases() (rows of scenario_cases() name their own)
    **{n: "media" for n in ("missing_imagebind", "missing_imagebind_live", "corrupt_pth", "truncated_pth",
                            "corrupt_jpg_live", "missing_llm_weights")},
    **{n: "data" for n in ("malformed_json", "missing_field", "skip_missing_field", "unknown_dataset",
                           "wrong_shape_embedding", "missing_embedding", "no_room_for_signal_tokens")},
    **{n: "config" for n in ("config_typo", "config_file_typo", "wrong_type_set", "ds_batch_mismatch",
                             "fp16_on_cpu")},
    **{n: "checkpoint" for n in ("corrupt_init_from", "inference_missing_ckpt", "resume_not_checkpoint")},
    **{n: "values" for n in ("non_finite_loss", "skip_non_finite_loss")},
}
REFS: "References | None" = None  # set by main: the uninterrupted runs the recovery cases must end equal to
LONG_STEPS = 400                   # a run that is still training when the signal / second run comes


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = proc_stat(pid)  # a zombie (exited, not yet reaped) counts as gone
    return stat is not None and stat[1][0] != "Z"


def processes_using(path: Path) -> list[int]:
    """PIDs whose command line mentions `path` (the ranks of a run writing there)."""
    found, needle = [], str(path).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "cmdline").read_bytes() and process_alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


LAUNCHERS = ("deepspeed", "runner", "launch", "torchrun", "nextgpt", "none")


def launcher_command(env, stage: int, out: Path, *overrides: str, steps: int = LONG_STEPS, wrapper: bool = False,
                     form: str = "runner", ranks: int = 2, sets: list[str] | None = None) -> list[str]:
    """`ranks` CPU ranks of train.py through one launcher `form`: "deepspeed" (the console script, the seed's
    `deepspeed --num_gpus N code/train.py`), "runner" (`python -m deepspeed.launcher.runner`), "launch"
    (`python -m deepspeed.launcher.launch`, what the runner starts), "torchrun" (`python -m torch.distributed.run`),
    "nextgpt" (`python -m nextgpt.launch`, what `make stageN NUM_GPUS=N` runs; also wrapper=True) or "none" (plain
    `python code/train.py`, one process). `sets` replaces the default overrides (a resumable command passes
    train_command's, so the plain one-process command continues the run)."""
    import base64
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    if sets is None:
        sets = [f"train.output_dir={out}", "train.init_from=", "train.report_to=[]", "train.log_every=1",
                f"train.save_every={SAVE_EVERY}", "data.datasets=[cc3m_enc]", "train.micro_batch_size=2"]
    script = [TRAIN, *env.argv(f"stage_{stage}", *sets, *overrides), "--max-steps", str(steps)]
    form = "nextgpt" if wrapper else form
    if form == "none":
        return [PYTHON, *script]
    if form == "torchrun":
        return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", port, *script]
    if form == "launch":
        world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(ranks))}).encode()).decode()
        return [PYTHON, "-m", "deepspeed.launcher.launch", f"--world_info={world}", "--master_addr=127.0.0.1",
                f"--master_port={port}", *script]
    head = {"deepspeed": [str(Path(PYTHON).parent / "deepspeed")], "runner": [PYTHON, "-m", "deepspeed.launcher.runner"],
            "nextgpt": [PYTHON, "-m", "nextgpt.launch"]}[form]
    return [*head, "--num_gpus", str(ranks), "--master_port", port, *script]


def launcher_env() -> dict[str, str]:
    env = child_env()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def drive_signal(signals: tuple[int, ...], after_steps: int, group: bool = False, settle: float = 120.0,
                 gap: float = 0.3, reap_after: float = 0.0):
    """Start the command, wait for `after_steps` logged steps, send `signals` (to the process, or its whole
    process group as a terminal's Ctrl-C does), wait for it and every process of the run to end. reap_after:
    seconds the killed outer process is left unreaped (a zombie), as a supervisor that signals, then sleeps before
    wait() leaves it. The output gains "[chaos] signal after step N" (the step logged when it was sent)."""
    def drive(command: list[str], case: Path, log_path: Path) -> tuple[int, str, str]:
        out = case / "out"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                       env=launcher_env(), start_new_session=True)
        deadline = time.time() + 600
        while process.poll() is None and logged_steps(out) < after_steps and time.time() < deadline:
            time.sleep(0.005)
        sent = process.poll() is None
        at_step = logged_steps(out)
        for index, signum in enumerate(signals):
            if index:
                time.sleep(gap)
            if process.poll() is None:
                (os.killpg if group else os.kill)(process.pid, signum)
        time.sleep(reap_after)
        try:
            rc = process.wait(timeout=settle)
        except subprocess.TimeoutExpired:
            rc = -999
        leftover = []
        for _ in range(int(settle * 10)):       # ranks outliving the launcher: give them time to stop by themselves
            leftover = processes_using(out)
            if not leftover:
                break
            time.sleep(0.1)
        text = log_path.read_text() + f"\n[chaos] signal after step {at_step}"
        if not sent:
            text += f"\n[chaos] the run ended before the signal (exit {process.returncode}); nothing was tested"
            rc = -998
        if leftover:
            text += f"\n[chaos] still running {settle:.0f} s after the signal: pids {leftover}"
            for pid in leftover:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            rc = -997
        if rc == -999:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            text += f"\n[chaos] did not exit within {settle:.0f} s of the signal"
        return rc, "", text
    return drive


def stopped_within(steps: int, then=None):
    """Check: the run stopped at most `steps` after the step logged when the signal was sent (the step in flight
    and one for the monitor's 5 ms poll), then `then`'s checks."""
    def check(case: Path, env, text: str) -> list[str]:
        sent = re.search(r"\[chaos\] signal after step (\d+)", text)
        stopped = re.findall(r"interrupted at step (\d+)", text)
        if not sent or not stopped:
            return [f"no {'signal step' if not sent else 'interrupted at step N'} in the output"]
        late = max(int(n) for n in stopped) - int(sent.group(1))
        if late > steps:
            return [f"stopped at step {max(stopped)}, {late} steps after the signal (step {sent.group(1)}); "
                    f"at most {steps} allowed"]
        return then(case, env, text) if then is not None else []
    return check


def drive_second_run(command: list[str], case: Path, log_path: Path) -> tuple[int, str, str]:
    """A first run trains into <case>/out; while it does, the same command runs again: the second must be refused
    (its output is what the row checks) and the first must go on undisturbed until it is stopped."""
    first = start(command[:-1] + [str(LONG_STEPS)], case / "first.log")
    deadline = time.time() + 300
    while first.poll() is None and logged_steps(case / "out") < 1 and time.time() < deadline:
        time.sleep(0.05)
    try:
        rc, out, err = run(command, log_path, timeout=300)
        if first.poll() is not None:
            err += f"\n[chaos] the first run ended (exit {first.returncode}) while the second ran"
            rc = -996 if rc != 0 else rc
    finally:
        if first.poll() is None:        # stopped as a user would (SIGTERM: it saves and exits; no partial files)
            first.send_signal(signal.SIGTERM)
            try:
                first.wait(timeout=120)
            except subprocess.TimeoutExpired:
                kill(first)
    return rc, out, err


MOUNTS: dict[Path, list[Path]] = {}


def mount(case: Path, target: Path, *options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *options, str(target)], check=True, capture_output=True)
    MOUNTS.setdefault(case, []).append(target)


def unmount_all(case: Path) -> None:
    for target in reversed(MOUNTS.pop(case, [])):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def checkpoint_size(folder: Path) -> int:
    """Bytes a checkpoint folder takes on a file system of 4 kB pages (tmpfs)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 + 4096 * p.is_dir() for p in folder.rglob("*")) + 4096


def reference_copy(case: Path, stage: int = 1) -> Path:
    """<case>/out: a copy of the uninterrupted stage-N run (checkpoint-6 and -8, latest = 8) minus done.json, as
    if it had been stopped right after its last save."""
    out = case / "out"
    shutil.copytree(REFS.run(stage), out)
    (out / "done.json").unlink(missing_ok=True)
    return out


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.unlink()                       # never edit a file in place (it may be a hard link)
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])


def ends_like_reference(stage: int = 1):
    """Check: the run in <case>/out ended bit-identical to the uninterrupted reference."""
    def check(case: Path, env, text: str) -> list[str]:
        difference = compare(trained_tensors(final_checkpoint(case / "out")), REFS.tensors(stage))
        return [f"final tensors differ from the uninterrupted run: {difference}"] if difference else []
    return check


def interrupted_then_resumed(stage: int = 1, ranks: int = 1, resume_to_end: bool = True):
    """Check after a signal: no done.json, `latest` names the step the message names and verifies (every rank's
    state), no process of the run left, no temporary folder; then the same command finishes the run and (one
    process) ends bit-identical to the uninterrupted one."""
    def check(case: Path, env, text: str) -> list[str]:
        from nextgpt.checkpoint import resume_checks

        out = case / "out"
        problems = []
        if (out / "done.json").exists():
            problems.append("done.json written by an interrupted run")
        stopped = re.search(r"interrupted at step (\d+) \(([^;]*); saved (checkpoint-\d+)\)", text)
        latest = (out / "latest").read_text().strip() if (out / "latest").is_file() else None
        if stopped:
            if latest != stopped.group(3):
                problems.append(f"message says {stopped.group(3)} was saved, latest names {latest}")
        if latest is None:
            problems.append("no checkpoint to resume from")
            return problems
        problems += resume_checks.verify(out / latest)
        if resume_checks.world_size_of(out / latest) != ranks:
            problems.append(f"{latest} holds {resume_checks.world_size_of(out / latest)} rank states, expected {ranks}")
        if problems or not resume_to_end:
            return problems
        rc, stdout, stderr = run(train_command(env, stage, out, None), case / "resumed.log")
        if rc != 0:
            return [f"the resumed run exited {rc}: {last_line(stderr)}"]
        return ends_like_reference(stage)(case, env, text)
    return check


def launcher_cases(two_rank_check) -> list[Case]:
    """Every launcher form (LAUNCHERS) x {SIGTERM to the outermost process only, left unreaped 3 s; SIGINT to the
    process group}: every rank stops within one step of the signal, the checkpoint verifies for every rank, no
    process runs on; and per form a one-rank run stopped by SIGTERM to its outermost process that the plain
    one-process command resumes to the end bit-identical to the uninterrupted run."""
    found = []
    for form in LAUNCHERS:
        ranks = 1 if form == "none" else 2
        codes = {signal.SIGTERM: (143,), signal.SIGINT: (130,)} if form == "none" else {}
        own = (lambda case, env, form=form, ranks=ranks: launcher_command(env, 1, case / "out", form=form, ranks=ranks))
        after = interrupted_then_resumed(resume_to_end=False) if ranks == 1 else two_rank_check
        found += [
            Case(f"sigterm_outer_{form}", f"SIGTERM to the outermost process of `{form}` ({ranks} rank(s)), left "
                 "unreaped 3 s: every rank stops within one step and saves", own, ("interrupted at step",),
                 klass="signals", launcher=True, fresh_output=False, exit_codes=codes.get(signal.SIGTERM, ()),
                 drive=drive_signal((signal.SIGTERM,), 3, reap_after=3.0), check=stopped_within(2, after),
                 quick=form == "deepspeed"),
            Case(f"sigint_group_{form}", f"Ctrl-C (SIGINT to the process group) of `{form}` ({ranks} rank(s)): every "
                 "rank stops within one step and saves", own, ("interrupted at step",), klass="signals",
                 launcher=True, fresh_output=False, exit_codes=codes.get(signal.SIGINT, ()),
                 drive=drive_signal((signal.SIGINT,), 3, group=True), check=stopped_within(2, after)),
            Case(f"resume_after_{form}", f"SIGTERM to the outermost process of `{form}` (1 rank); the plain command "
                 "resumes bit-identical", lambda case, env, form=form: launcher_command(
                     env, 1, case / "out", form=form, ranks=1, steps=STEPS, sets=train_sets(case / "out", None)),
                 ("interrupted at step",), klass="signals", launcher=True, fresh_output=False,
                 drive=drive_signal((signal.SIGTERM,), 2, reap_after=1.0),
                 check=stopped_within(2, interrupted_then_resumed())),
        ]
    return found


def scenario_cases() -> list[Case]:
    import numpy as np

    from nextgpt.store import modality_of_name

    def train(stage: int = 1, *overrides: str, args: tuple[str, ...] = (), out_fn=None, steps: int = STEPS):
        """train.py on the workspace data; out_fn(case) may prepare <case>/out first (a copied run)."""
        def build(case: Path, env) -> list[str]:
            out = out_fn(case) if out_fn else case / "out"
            command = train_command(env, stage, out, None, *overrides, args=args)
            command[command.index("--max-steps") + 1] = str(steps)
            return command
        return build

    def validate(stage: str, fn):
        def build(case: Path, env) -> list[str]:
            data = data_copy(case, env)
            fn(data)
            return [PYTHON, VALIDATE, *env.argv(stage, *data_overrides(data))]
        return build

    def replace_npy(folder: Path, name: str, make) -> None:
        target = folder / f"{name}.npy"
        array = np.load(target)
        target.unlink()
        np.save(target, make(array))

    def nan(array):
        return np.full_like(array, np.nan)

    def break_all(folder: str, make, modality: str = "image"):
        """data_fn: every <data>/<folder> item of `modality` replaced by make(item) (the first batch meets one)."""
        def data_fn(data: Path, case: Path, env) -> None:
            for path in sorted((data / folder).glob("*.npy")):
                if modality_of_name(path.name[:-4]) == modality:
                    replace_npy(data / folder, path.name[:-4], make)
        return data_fn

    def first_name(data: Path, modality: str = "image") -> str:
        return first_record(data, modality)[f"{modality}_name"]

    def with_lock(record):
        def out_fn(case: Path) -> Path:
            out = case / "out"
            out.mkdir(parents=True)
            (out / ".run.lock").write_text(json.dumps(record(case)))
            return out
        return out_fn

    def dead_pid(case: Path) -> dict:
        import socket

        child = subprocess.Popen([PYTHON, "-c", "pass"])
        child.wait()
        return {"pid": child.pid, "host": socket.gethostname(), "start_time": 1, "run_id": "crashed"}

    def corrupt_latest(*damages: tuple[str, str]):
        def out_fn(case: Path) -> Path:
            out = reference_copy(case)
            for relative, how in damages:
                for path in sorted(out.glob(relative)):
                    if how == "delete":
                        path.unlink()
                    else:
                        damage(path, how)
            return out
        return out_fn

    def two_rank_checkpoint(case: Path, env) -> list[str]:
        """A real 2-process checkpoint (2 steps), then the one-process command that must refuse it."""
        out = case / "out"
        rc, _, err = run(launcher_command(env, 1, out, steps=2), case / "two_ranks.log", timeout=600)
        if rc != 0:
            raise RuntimeError(f"the 2-process run exited {rc}: {last_line(err)}")
        (out / "done.json").unlink()
        command = train_command(env, 1, out, None, "data.datasets=[cc3m_enc]", "train.micro_batch_size=2")
        command[command.index("--max-steps") + 1] = "4"
        return command

    def one_to_two(case: Path, env) -> list[str]:
        reference_copy(case)
        return launcher_command(env, 1, case / "out", steps=STEPS)

    def disk_full(case: Path, env) -> list[str]:
        out = case / "out"
        size = checkpoint_size(final_checkpoint(REFS.run(1)))
        # Room for the logs and two checkpoints, not three: with keep_last 2 the third save (step 6) runs out.
        mount(case, out, "-t", "tmpfs", "-o", f"size={int(2.5 * size) + 64 * 1024}", "tmpfs")
        return train_command(env, 1, out, None)

    def read_only(case: Path, env) -> list[str]:
        source, out = case / "source", case / "out"
        source.mkdir()
        mount(case, out, "--bind", str(source))
        mount(case, out, "-o", "remount,bind,ro")
        return train_command(env, 1, out, None)

    def output_is_file(case: Path, env) -> list[str]:
        (case / "a_file").write_text("not a folder\n")
        return [PYTHON, TRAIN, *env.argv("stage_1", f"train.output_dir={case / 'a_file'}", "train.init_from=",
                                         "train.report_to=[]"), "--max-steps", "2"]

    def inference_out_is_file(case: Path, env) -> list[str]:
        (case / "a_file").write_text("not a folder\n")
        checkpoint = final_checkpoint(REFS.run(3))
        return [PYTHON, INFERENCE, *env.argv("stage_3"), "--ckpt", str(checkpoint), "--prompt",
                "describe a red circle", "--out", str(case / "a_file")]

    def latest_intact(name: str):
        def check(case: Path, env, text: str) -> list[str]:
            from nextgpt.checkpoint import resume_checks

            out = case / "out"
            latest = (out / "latest").read_text().strip() if (out / "latest").is_file() else None
            if latest != name:
                return [f"latest names {latest}, expected {name}"]
            leftovers = [p.name for p in out.glob(".checkpoint-*")]
            return resume_checks.verify(out / name) + ([f"partial checkpoint left: {leftovers}"] if leftovers else [])
        return check

    def config_change_recorded(case: Path, env, text: str) -> list[str]:
        meta = json.loads((final_checkpoint(case / "out") / "meta.json").read_text())
        changes = [c for entry in meta.get("config_changes", []) for c in entry["changes"]]
        return [] if any("train.max_steps: 8 -> 10" in c for c in changes) else \
            [f"meta.json config_changes {meta.get('config_changes')} lacks train.max_steps: 8 -> 10"]

    def no_outputs(case: Path, env, text: str) -> list[str]:
        out = case / "out"
        found = [p.name for p in out.iterdir() if p.name.startswith("checkpoint-") or p.name in ("done.json",
                                                                                                   "latest")]
        return [f"--max-steps 0 wrote {found}"] if found else []

    def features_finite(case: Path, env, text: str) -> list[str]:
        data = case / "data"
        name = first_name(data)
        path = case / "features" / f"{name}.npy"
        if not path.is_file():
            return [f"{path}: no feature written"]
        array = np.load(path)
        return [] if np.isfinite(array).all() else [f"{path}: non-finite feature"]

    def image_as(make):
        """process_embeddings --features with the first cc3m image replaced by make(original PIL image)."""
        def build(case: Path, env) -> list[str]:
            from PIL import Image

            data = data_copy(case, env)
            path = media_file(data, "image")
            with Image.open(path) as original:
                picture = original.convert("RGB")
            path.unlink()
            image, options = make(picture)
            image.save(path, **options)
            return [PYTHON, PROCESS, *env.argv("stage_1", *data_overrides(data, case / "features")), "--all",
                    "--features", "--datasets", "cc3m_enc"]
        return build

    def gray16(picture):
        from PIL import Image

        values = np.asarray(picture.convert("L"), dtype=np.uint16) * 257
        return Image.fromarray(values), {"format": "PNG"}

    def rgba(picture):
        image = picture.convert("RGBA")
        image.putalpha(128)
        return image, {"format": "PNG"}

    def palette_alpha(picture):
        image = picture.convert("P", palette=1, colors=16)
        image.info["transparency"] = 0
        return image, {"format": "PNG", "transparency": 0}

    def cmyk(picture):
        return picture.convert("CMYK"), {"format": "JPEG"}

    def exif_rotated(picture):
        from PIL import Image

        exif = Image.Exif()
        exif[0x0112] = 6
        return picture, {"format": "JPEG", "exif": exif}

    def bomb(case: Path, env, *overrides: str) -> list[str]:
        import struct
        import zlib

        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        data = data_copy(case, env)
        path = media_file(data, "image")
        path.unlink()
        header = struct.pack(">IIBBBBB", 10000, 6000, 8, 2, 0, 0, 0)   # 60 M pixels promised, 1 kB of data
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 999))
                         + chunk(b"IEND", b""))
        return [PYTHON, PROCESS, *env.argv("stage_1", *data_overrides(data, case / "features"), *overrides), "--all",
                "--features", "--datasets", "cc3m_enc"]

    def edit_first_caption(data: Path, case: Path, env) -> None:
        path = data / "T_X_pair_data" / "cc3m" / "cc3m.json"
        records = json.loads(path.read_text())
        records[0]["caption"] = "an edited caption: " + records[0]["caption"]
        replace_file(path, json.dumps(records, indent=2).encode())

    def duplicate_name(data: Path, case: Path, env) -> None:
        path = data / "T_X_pair_data" / "cc3m" / "cc3m.json"
        records = json.loads(path.read_text())
        records.append({**records[0], "caption": "a different caption for the same image"})
        replace_file(path, json.dumps(records, indent=2).encode())

    def other_imagebind(data: Path, case: Path, env) -> None:
        manifest = data / "features" / "manifest.json"
        record = json.loads(manifest.read_text())
        for section in record.get("modalities", {}).values():
            section["fingerprint"] = "another-imagebind-checkpoint"
        replace_file(manifest, json.dumps(record, indent=2).encode())

    def reembedded(case: Path, env) -> list[str]:
        data = data_copy(case, env)
        edit_first_caption(data, case, env)
        (data / "embed").rename(case / "embed_linked")        # the store is rewritten: make it a real copy
        shutil.copytree(case / "embed_linked", data / "embed")
        return [PYTHON, PROCESS, *env.argv("stage_2", *data_overrides(data)), "--all", "--datasets", "cc3m_dec"]

    def fresh_again(case: Path, env, text: str) -> list[str]:
        """validate_data.py (which checks every caption embedding against its record's caption) now passes."""
        data = case / "data"
        rc, stdout, stderr = run([PYTHON, VALIDATE, *env.argv("stage_2", *data_overrides(data)), "--datasets",
                                  "cc3m_dec", "--no-decode"], case / "validate_after.log")
        return [] if rc == 0 else [f"validate_data.py after process_embeddings exits {rc}: "
                                   f"{next((l for l in stdout.splitlines() if 'stale' in l), last_line(stdout))}"]

    sig_check = interrupted_then_resumed()
    two_rank_check = interrupted_then_resumed(ranks=2, resume_to_end=False)
    return [
        # -- signals: stop after the step, save, exit 128 + signal, resume to the same end --------------------------
        Case("sigint_train", "Ctrl-C (SIGINT) to train.py after 3 steps: saved, exit 130, resumes bit-identical",
             train(1, steps=STEPS), ("interrupted at step",), klass="signals", exit_codes=(130,), fresh_output=False,
             drive=drive_signal((signal.SIGINT,), 3), check=sig_check, quick=True),
        Case("sigterm_train", "SIGTERM to train.py after 5 steps: saved, exit 143, resumes bit-identical",
             train(1, steps=STEPS), ("interrupted at step",), klass="signals", exit_codes=(143,), fresh_output=False,
             drive=drive_signal((signal.SIGTERM,), 5), check=sig_check),
        Case("sigint_twice", "Ctrl-C twice: abandoned at once (exit 130), the last checkpoint intact, resumable",
             train(1, steps=STEPS), ("interrupted",), klass="signals", exit_codes=(130,), fresh_output=False,
             drive=drive_signal((signal.SIGINT, signal.SIGINT), 3, gap=0.005), check=sig_check),
        Case("sigterm_launcher", "SIGTERM to the `deepspeed` launcher of 2 ranks: every rank stops and saves",
             lambda case, env: launcher_command(env, 1, case / "out"), ("interrupted at step",), klass="signals",
             launcher=True, fresh_output=False, drive=drive_signal((signal.SIGTERM,), 2), check=two_rank_check),
        Case("ctrl_c_make_launcher", "Ctrl-C in the terminal of `make stage1 NUM_GPUS=2` (SIGINT to the process "
             "group of nextgpt.launch), 2 ranks", lambda case, env: launcher_command(env, 1, case / "out", wrapper=True),
             ("interrupted at step",), klass="signals", launcher=True, fresh_output=False, exit_codes=(130,),
             drive=drive_signal((signal.SIGINT,), 2, group=True), check=two_rank_check),
        Case("sigterm_make_launcher", "SIGTERM to nextgpt.launch (a scheduler ending the job), 2 ranks",
             lambda case, env: launcher_command(env, 1, case / "out", wrapper=True), ("interrupted at step",),
             klass="signals", launcher=True, fresh_output=False, exit_codes=(143,),
             drive=drive_signal((signal.SIGTERM,), 2), check=two_rank_check),
        Case("sigkill_launcher", "kill -9 of the `deepspeed` launcher: no rank trains on orphaned",
             lambda case, env: launcher_command(env, 1, case / "out"), (), klass="signals", launcher=True,
             error_line=False, fresh_output=False, drive=drive_signal((signal.SIGKILL,), 2),
             check=two_rank_check, expect_text=("interrupted at step",)),
        *launcher_cases(two_rank_check),
        # -- one run per output folder ------------------------------------------------------------------------------
        Case("second_run_refused", "a second train.py into the folder of a live run", train(1),
             ("another training is using this folder",), klass="lock", exit_codes=(2,), fresh_output=False,
             drive=drive_second_run, quick=True),
        Case("stale_lock_taken_over", "a lock left by a crashed run (dead pid): taken over, said so", train(1, steps=2,
             out_fn=with_lock(dead_pid)), (), klass="lock", succeed=True, expect_text=("took over the stale lock",)),
        Case("lock_of_other_host", "a lock held from another host: refused, with how to remove it",
             train(1, out_fn=with_lock(lambda case: {"pid": 1, "host": "elsewhere.example", "run_id": "x"})),
             ("elsewhere.example",), klass="lock", exit_codes=(2,), fresh_output=False),
        # -- corrupt latest checkpoint: named, --resume auto falls back to the newest that verifies ---------------
        Case("truncated_optimizer_latest", "checkpoint-8's optimizer state cut in half: falls back to checkpoint-6",
             train(1, out_fn=corrupt_latest(("checkpoint-8/state/deepspeed/*optim_states.pt", "truncate"))), (),
             klass="checkpoint", succeed=True, expect_text=("skipping checkpoint-8", "sha256 differs",
                                                            "resumed from"), check=ends_like_reference(), quick=True),
        Case("truncated_rank_state_latest", "checkpoint-8's state/rank_0.pt cut in half: falls back",
             train(1, out_fn=corrupt_latest(("checkpoint-8/state/rank_0.pt", "truncate"))), (), klass="checkpoint",
             succeed=True, expect_text=("skipping checkpoint-8", "rank_0.pt"), check=ends_like_reference()),
        Case("flipped_delta_latest", "one byte of checkpoint-8's delta.safetensors flipped: falls back",
             train(1, out_fn=corrupt_latest(("checkpoint-8/delta.safetensors", "flip"))), (), klass="checkpoint",
             succeed=True, expect_text=("skipping checkpoint-8", "delta.safetensors"), check=ends_like_reference()),
        Case("missing_model_states_latest", "checkpoint-8's DeepSpeed model states deleted: falls back",
             train(1, out_fn=corrupt_latest(("checkpoint-8/state/deepspeed/*model_states.pt", "delete"))), (),
             klass="checkpoint", succeed=True, expect_text=("skipping checkpoint-8", "missing"),
             check=ends_like_reference()),
        Case("explicit_resume_corrupt", "--resume naming the corrupt checkpoint itself: one line naming the file",
             lambda case, env: train(1, args=("--resume", str(case / "out" / "checkpoint-8")), out_fn=corrupt_latest(
                 ("checkpoint-8/state/rank_0.pt", "truncate")))(case, env), ("rank_0.pt",), klass="checkpoint",
             exit_codes=(2,), fresh_output=False),
        Case("no_checkpoint_verifies", "every checkpoint corrupt: one line, nothing trained",
             train(1, out_fn=corrupt_latest(("checkpoint-*/state/rank_0.pt", "truncate"))),
             ("no checkpoint verifies",), klass="checkpoint", exit_codes=(2,), fresh_output=False),
        # -- resuming with another config / number of processes -----------------------------------------------------
        Case("resume_lr_changed", "resume with train.lr changed: refused, naming it and the flag",
             train(1, "train.lr=0.05", out_fn=reference_copy), ("train.lr", "--allow-config-change"),
             klass="resume-config", exit_codes=(2,), fresh_output=False, quick=True),
        Case("resume_batch_changed", "resume with train.micro_batch_size changed: refused",
             train(1, "train.micro_batch_size=2", out_fn=reference_copy), ("train.micro_batch_size",),
             klass="resume-config", exit_codes=(2,), fresh_output=False),
        Case("resume_steps_allowed", "--max-steps 8 -> 10 with --allow-config-change: continues, meta.json records it",
             train(1, args=("--allow-config-change",), out_fn=reference_copy, steps=10), (), klass="resume-config",
             succeed=True, expect_text=("config changed on resume",), check=config_change_recorded),
        Case("resume_1_to_2_processes", "a 1-process checkpoint resumed by 2 ranks: refused in one line",
             one_to_two, ("written by 1 process(es), this run has 2",), klass="resume-config", launcher=True,
             fresh_output=False),
        Case("resume_2_to_1_processes", "a 2-rank checkpoint resumed by 1 process: refused in one line",
             two_rank_checkpoint, ("written by 2 process(es), this run has 1",), klass="resume-config",
             exit_codes=(2,), fresh_output=False),
        # -- storage ------------------------------------------------------------------------------------------------
        Case("output_dir_is_file", "train.output_dir names a file", output_is_file, ("is a file",), klass="storage",
             exit_codes=(2,), quick=True),
        Case("disk_full_on_save", "the disk fills while checkpoint-6 is written: one line, checkpoint-4 intact",
             disk_full, ("no space left on device",), klass="storage", exit_codes=(2,), fresh_output=False,
             check=latest_intact("checkpoint-4"), needs="root"),
        Case("read_only_output", "train.output_dir on a read-only file system", read_only, ("read-only file system",),
             klass="storage", exit_codes=(2,), fresh_output=False, needs="root"),
        Case("inference_out_is_file", "inference.py --out names a file: the reply is printed, then the error",
             inference_out_is_file, ("is a file",), klass="storage", exit_codes=(2,), expect_text=("assistant:",)),
        # -- steps and epochs -----------------------------------------------------------------------------------------
        Case("max_steps_zero", "--max-steps 0: checks everything, trains and saves nothing, exit 0",
             train(1, steps=0), (), klass="config", succeed=True, expect_text=("trained 0 steps",), check=no_outputs),
        Case("epochs_zero", "train.epochs=0", train(1, "train.epochs=0"), ("train.epochs",), klass="config",
             exit_codes=(2,)),
        Case("max_steps_negative", "--max-steps -1", train(1, steps=-1), ("--max-steps",), klass="config",
             exit_codes=(2,)),
        Case("max_steps_negative_set", "--set train.max_steps=-3", train(1, "train.max_steps=-3"),
             ("train.max_steps",), klass="config", exit_codes=(2,)),
        # -- values read back: finite, the manifest's dtype (validate_data.py: exit 1 = problems found) -------------
        Case("nan_caption_embedding", "a caption embedding of NaNs (validate_data.py stage 2)",
             validate("stage_2", lambda data: replace_npy(data / "embed", first_name(data),
                                                          lambda a: np.full_like(a, np.nan))), (),
             klass="values", exit_codes=(1,), error_line=False, expect_text=("non-finite",)),
        Case("inf_feature", "an ImageBind feature with an inf (validate_data.py stage 1)",
             validate("stage_1", lambda data: replace_npy(data / "features", first_name(data),
                                                          lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0,
                                                                             np.inf, a).astype(a.dtype))), (),
             klass="values", exit_codes=(1,), error_line=False, expect_text=("non-finite",)),
        Case("float16_embedding", "a float16 caption embedding where the manifest says float32",
             validate("stage_2", lambda data: replace_npy(data / "embed", first_name(data),
                                                          lambda a: a.astype(np.float16))), (),
             klass="values", exit_codes=(1,), error_line=False, expect_text=("dtype float16",)),
        # -- values checked where training reads them (the collator, store.StoreReader.get) -------------------------
        Case("nan_feature_train", "ImageBind features turned NaN after they were written: stage 1 names the file "
             "and the record", train_case(1, "data.datasets=[cc3m_enc]", data_fn=break_all("features", nan)),
             ("non-finite value",), klass="values", exit_codes=(2,), quick=True, expect_text=("cc3m.json record",)),
        Case("complex_embedding_train", "caption embeddings stored as complex64: stage 2 refuses them, naming the file",
             train_case(2, "data.datasets=[cc3m_dec]", data_fn=break_all("embed", lambda a: a.astype(np.complex64))),
             ("complex64, not a real floating type",), klass="values", exit_codes=(2,)),
        Case("string_embedding_train", "caption embeddings of string dtype: one line naming the file",
             train_case(2, "data.datasets=[cc3m_dec]", data_fn=break_all("embed", lambda a: a.astype(str))),
             (".npy",), klass="values", exit_codes=(2,), expect_text=("not a real floating type",)),
        Case("nan_feature_skipped", "one NaN feature under data.skip_bad_records: its record is skipped, counted",
             train_case(1, "data.datasets=[cc3m_enc]", "data.skip_bad_records=true", args=("--max-steps", "12"),
                        data_fn=lambda data, case, env: replace_npy(data / "features", first_name(data), nan)),
             (), klass="values", skip=True, expect_text=("non-finite value",)),
        # -- a cache must match what it is a cache of ----------------------------------------------------------------
        Case("stale_caption_train", "a caption edited after `make embeddings`: stage 2 names the stale embedding",
             train_case(2, "data.datasets=[cc3m_dec]", data_fn=edit_first_caption), ("stale caption embedding",),
             klass="cache", exit_codes=(2,), quick=True),
        Case("stale_caption_recomputed", "the edited caption's embedding is recomputed by process_embeddings",
             reembedded, (), klass="cache", succeed=True, check=fresh_again),
        Case("duplicate_name_two_captions", "the same image name with two different captions (stage 2)",
             train_case(2, "data.datasets=[cc3m_dec]", data_fn=duplicate_name), ("has two captions",), klass="cache",
             exit_codes=(2,)),
        Case("features_of_other_imagebind", "stage 1 on features another ImageBind checkpoint made",
             train_case(1, "data.datasets=[cc3m_enc]", data_fn=other_imagebind), ("another-imagebind-checkpoint",),
             klass="cache", exit_codes=(2,)),
        # -- image modes: decode to the pixels a viewer shows; a bomb is refused before decoding -------------------
        Case("image_16bit_png", "16-bit grayscale PNG", image_as(gray16), (), klass="images", succeed=True,
             check=features_finite),
        Case("image_rgba", "RGBA PNG, half transparent", image_as(rgba), (), klass="images", succeed=True,
             check=features_finite),
        Case("image_palette_alpha", "palette PNG with a transparent index", image_as(palette_alpha), (),
             klass="images", succeed=True, check=features_finite),
        Case("image_cmyk_jpeg", "CMYK JPEG", image_as(cmyk), (), klass="images", succeed=True, check=features_finite),
        Case("image_exif_rotated", "JPEG with EXIF orientation 6", image_as(exif_rotated), (), klass="images",
             succeed=True, check=features_finite),
        Case("image_bomb", "a PNG promising 10000 x 6000 pixels (decompression bomb)", bomb,
             ("decompression-bomb",), klass="images", quick=True),
        Case("skip_image_bomb", "the same bomb with data.skip_bad_records=true: counted skip",
             lambda case, env: bomb(case, env, "data.skip_bad_records=true"), (), klass="images", skip=True),
    ]


def output_problems(case: Path, skip: bool) -> list[str]:
    """Outputs that look complete after a failed run (or are broken after any run)."""
    from nextgpt.data.embeddings import check_npy

    problems = []
    out = case / "out"
    if not skip and out.is_dir():
        for name in ("done.json", "latest"):
            if (out / name).exists():
                problems.append(f"{out / name} written by a failed run")
        found = [p.name for p in out.iterdir() if p.name.startswith("checkpoint-")]
        if found:
            problems.append(f"{out}: checkpoints {found} from a failed run")
    for folder in (case / "features", case / "out"):
        if not folder.is_dir():
            continue
        for p in folder.rglob("*.npy"):
            if not p.name.startswith(".") and check_npy(p) is not None:
                problems.append(f"{p}: {check_npy(p)}")
        leftovers = [p.name for p in folder.rglob(".*.tmp")]
        if leftovers:
            problems.append(f"{folder}: temporary files left {leftovers[:2]}")
    return problems


# -- distributed: two "nodes" (scripts/tiny/nodes.py), a dead rank / node / rank 0, a hung rank, a node's own disk
NODE_TIMEOUT = 20          # train.dist_timeout of these runs: a hung rank is given up on after 20 s


def distributed_cases() -> list[Case]:
    from tiny.nodes import NodeJob

    # The dead-rank rows train into <case>/run: a kill -9 of rank 0 mid-save leaves its temporary folder until the
    # next start removes it, and the table's leftover check reads <case>/out; resumes_on_two_nodes checks after the
    # rerun that nothing is left.
    def two_nodes(folder: str = "out", embeddings: bool = False):
        """The per-node script arguments (NodeJob adds each node's launcher): stage-1 training or --all caption
        embeddings into <case>/<folder>."""
        def build(case: Path, env) -> list[str]:
            out = case / folder
            if embeddings:
                return [PROCESS, *env.argv("stage_3", f"data.embed_dir={out}"), "--all", "--batch-size", "8"]
            return [TRAIN, *env.argv("stage_1", f"train.output_dir={out}", "train.init_from=",
                                     "train.report_to=[]", f"train.save_every={SAVE_EVERY}",
                                     "data.datasets=[cc3m_enc]", f"train.dist_timeout={NODE_TIMEOUT}"),
                    "--max-steps", str(STEPS)]
        return build

    def drive_nodes(action: str, folder: str = "run"):
        """Start both nodes; `own_disk`: node 1 with a tmpfs over <case>/out from the start; else after
        checkpoint-2 is saved: kill -9 node 1's rank / node 1's whole launcher tree / rank 0, or SIGSTOP node 1's
        rank. -> (the surviving node's exit, "", both nodes' output), timed from the fault."""
        def drive(command: list[str], case: Path, log_path: Path) -> tuple[int, str, str]:
            out = case / folder
            job = NodeJob("deepspeed", command, case / "nodes")
            survivor = 1 if action == "rank0" else 0
            try:
                job.start(own_disk={1: out} if action == "own_disk" else None)
                if action != "own_disk":
                    try:
                        job.wait_for(f"saved {out / 'checkpoint-2'}", node=0)
                    except TimeoutError as e:
                        return -995, "", f"{job.log(0)}{job.log(1)}\n[chaos] {e}"
                    fault = time.time()
                    if action == "rank":
                        job.kill_rank(1)
                    elif action == "node":
                        job.kill_node(1)
                    elif action == "rank0":
                        job.kill_rank(0)
                    elif action == "hang":
                        os.kill(job.rank_pid(1), signal.SIGSTOP)
                try:
                    job.processes[survivor].wait(timeout=NODE_TIMEOUT + 60)
                except subprocess.TimeoutExpired:
                    pass
                took = time.time() - fault if action != "own_disk" else 0.0
                if action == "hang":
                    job.kill_node(1)            # the stopped rank never ends by itself
                codes = job.wait(120)
                text = job.log(0) + job.log(1)
                if took > NODE_TIMEOUT + 30:
                    text += f"\n[chaos] the survivor took {took:.0f} s to stop"
                    return -996, "", text
            finally:
                job.stop()
            log_path.write_text(text)
            return (codes[survivor] if action != "own_disk" else max(codes)), "", text
        return drive

    def resumes_on_two_nodes(case: Path, env, text: str) -> list[str]:
        """`latest` verifies, and the same two nodes rerun to the end from it (exit 0, a verified final one)."""
        from nextgpt.checkpoint.resume_checks import verify

        out = case / "run"
        latest = out / (out / "latest").read_text().strip()
        problems = [f"latest {latest.name}: {p}" for p in verify(latest)]
        again = NodeJob("deepspeed", two_nodes("run")(case, env), case / "resumed").start()
        codes = again.wait(600)
        if codes != [0, 0]:
            return problems + [f"the resumed run exited {codes}: {last_line(again.log(0))}"]
        final = out / (out / "latest").read_text().strip()
        problems += [f"final {final.name}: {p}" for p in verify(final)]
        if final.name != f"checkpoint-{STEPS}" or f"resumed from {latest}" not in (out / "train.log").read_text():
            problems.append(f"the rerun did not resume from {latest.name} to checkpoint-{STEPS}")
        if leftovers := [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".run.lock"]:
            problems.append(f"{out}: left after the rerun: {leftovers[:3]}")
        return problems

    def nothing_written(case: Path, env, text: str) -> list[str]:
        leftovers = [p.name for p in (case / "out").iterdir()]
        return [f"{case / 'out'} holds {leftovers[:4]} after the refusal"] if leftovers else []

    dead = dict(klass="distributed", launcher=True, fresh_output=False, exit_codes=(2,), check=resumes_on_two_nodes)
    return [
        Case("dead_rank", "kill -9 node 1's rank (2 nodes, one rank each): rank 0 stops naming rank 1, resumes",
             two_nodes("run"), ("rank 1",), drive=drive_nodes("rank"), expect_text=("stopped answering",), **dead),
        Case("dead_node", "kill -9 node 1's whole launcher tree: rank 0 stops naming rank 1, resumes",
             two_nodes("run"), ("rank 1",), drive=drive_nodes("node"), expect_text=("stopped answering",), **dead),
        Case("dead_rank_0", "kill -9 rank 0 (it hosts the rendezvous store): rank 1 stops naming rank 0, resumes",
             two_nodes("run"), ("rank 0",), drive=drive_nodes("rank0"), expect_text=("stopped answering",), **dead),
        Case("hung_rank", f"SIGSTOP node 1's rank: rank 0 gives up after train.dist_timeout ({NODE_TIMEOUT} s), "
             "naming rank 1", two_nodes("run"), ("rank 1",), drive=drive_nodes("hang"), expect_text=("timed out",),
             **dead),
        Case("own_disk_train", "node 1 with its own disk at train.output_dir (tmpfs): both nodes refuse at start",
             two_nodes(), ("train.output_dir", "shared file system"), klass="distributed", launcher=True,
             exit_codes=(2,), drive=drive_nodes("own_disk", "out"), needs="root", check=nothing_written),
        Case("own_disk_embeddings", "node 1 with its own disk at data.embed_dir: process_embeddings refuses",
             two_nodes(embeddings=True), ("data.embed_dir",), klass="distributed", launcher=True, exit_codes=(2,),
             drive=drive_nodes("own_disk", "out"), needs="root", check=nothing_written),
    ]


def can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


LAUNCHER_SIGNAL_EXCEPTIONS = ("KeyboardInterrupt", "torch.distributed.elastic.multiprocessing.api.SignalException")


def launchers_own_tracebacks(text: str) -> bool:
    """Every traceback in `text` is a launcher's answer to the signal, not a rank's: DeepSpeed's runner raises
    KeyboardInterrupt on Ctrl-C and torchrun SignalException on SIGTERM / SIGINT (library code we do not change;
    the ranks' own lines are the `error: interrupted ...` ones). A launcher's: its outermost frame (after runpy)
    is the runner's / torchrun's module, and it ends in one of those exceptions."""
    for block in text.split(TRACEBACK)[1:]:
        lines = [line for line in block.splitlines()[1:] if line.strip()]    # [0]: the rest of the heading
        frames = [line for line in lines if line.lstrip().startswith("File ") and "<frozen runpy>" not in line]
        last = next((line for line in lines if not line.startswith((" ", "["))), "")
        outer = frames[0] if frames else ""
        if not last.startswith(LAUNCHER_SIGNAL_EXCEPTIONS) or not any(
                part in outer for part in ("/deepspeed/launcher/", "/torch/distributed/run.py", "/bin/deepspeed")):
            return False
    return True


def run_case(case_def: Case, env, root: Path) -> Check:
    klass = case_def.klass or CASE_CLASS.get(case_def.name, "inputs")
    case = root / "inputs" / case_def.name
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    if case_def.needs == "root" and not can_mount():
        return Check("inputs", case_def.name, True, "not run: needs root to mount a small tmpfs / read-only bind",
                     klass=klass, extra=dict(not_run=True))
    try:
        command = case_def.build(case, env)
    except Exception as e:                                     # noqa: BLE001 - a harness bug, reported as such
        return Check("inputs", case_def.name, False, f"harness could not build the case: {type(e).__name__}: {e}",
                     klass=klass)
    try:
        return _run_and_check(case_def, command, case, env, klass)
    finally:
        unmount_all(case)                   # after the checks: they read what the mounted folder holds


def _run_and_check(case_def: Case, command: list[str], case: Path, env, klass: str) -> Check:
    if case_def.drive is not None:
        rc, stdout, stderr = case_def.drive(command, case, case / "command.log")
    else:
        rc, stdout, stderr = run(command, case / "command.log", timeout=300)
    text = stdout + stderr
    problems = []
    if TRACEBACK in text and not (case_def.launcher and launchers_own_tracebacks(text)):
        problems.append("traceback printed")
    if case_def.skip or case_def.succeed:
        if rc != 0:
            problems.append(f"exit {rc}, expected 0" + (" (skipping was asked for)" if case_def.skip else ""))
        summary = last_line(text)
        if case_def.skip:
            match = re.search(case_def.skip_pattern, text, re.IGNORECASE)
            if not match:
                problems.append("no counted skip in the output")
            elif match.groups() and match.group(1) == "0":
                problems.append(f"skip count is 0 ({match.group(0)!r})")
            summary = match.group(0) if match else (error_line(stderr)[0] or last_line(text))
    else:
        if rc == 0:
            problems.append("exit 0")
        elif case_def.exit_codes and rc not in case_def.exit_codes:
            problems.append(f"exit {rc}, expected {' or '.join(map(str, case_def.exit_codes))}")
        line, after, glued = error_line(stderr if not case_def.launcher else text)
        if case_def.launcher and line is None:
            found = [l for l in re.split(r"[\r\n]", text) if l.strip().startswith("error:")]
            line = found[-1].strip() if found else None
        if not case_def.error_line:
            summary = line or last_line(text)
        elif line is None:
            problems.append("no `error: ...` line")
            summary = last_line(stderr) or last_line(stdout)
        else:
            summary = line
            if case_def.keywords and not any(k.lower() in line.lower() for k in case_def.keywords):
                problems.append(f"error line names none of {list(case_def.keywords)}")
            bars = [a for a in after if PROGRESS_BAR.search(a)]
            others = [a for a in after if not PROGRESS_BAR.search(a)]
            if others and not case_def.launcher:
                problems.append(f"not one line: the error message goes on for {len(others)} more line(s) "
                                f"(first: {others[0][:120]!r})")
            if glued:
                problems.append("the error is printed on the progress bar's line")
            if bars:
                problems.append("the progress bar is redrawn after the error line")
    missing = [t for t in case_def.expect_text if t.lower() not in text.lower()]
    if missing:
        problems.append(f"output lacks {missing}")
    problems += output_problems(case, case_def.skip or case_def.succeed or not case_def.fresh_output)
    if case_def.check is not None and not problems:
        try:
            problems += case_def.check(case, env, text)
        except Exception as e:                                 # noqa: BLE001 - the check itself failed: report it
            problems.append(f"check failed: {type(e).__name__}: {e}")
    detail = f"exit {rc}: {summary[:300]}"
    return Check("inputs", case_def.name, not problems, detail if not problems else f"{'; '.join(problems)} | {detail}",
                 output=tail(text, 6) if problems else "", extra=dict(problem=case_def.problem, exit=rc),
                 klass=klass)


def section_inputs(env, root: Path, names: list[str] | None, quick: bool, log) -> list[Check]:
    table = cases()
    if names:
        unknown = sorted(set(names) - {c.name for c in table})
        if unknown:
            raise ValueError(f"unknown case(s) {unknown}; --list shows them")
        table = [c for c in table if c.name in names]
    elif quick:
        table = [c for c in table if c.quick]
    checks = []
    for case_def in table:
        check = run_case(case_def, env, root)
        checks.append(check)
        log(f"  {'ok  ' if check.ok else 'FAIL'} {case_def.name}: {check.detail}")
    return checks


# ----------------------------------------------------------------------------------------------------------------

def section_app(env, root: Path, quick: bool, log) -> Check:
    """The app load test (chaos.app_load): 10 clients / 50 requests / 2 disconnects (--quick: 4 / 12 / 1)."""
    from chaos import app_load
    from nextgpt.runtime import free_port
    from tiny import programmed_llm

    clients, requests, disconnects = (4, 12, 1) if quick else (10, 50, 2)
    limit = 64 * 1024
    _ = env.imagebind
    programmed = programmed_llm.build(env, root / "app_load" / "programmed")
    image = sorted((env.data / "T_X_pair_data" / "cc3m" / "images").glob("*.jpg"))[0]
    report = app_load.load_test(app_load.app_command(env, programmed, free_port(), limit), programmed["word"], image,
                                root / "app_load", clients, requests, disconnects, limit)
    detail = (f"{report['outcomes']}; {report['requests_per_s']} requests/s, p50 {report['latency_p50_s']} s, p95 "
              f"{report['latency_p95_s']} s, peak RSS {report['rss_peak_mb']} MB")
    ok = not report["problems"]
    log(f"  {'ok  ' if ok else 'FAIL'} app_under_load: {detail if ok else '; '.join(report['problems'])}")
    return Check("app", "app_under_load", ok, detail if ok else "; ".join(report["problems"]) + f" | {detail}",
                 extra={k: v for k, v in report.items() if k != "results"}, klass="app")


SECTIONS = ("resume", "write", "embeddings", "inputs", "app")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--kills", type=int, default=6, help="kill -9 / resume trials, spread over stages 1-3 (default 6)")
    p.add_argument("--write-kills", type=int, default=3, help="kills inside a checkpoint write (default 3)")
    p.add_argument("--cases", nargs="+", metavar="NAME", help="only these table cases")
    p.add_argument("--classes", nargs="+", metavar="CLASS", choices=CLASSES,
                   help=f"only the table cases of these failure classes ({', '.join(CLASSES)})")
    p.add_argument("--quick", action="store_true", help="3 kills, 1 write kill, the quick subset of bad inputs")
    p.add_argument("--seed", type=int, default=None, help="seed of the kill points (default: random, printed)")
    p.add_argument("--list", action="store_true", help="list the bad-input cases and exit")
    p.add_argument("--workdir", default=str(REPO / "runs" / "chaos"))
    p.add_argument("--json", default=None, help="results JSON (default: <workdir>/results.json)")
    args = p.parse_args(argv)
    if args.list:
        for c in cases():
            klass = c.klass or CASE_CLASS.get(c.name, "inputs")
            print(f"{klass:14} {c.name:30} {'[quick] ' if c.quick else ''}{c.problem}")
        return 0
    if args.classes:
        chosen = [c.name for c in cases() if (c.klass or CASE_CLASS.get(c.name, "inputs")) in args.classes]
        args.cases = sorted(set(args.cases or []) | set(chosen))
    if args.cases and args.sections == list(SECTIONS):  # named cases (or classes): just those
        args.sections = ["inputs"]
    if args.quick:
        args.kills, args.write_kills = min(args.kills, 3), min(args.write_kills, 1)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    root = Path(args.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def log(message: str) -> None:
        print(message, flush=True)

    print(machine_line())
    log(f"chaos: sections {', '.join(args.sections)}; seed {seed} (rerun with --seed {seed}); work in {root}")
    env = workspace(root / "tiny", log=log)
    refs = References(env, root, log)
    global REFS
    REFS = refs
    checks: list[Check] = []
    try:
        if "resume" in args.sections:
            log(f"\n[resume] kill -9 at random points, --resume auto, compare with an uninterrupted run ({args.kills})")
            checks += section_resume(env, root, refs, args.kills, rng, log)
        if "write" in args.sections:
            log(f"\n[write] kill -9 inside a checkpoint write ({args.write_kills})")
            checks += section_write(env, root, refs, args.write_kills, rng, log)
        if "embeddings" in args.sections:
            log("\n[embeddings] kill -9 process_embeddings mid-run, rerun")
            checks += section_embeddings(env, root, rng, log)
        if "inputs" in args.sections:
            log("\n[inputs] the fault table through the real commands (bad inputs, signals, locks, corrupt "
                "checkpoints, changed configs, storage, values, image modes)")
            checks += section_inputs(env, root, args.cases, args.quick, log)
        if "app" in args.sections:
            log("\n[app] the web demo under load (chaos/app_load.py: concurrent gradio_client sessions)")
            checks.append(section_app(env, root, args.quick, log))
    except (RuntimeError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows = []
    for section in SECTIONS:
        mine = [c for c in checks if c.section == section]
        if mine:
            rows.append([section, f"{sum(c.ok for c in mine)}/{len(mine)}",
                         ", ".join(c.name for c in mine if not c.ok) or "-"])
    print_table(f"chaos: {sum(c.ok for c in checks)}/{len(checks)} passed (seed {seed}, "
                f"{time.time() - started:.0f} s)", ["section", "passed", "failed"], rows)
    by_class = []
    for klass in CLASSES:
        mine = [c for c in checks if c.failure_class == klass]
        if mine:
            not_run = sum(1 for c in mine if c.extra.get("not_run"))
            by_class.append(f"{klass} {sum(c.ok for c in mine) - not_run}/{len(mine) - not_run}"
                            + (f" (+{not_run} not run)" if not_run else ""))
    print(f"by class: {', '.join(by_class)}")
    failures = [c for c in checks if not c.ok]
    if failures:
        print("\nfailures:")
        for c in failures:
            print(f"- [{c.section}] {c.name}: {c.detail}")
            if c.output:
                print("    " + c.output.replace("\n", "\n    "))
    json_path = Path(args.json) if args.json else root / "results.json"
    write_json(json_path, {"seed": seed, "passed": sum(c.ok for c in checks), "total": len(checks),
                           "seconds": time.time() - started, "checks": [asdict(c) for c in checks],
                           "command": "python dev/chaos/run.py " + " ".join(sys.argv[1:] if argv is None else argv)})
    print(f"wrote {json_path}")
    return 0 if not failures else 1


if __name__ == "__main__":
    from nextgpt.cli import run as run_cli  # any failure: one `error:` line, the traceback in a log it names

    raise SystemExit(run_cli(main, "chaos"))
