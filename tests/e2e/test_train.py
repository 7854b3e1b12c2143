"""code/train.py end to end on the tiny checkpoints and toy data, each run a real deepspeed.initialize on CPU.

Stage 1 -> 2 -> 3 -> 8-bit fine-tune chain through their checkpoints (each init_from is the previous run folder);
a "repeated batch" is one small dataset with micro_batch_size = its size, so every step sees the same samples and
the loss must fall. Resume after a crash reproduces the uninterrupted weights bit-exactly; a two-process
`deepspeed --num_gpus 2` launch equals a one-process run with the same global batch.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import train
from nextgpt import config as config_lib
from ranks import delta_tensors, launch_train

REPO = config_lib.REPO_ROOT
DSCONFIG = REPO / "code" / "dsconfig"


@pytest.fixture(scope="module")
def env(tiny_env):
    tiny_env.embeddings()  # stage 2/3 targets
    tiny_env.features()    # ImageBind features: no live encoding in these runs
    return tiny_env


def run(env, stage, out, *sets, extra=(), expect=0):
    argv = env.argv(stage, f"train.output_dir={out}", "train.log_every=1", *sets) + list(extra)
    assert train.main(argv) == expect
    return out


def metrics(out, split="train"):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def assert_falls(losses, what):
    # DeepSpeed's WarmupDecayLR (log warm-up, as the original) gives lr 0 to the first two steps, so the first three
    # losses (each measured before its step's update) are equal; after that a repeated batch must be fitted.
    # (equal up to summation order: each epoch shuffles the same samples within the batch)
    assert losses[0] == pytest.approx(losses[2], abs=1e-4), f"{what}: lr 0 steps changed the loss {losses}"
    assert losses[-1] < losses[2] - 0.01 * abs(losses[2]), f"{what}: loss did not fall {losses}"
    assert losses[-1] == min(losses), f"{what}: the last loss is not the lowest {losses}"


def assert_run_folder(out, steps):
    done = json.loads((out / "done.json").read_text())
    assert done["step"] == steps and done["checkpoint"] == f"checkpoint-{steps}"
    assert (out / "latest").read_text().strip() == f"checkpoint-{steps}"
    checkpoint = out / f"checkpoint-{steps}"
    for name in ("delta.safetensors", "meta.json", "config.yaml", "state/deepspeed", "state/rank_0.pt"):
        assert (checkpoint / name).exists(), name
    assert (out / "config.yaml").is_file() and (out / "train.log").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folders left
    return checkpoint


# -- the stage chain --------------------------------------------------------------------------------------------

REPEATED = {  # stage -> (dataset, size, lr, warm-up): micro_batch_size = size, so every step is the same batch
    "stage_1": ("audiocap_enc", 12, 0.01, 2),
    "stage_2": ("audiocap_dec", 12, 0.01, 2),
    "stage_3": ("audio_instruction", 12, 0.005, 4),     # LoRA + projectors + rows: a gentler start
    "fine_tuning": ("audio_instruction", 12, 0.005, 4),
}
STEPS = 8


def repeated(stage, init_from=None):
    dataset, size, lr, warmup = REPEATED[stage]
    sets = [f"data.datasets=[{dataset}]", f"train.micro_batch_size={size}", f"train.lr={lr}",
            f"train.warmup_steps={warmup}",
            f"train.max_steps={STEPS}", "train.save_every=4", "train.keep_last=1"]
    return sets + ([f"train.init_from={init_from}"] if init_from is not None else ["train.init_from="])


@pytest.fixture(scope="module")
def stage_1(env, tmp_path_factory):
    return run(env, "stage_1", tmp_path_factory.mktemp("stage_1"), *repeated("stage_1"))


@pytest.fixture(scope="module")
def stage_2(env, stage_1, tmp_path_factory):
    # 3 of the 12 samples held out (eval every 4 steps); the other 9 form the repeated batch
    return run(env, "stage_2", tmp_path_factory.mktemp("stage_2"), *repeated("stage_2", stage_1),
               "data.eval_fraction=0.25", "train.eval_every=4", "train.micro_batch_size=9")


@pytest.fixture(scope="module")
def stage_3(env, stage_2, tmp_path_factory):
    return run(env, "stage_3", tmp_path_factory.mktemp("stage_3"), *repeated("stage_3", stage_2),
               extra=["--export-legacy"])


@pytest.mark.smoke  # make test's one end-to-end run
def test_stage_1_trains_input_proj(stage_1):
    rows = metrics(stage_1)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert_falls([r["loss"] for r in rows], "stage 1")
    for r in rows:  # every logged scalar is there
        assert {"loss", "lm", "token_acc", "lr", "grad_norm", "samples_per_s", "tokens_per_s"} <= set(r)
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"]
    assert rows[0]["lr"] == 0 and rows[2]["lr"] == pytest.approx(0.01)
    checkpoint = assert_run_folder(stage_1, STEPS)
    assert not (stage_1 / "checkpoint-4").exists()  # keep_last=1
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["stage"] == 1 and meta["step"] == STEPS
    assert {"input_proj", "token_rows"} <= set(meta["groups"])
    log = (stage_1 / "train.log").read_text()
    assert "runtime: no CUDA device: DeepSpeed CPU accelerator, gloo, float32" in log
    assert "trainable: input_proj" in log


def test_stage_2_loads_stage_1_and_trains_output_proj(stage_1, stage_2):
    rows = metrics(stage_2)
    assert_falls([r["loss"] for r in rows], "stage 2")
    assert all("audio" in r for r in rows)  # the alignment term of the audio targets
    assert rows[-1]["audio"] < rows[2]["audio"]
    first, second = delta_tensors(stage_1 / "checkpoint-8"), delta_tensors(stage_2 / "checkpoint-8")
    # input_proj is frozen in stage 2: it is stage 1's, carried through init_from
    for name in [k for k in first if k.startswith("input_proj.")]:
        assert torch.equal(first[name], second[name]), name
    assert any(k.startswith("output_proj.audio.") for k in second)
    assert "init_from" in (stage_2 / "train.log").read_text()
    evals = metrics(stage_2, "eval")
    assert [r["step"] for r in evals] == [4, 8]
    for r in evals:
        assert {"loss", "lm", "token_acc", "audio", "l2"} <= set(r) and r["l2"] == r["audio"]
    assert "audiocap_dec/eval 3" in (stage_2 / "train.log").read_text()


def test_make_eval_reports_the_in_training_heldout_loss(env, stage_1, stage_2, tmp_path):
    """code/evaluate.py (make eval) and train.py's evaluation compute the held-out loss with one function
    (nextgpt.eval.run.heldout_loss, token-weighted): the same numbers for the same checkpoint and split."""
    import evaluate

    in_training = metrics(stage_2, "eval")[-1]
    assert in_training["step"] == STEPS  # the weights of checkpoint-8
    argv = env.argv("stage_2", *repeated("stage_2", stage_1), "data.eval_fraction=0.25")
    assert evaluate.main(argv + ["--ckpt", str(stage_2 / f"checkpoint-{STEPS}"), "--decode", "0",
                                 "--out", str(tmp_path)]) == 0
    reported = json.loads((tmp_path / "metrics.json").read_text())["checkpoints"][0]["metrics"]
    assert reported["heldout_loss"] == pytest.approx(in_training["loss"], rel=1e-5)
    assert reported["heldout_lm"] == pytest.approx(in_training["lm"], rel=1e-5)
    assert reported["token_acc"] == pytest.approx(in_training["token_acc"], rel=1e-5)
    assert reported["heldout_l2.audio"] == pytest.approx(in_training["audio"], rel=1e-5)


def test_stage_3_lora_from_stage_2(env, stage_2, stage_3):
    assert_falls([r["loss"] for r in metrics(stage_3)], "stage 3")
    checkpoint = assert_run_folder(stage_3, STEPS)
    assert (checkpoint / "adapter" / "adapter_config.json").is_file()
    assert json.loads((checkpoint / "meta.json").read_text())["stage"] == 3
    # --export-legacy: the original's pytorch_model.pt layout, which imports back into a stage-3 model
    from nextgpt.checkpoint import legacy as legacy_lib
    from nextgpt.model.nextgpt import build_model

    legacy = torch.load(checkpoint / "pytorch_model.pt", weights_only=True)
    assert any(k.startswith("llama_model.base_model.model.") and "lora_A" in k for k in legacy)
    assert "llama_proj.weight" in legacy
    model = build_model(env.config("stage_3"))
    assert {"lora", "input_proj", "token_rows"} <= legacy_lib.import_legacy(model, checkpoint / "pytorch_model.pt")


def test_finetune_8bit_from_stage_3(env, stage_3, tmp_path):
    out = run(env, "fine_tuning", tmp_path / "finetune", *repeated("fine_tuning", stage_3))
    assert_falls([r["loss"] for r in metrics(out)], "8-bit fine-tune")
    checkpoint = assert_run_folder(out, STEPS)
    log = (out / "train.log").read_text()
    assert "optimizer: bitsandbytes AdamW8bit" in log and "quantization 8bit" in log
    # the fine-tuned delta loads into a fresh 8-bit model
    from nextgpt.checkpoint import delta as checkpoint_lib
    from nextgpt.model.nextgpt import build_model

    cfg = env.config("fine_tuning", f"train.output_dir={out}")
    model = build_model(cfg)
    assert "lora" in checkpoint_lib.load_delta(model, out)["loaded"]
    assert checkpoint_lib.resolve_checkpoint(out) == checkpoint


# -- resume -----------------------------------------------------------------------------------------------------

class Crash(Exception):
    pass


def test_resume_after_crash_is_bit_exact(env, tmp_path, monkeypatch):
    """Stage 3 (LoRA + projectors + token rows), 2 datasets, micro 2 x accumulation 2 (8 steps per epoch): a crash
    inside step 8 loses it; the run resumes from checkpoint-6 mid-epoch, crosses into epoch 1 and ends with
    exactly the weights (and losses) of an uninterrupted 10-step run."""
    from nextgpt.data import collate

    sets = ["data.datasets=[audio_instruction,llava_instruction]", "train.micro_batch_size=2",
            "train.gradient_accumulation_steps=2", "train.max_steps=10", "train.save_every=3", "train.keep_last=2",
            "train.init_from="]
    whole = run(env, "stage_3", tmp_path / "whole", *sets)

    calls = {"n": 0}
    original = collate.Collator.__call__

    def crashing(self, batch):
        calls["n"] += 1
        if calls["n"] == 15:  # the 15th micro-batch = the first half of step 8
            raise Crash("injected")
        return original(self, batch)

    monkeypatch.setattr(collate.Collator, "__call__", crashing)
    run(env, "stage_3", tmp_path / "cut", *sets, expect=2)  # one `error:` line; the traceback in train.log
    assert "Crash: injected" in (tmp_path / "cut" / "train.log").read_text()
    monkeypatch.setattr(collate.Collator, "__call__", original)
    cut = tmp_path / "cut"
    assert (cut / "latest").read_text().strip() == "checkpoint-6" and not (cut / "done.json").exists()
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]

    run(env, "stage_3", cut, *sets)  # --resume auto is the default
    assert "resumed from" in (cut / "train.log").read_text()
    expected, got = delta_tensors(whole / "checkpoint-10"), delta_tensors(cut / "checkpoint-10")
    assert sorted(expected) == sorted(got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    # metrics.jsonl: the crashed run's step 7 was dropped on resume and redone, identically
    assert [r["step"] for r in metrics(cut)] == list(range(1, 11))
    assert [r["loss"] for r in metrics(cut)] == [r["loss"] for r in metrics(whole)]
    state_whole = torch.load(whole / "checkpoint-10" / "state" / "rank_0.pt", weights_only=False)
    state_cut = torch.load(cut / "checkpoint-10" / "state" / "rank_0.pt", weights_only=False)
    assert state_whole["sampler"] == state_cut["sampler"] and state_whole["sampler"]["epoch"] == 1
    assert state_whole["weights_sha256"] == state_cut["weights_sha256"]


def test_rerun_of_a_finished_run_trains_nothing(env, stage_1):
    before = (stage_1 / "done.json").read_text()
    run(env, "stage_1", stage_1, *repeated("stage_1"))  # auto: resumes at the final step, trains nothing
    assert len(metrics(stage_1)) == STEPS
    assert json.loads((stage_1 / "done.json").read_text())["step"] == json.loads(before)["step"]


# -- non-finite losses ------------------------------------------------------------------------------------------

def nan_on_calls(monkeypatch, bad_calls):
    from nextgpt.model import nextgpt as model_lib

    calls = {"n": 0}
    original = model_lib.NextGPT.forward

    def forward(self, batch):
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    monkeypatch.setattr(model_lib.NextGPT, "forward", forward)


def test_nonfinite_loss_is_skipped_and_counted(env, tmp_path, monkeypatch):
    nan_on_calls(monkeypatch, {3})
    out = run(env, "stage_1", tmp_path / "nan", *repeated("stage_1"), "train.max_steps=4")
    assert json.loads((out / "done.json").read_text())["bad_steps"] == 1
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] for r in metrics(out))  # no NaN reached the optimizer
    assert "non-finite loss nan (1 so far)" in (out / "train.log").read_text()


def test_too_many_nonfinite_losses_abort(env, tmp_path, monkeypatch, capsys):
    nan_on_calls(monkeypatch, {2, 3, 4})
    run(env, "stage_1", tmp_path / "abort", *repeated("stage_1"), "train.max_bad_steps=2", expect=1)
    err = capsys.readouterr().err
    assert "error: 3 non-finite losses, more than train.max_bad_steps (2)" in err
    assert not (tmp_path / "abort" / "done.json").exists()
    assert not torch.distributed.is_initialized()



def test_error_inside_the_loop_comes_after_the_closed_progress_bar(env, tmp_path, monkeypatch, capsys):
    nan_on_calls(monkeypatch, {1})
    run(env, "stage_1", tmp_path / "abort", *repeated("stage_1"), "train.max_bad_steps=0", expect=1)
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if "error: " in line]
    assert len(errors) == 1 and lines[errors[0]].startswith("error: 1 non-finite losses"), lines[-5:]
    assert errors[0] == len(lines) - 1, f"printed after the error line: {lines[errors[0] + 1:]}"


# -- bad records -------------------------------------------------------------------------------------------------

def broken_audiocap(env, tmp_path):
    """A hard-linked copy of the toy data whose audiocap.json record 1 has no caption and whose record 4's audio
    (and its cached feature) is gone; files are replaced, never edited in place (the links share the originals)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(env.data, data, copy_function=os.link)
    path = data / "T_X_pair_data" / "audiocap" / "audiocap.json"
    records = json.loads(path.read_text())
    del records[1]["caption"]
    path.unlink()
    path.write_text(json.dumps(records))
    (data / "T_X_pair_data" / "audiocap" / "audios" / records[4]["audio_name"]).unlink()
    (data / "features" / f"{records[4]['audio_name']}.npy").unlink()
    return data, path, [f"data.root={data}", f"data.embed_dir={data / 'embed'}",
                        f"data.feature_dir={data / 'features'}"]


def test_bad_records_fail_in_one_line_naming_the_first(env, tmp_path, capsys):
    _, path, sets = broken_audiocap(env, tmp_path)
    run(env, "stage_1", tmp_path / "out", *repeated("stage_1"), *sets, expect=2)
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith(f"error: data validation failed: {path} record 1: missing field 'caption' (+1 more; "
                           "run code/validate_data.py --config "), last
    assert not (tmp_path / "out" / "done.json").exists()


def test_skip_bad_records_counts_and_leaves_them_out(env, tmp_path, capsys):
    _, path, sets = broken_audiocap(env, tmp_path)
    out = run(env, "stage_1", tmp_path / "out", *repeated("stage_1"), *sets, "data.skip_bad_records=true",
              "train.micro_batch_size=10", "train.max_steps=2", "train.save_every=0")
    log = (out / "train.log").read_text()
    assert f"skipping 2 bad record(s) in audiocap_enc (data.skip_bad_records; 12 records): {path} record 1: " \
           "missing field 'caption'" in log
    assert "data: audiocap_enc 10 samples" in log        # both records left out of training, the other 10 kept
    assert json.loads((out / "done.json").read_text())["step"] == 2
    # a problem that is not one record's (a dataset that does not exist) still fails
    run(env, "stage_1", tmp_path / "out2", *repeated("stage_1"), *sets, "data.skip_bad_records=true",
        "data.datasets=[audiocap_enc,nope]", expect=2)
    assert "nope" in capsys.readouterr().err.strip().splitlines()[-1]


# -- configuration errors (before any model is built) -----------------------------------------------------------

def test_fp16_json_on_cpu_is_a_clear_error(env, tmp_path, capsys):
    run(env, "stage_1", tmp_path / "x", extra=["--ds_config", str(DSCONFIG / "fp16.json")], expect=2)
    err = capsys.readouterr().err.strip()
    assert err.endswith("fp16 is not supported on CPU by DeepSpeed; use code/dsconfig/cpu.json (bf16/fp32)")
    assert err.startswith("error: ") and "fp16.json" in err and "Traceback" not in err


def test_dsconfig_contradiction_names_both_files(env, tmp_path, capsys):
    ds = json.loads((DSCONFIG / "cpu.json").read_text())
    ds["train_batch_size"] = 2  # the original's value, with the tiny YAML's micro_batch_size 4 on one process
    path = tmp_path / "original.json"
    path.write_text(json.dumps(ds))
    run(env, "stage_1", tmp_path / "x", extra=["--ds_config", str(path)], expect=2)
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "original.json" in err and "stage_1.yaml" in err
    assert "train_batch_size=2" in err and "x world size 1" in err and "\n" not in err


def test_unknown_config_key_is_an_error(env, tmp_path, capsys):
    run(env, "stage_1", tmp_path / "x", "train.no_such_key=1", expect=2)
    assert "unknown key" in capsys.readouterr().err


# -- two processes ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_process_launch_matches_one_process(env, tmp_path):
    """`deepspeed --num_gpus 2` (CPU, gloo): micro 2 on 2 ranks == micro 2 x accumulation 2 on one process (one
    dataset, so both read the same samples in the same order), within 1e-5; both ranks hold identical weights."""
    common = ["data.datasets=[cc3m_enc]", "train.micro_batch_size=2", "train.max_steps=4", "train.save_every=2",
              "train.init_from="]
    two = tmp_path / "two"
    launch_train(env.argv("stage_1", f"train.output_dir={two}", *common), timeout=300)
    assert "rank 0/2" in (two / "train.log").read_text()

    one = run(env, "stage_1", tmp_path / "one", *common, "train.gradient_accumulation_steps=2")
    for step in (2, 4):
        ranks = [torch.load(two / f"checkpoint-{step}" / "state" / f"rank_{r}.pt", weights_only=False)
                 for r in (0, 1)]
        assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    expected, got = delta_tensors(one / "checkpoint-4"), delta_tensors(two / "checkpoint-4")
    assert sorted(expected) == sorted(got)
    changed = 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5, msg=name)
        changed += not torch.equal(expected[name], delta_tensors(one / "checkpoint-2")[name])
    assert changed  # steps 3-4 (lr > 0) moved the weights
    # the logged losses are global-batch means in both runs
    one_losses, two_losses = [r["loss"] for r in metrics(one)], [r["loss"] for r in metrics(two)]
    assert len(one_losses) == 4 and two_losses == pytest.approx(one_losses, abs=1e-5)


# -- the real ZeRO-Offload path ---------------------------------------------------------------------------------

def test_offload_without_a_compiler_is_one_line_at_start(env, tmp_path, capsys, monkeypatch):
    """offload.json's DeepSpeedCPUAdam is built at first use; without a C++ compiler train.py says so in one line
    before it loads anything (nextgpt.training.deepspeed.check_compiled_ops), not minutes later inside
    deepspeed.initialize."""
    import shutil

    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool, *a, **k: None if tool == "c++" else which(tool, *a, **k))
    run(env, "stage_1", tmp_path / "x", extra=["--ds_config", str(DSCONFIG / "offload.json")], expect=2)
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: DeepSpeed builds its cpu_adam op at first use with c++ + ninja, and c++ is not")
    assert err.endswith("offload.json") and "\n" not in err
    assert not (tmp_path / "x" / "checkpoint-1").exists()


@pytest.mark.slow
def test_offload_json_runs_with_deepspeed_cpu_adam(env, tmp_path):
    """offload.json (bf16, ZeRO-2, optimizer states on the CPU): DeepSpeedCPUAdam is compiled on first use (~40 s
    on an idle 2-core machine) and cached in TORCH_EXTENSIONS_DIR (torch's default: ~/.cache/torch_extensions)."""
    out = run(env, "stage_1", tmp_path / "offload", *repeated("stage_1"), "train.max_steps=4",
              extra=["--ds_config", str(DSCONFIG / "offload.json")])
    log = (out / "train.log").read_text()
    assert "bfloat16" in log and "DeepSpeedCPUAdam" in log
    losses = [r["loss"] for r in metrics(out)]
    assert losses[3] < losses[2]
