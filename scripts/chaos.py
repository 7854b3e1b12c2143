"""Fault injection through the real commands: kill -9 and resume, kills while a checkpoint is written, a killed
process_embeddings, and a table of bad inputs. Prints pass counts; `make chaos`.

    python scripts/chaos.py                      # everything (a few minutes on 2 CPU cores)
    python scripts/chaos.py --quick              # fewer kills, a subset of the bad inputs
    python scripts/chaos.py --sections inputs --cases config_typo wrong_type_set
    python scripts/chaos.py --list               # the bad-input cases

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
  inputs       a table of broken inputs, each through the real command in a fresh process: the run must end with
               a one-line `error: ...` naming the problem (or a counted skip where the user asked for skipping),
               a non-zero exit (zero for the skips), no traceback, and no output that looks complete.

Everything runs in --workdir (default runs/chaos/): a tiny workspace (tiny checkpoints + toy data, built once by
tests/conftest.build_tiny_env) and hard-linked copies of its data that each case breaks. Exit status: 0 when
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import REPO, machine_line, print_table, write_json, workspace  # noqa: E402

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

def train_command(env, stage: int, out: Path, init_from: Path | None, *extra: str, args: tuple[str, ...] = ()
                  ) -> list[str]:
    overrides = [f"train.output_dir={out}", f"train.save_every={SAVE_EVERY}", "train.report_to=[]",
                 "train.log_every=1", "train.keep_last=2"]
    overrides.append(f"train.init_from={init_from}" if init_from else "train.init_from=")
    return [PYTHON, TRAIN, *env.argv(f"stage_{stage}", *overrides, *extra), "--max-steps", str(STEPS), *args]


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


def write_window(env, root: Path, log) -> float:
    """Seconds checkpoint-4's temporary folder exists in an undisturbed stage-1 run (the kill window)."""
    out = root / "write_calibration"
    shutil.rmtree(out, ignore_errors=True)
    temporary = out / f".checkpoint-{2 * SAVE_EVERY}.tmp"
    process = start(train_command(env, 1, out, None), root / "write_calibration.log")
    while process.poll() is None and not temporary.exists():
        time.sleep(0.0005)
    appeared = time.perf_counter()
    while process.poll() is None and temporary.exists():
        time.sleep(0.0005)
    window = time.perf_counter() - appeared
    kill(process)
    log(f"  a checkpoint write takes {window * 1000:.0f} ms here (temporary folder to rename)")
    return max(window, 0.002)


def section_write(env, root: Path, refs: References, trials: int, rng: random.Random, log) -> list[Check]:
    from nextgpt import resume as resume_lib

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
            temporary = out / f".{target}.tmp"
            while process.poll() is None and not temporary.exists():
                time.sleep(0.0005)
            time.sleep(delay)
            kill(process)
            inside = temporary.exists() and not (out / target).exists()
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
            chosen = resume_lib.find_resume(out, "auto")
            if chosen is None or chosen.name != previous:
                problems.append(f"resume.find_resume picks {chosen}, expected {previous}")
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"resume.find_resume: {e}")
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
    name: str
    problem: str
    # (case folder, env) -> command; creates the broken inputs inside the case folder
    build: Callable[[Path, object], list[str]]
    keywords: tuple[str, ...]            # the error line must contain at least one (case-insensitive)
    skip: bool = False                   # the user asked for skipping: exit 0 + a counted skip
    skip_pattern: str = r"\bskipp(?:ing|ed)\b\D{0,40}\d+|\d+\D{0,40}\bskipped\b"   # "skipping 3 ...", "3 ... skipped"
    quick: bool = False                  # in the --quick subset


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
                              quick=(modality == "image" and kind != "missing")))
        table.append(Case(f"skip_missing_{ext}", f"missing .{ext} with data.skip_bad_records=true: counted skip",
                          features_case(modality, missing, "data.skip_bad_records=true"), (), skip=True,
                          quick=modality == "audio"))
    table += [
        Case("corrupt_jpg_live", "corrupt .jpg files, stage 1 without a feature cache (train.py)", live_corrupt_image,
             (".jpg",)),
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
    return table


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


def run_case(case_def: Case, env, root: Path) -> Check:
    case = root / "inputs" / case_def.name
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    try:
        command = case_def.build(case, env)
    except Exception as e:                                     # noqa: BLE001 - a harness bug, reported as such
        return Check("inputs", case_def.name, False, f"harness could not build the case: {type(e).__name__}: {e}")
    rc, stdout, stderr = run(command, case / "command.log", timeout=300)
    text = stdout + stderr
    problems = []
    if TRACEBACK in text:
        problems.append("traceback printed")
    if case_def.skip:
        if rc != 0:
            problems.append(f"exit {rc}, expected 0 (skipping was asked for)")
        match = re.search(case_def.skip_pattern, text, re.IGNORECASE)
        if not match:
            problems.append("no counted skip in the output")
        elif match.groups() and match.group(1) == "0":
            problems.append(f"skip count is 0 ({match.group(0)!r})")
        summary = match.group(0) if match else (error_line(stderr)[0] or last_line(text))
    else:
        if rc == 0:
            problems.append("exit 0")
        line, after, glued = error_line(stderr)
        if line is None:
            problems.append("no `error: ...` line")
            summary = last_line(stderr) or last_line(stdout)
        else:
            summary = line
            if case_def.keywords and not any(k.lower() in line.lower() for k in case_def.keywords):
                problems.append(f"error line names none of {list(case_def.keywords)}")
            bars = [a for a in after if PROGRESS_BAR.search(a)]
            others = [a for a in after if not PROGRESS_BAR.search(a)]
            if others:
                problems.append(f"not one line: the error message goes on for {len(others)} more line(s) "
                                f"(first: {others[0][:120]!r})")
            if glued:
                problems.append("the error is printed on the progress bar's line")
            if bars:
                problems.append("the progress bar is redrawn after the error line")
    problems += output_problems(case, case_def.skip)
    detail = f"exit {rc}: {summary[:300]}"
    return Check("inputs", case_def.name, not problems, detail if not problems else f"{'; '.join(problems)} | {detail}",
                 output=tail(text, 6) if problems else "", extra=dict(problem=case_def.problem, exit=rc))


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

SECTIONS = ("resume", "write", "embeddings", "inputs")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--kills", type=int, default=6, help="kill -9 / resume trials, spread over stages 1-3 (default 6)")
    p.add_argument("--write-kills", type=int, default=3, help="kills inside a checkpoint write (default 3)")
    p.add_argument("--cases", nargs="+", metavar="NAME", help="only these bad-input cases")
    p.add_argument("--quick", action="store_true", help="3 kills, 1 write kill, the quick subset of bad inputs")
    p.add_argument("--seed", type=int, default=None, help="seed of the kill points (default: random, printed)")
    p.add_argument("--list", action="store_true", help="list the bad-input cases and exit")
    p.add_argument("--workdir", default=str(REPO / "runs" / "chaos"))
    p.add_argument("--json", default=None, help="results JSON (default: <workdir>/results.json)")
    args = p.parse_args(argv)
    if args.list:
        for c in cases():
            print(f"{c.name:28} {'[quick] ' if c.quick else ''}{c.problem}")
        return 0
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
            log("\n[inputs] bad inputs through the real commands")
            checks += section_inputs(env, root, args.cases, args.quick, log)
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
                           "command": "python scripts/chaos.py " + " ".join(sys.argv[1:] if argv is None else argv)})
    print(f"wrote {json_path}")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
