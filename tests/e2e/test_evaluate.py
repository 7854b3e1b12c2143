"""Held-out requests, evaluate_model on programmed replies (emission, alignment, decoding, ImageBind score, report),
code/evaluate.py end to end on the tiny models, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from nextgpt.eval import metrics as M
from nextgpt.eval import run as R

EVAL_CONFIG = Path(__file__).resolve().parents[2] / "code" / "config" / "tiny" / "eval.yaml"


def eval_argv(tiny_env, *extra_overrides: str) -> list[str]:
    argv = ["--config", str(EVAL_CONFIG)]
    for text in [*tiny_env.overrides, *extra_overrides]:
        argv += ["--set", text]
    return argv


def eval_config(tiny_env, *extra_overrides: str):
    from nextgpt import config

    return config.load(EVAL_CONFIG, [*tiny_env.overrides, *extra_overrides])


@pytest.fixture(scope="module")
def tiny_model(tiny_env):
    from nextgpt.model.nextgpt import build_model

    cfg = eval_config(tiny_env)
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


def test_held_out_items_of_every_kind(tiny_env, tiny_model):
    cfg, model = tiny_model
    sets = R.held_out_datasets(cfg, model.tokenizer, model.token_ids)
    # the same records train.py holds out: Dataset.split with the config's fraction and seed
    from nextgpt.data.dataset import build_datasets

    full = build_datasets(cfg, model.tokenizer, model.token_ids, ["cc3m_enc"])["cc3m_enc"]
    held = full.split(cfg.data.eval_fraction, cfg.train.seed)[1]
    assert [s.index for s in sets["cc3m_enc/eval"].samples] == [s.index for s in held.samples]
    items = R.build_items(cfg, sets, limit=2)
    kinds = {(item.dataset.split("/")[0], item.kind, item.requested) for item in items}
    assert ("cc3m_enc", "caption", "text") in kinds and ("alpaca_instruction", "text", "text") in kinds
    assert ("cc3m_dec", "generate", "image") in kinds and ("audio_instruction", "generate", "audio") in kinds
    caption = next(i for i in items if i.dataset.startswith("cc3m_enc"))
    assert caption.conversation.turns[0].text == cfg.train.prompt and caption.conversation.media
    assert caption.references and caption.references[0]
    generate = next(i for i in items if i.dataset.startswith("image_instruction"))
    assert generate.conversation.turns[-1].role == "human" and generate.embed_path.endswith(".npy")
    assert generate.score_text and generate.score_text in generate.conversation.turns[-1].text
    assert len([i for i in items if i.dataset.startswith("cc3m_enc")]) == 2            # limit per dataset
    # teacher-forced held-out loss and token accuracy, as train.py's evaluation (media encoded live here)
    enc = {"cc3m_enc": evaluate._first(sets["cc3m_enc/eval"], 2)}
    loss = R.teacher_forced(model, cfg, enc, R.Options(batch_size=2, progress=False))
    assert loss["heldout_loss"] > 0 and 0 <= loss["token_acc"] <= 1 and not model.training
    # token-weighted (nextgpt.eval.run.heldout_loss): the same numbers however the split is cut into batches
    one = R.teacher_forced(model, cfg, enc, R.Options(batch_size=1, progress=False))
    assert one["heldout_lm"] == pytest.approx(loss["heldout_lm"], rel=1e-4)
    assert one["token_acc"] == pytest.approx(loss["token_acc"], abs=1e-6)
    with pytest.raises(ValueError, match="empty held-out split"):
        R.held_out_datasets(eval_config(tiny_env, "data.eval_fraction=0.0"), model.tokenizer, model.token_ids)


def test_evaluate_model_on_programmed_replies(tiny_env, tiny_model, tmp_path):
    """Replies given by hand (a random tiny LLM emits no signal block): everything after generation is real."""
    from nextgpt.eval.embedders import ImageBindScorer
    from nextgpt.eval.report import write_report
    from nextgpt.model.generate import Conversation, Output, Reply
    from nextgpt.model.decoders import Decoders

    cfg, model = tiny_model
    ids = model.token_ids
    shape = {m: tuple(s) for m, s in model.conditioning_shapes.items()}
    torch.manual_seed(1)
    conditioning = {m: torch.randn(1, *shape[m]) for m in ("image", "audio")}
    target = tmp_path / "target.npy"
    np.save(target, (2 * conditioning["image"][0]).numpy())                   # same direction, twice as long
    ask = Conversation.of("show me a red circle")
    items = [R.Item("d/0", "d", R.GENERATE, ask, "image", embed_path=str(target), score_text="a red circle"),
             R.Item("d/1", "d", R.GENERATE, ask, "image", embed_path=str(target), score_text="a red circle"),
             R.Item("d/2", "d", R.GENERATE, ask, "audio", score_text="a high tone"),
             R.Item("d/3", "d", R.CAPTION, ask, M.TEXT, references=["a red circle on a blue background"]),
             R.Item("d/4", "d", R.CAPTION, ask, M.TEXT, references=["a green square on a white background"]),
             R.Item("d/5", "d", R.TEXT, ask, M.TEXT, references=["six"])]
    replies = [Reply("here", [5, *ids.signal["image"]], [Output("image", conditioning["image"])], display_text="here"),
               Reply("here", [5, 6], display_text="here"),
               Reply("here", [*ids.signal["audio"]], [Output("audio", conditioning["audio"])], display_text="here"),
               Reply("a red circle on a blue background", [5], display_text="a red circle on a blue background"),
               Reply("a green circle", [5], display_text="a green circle"),
               Reply("six", [5, *ids.signal["audio"]], display_text="six")]
    scorer = ImageBindScorer(tiny_env.imagebind, "tiny", tiny_env.ckpt / "stable-diffusion" / "tokenizer")
    options = R.Options(seed=3, decode=1, progress=False)
    decoders = Decoders(cfg, seed=3)
    result, records = R.evaluate_model(model, items, cfg, options, media_dir=tmp_path / "media", decoders=decoders,
                                       scorer=scorer, replies=replies)
    assert result["emission.image"] == 0.5 and result["emission.audio"] == 1.0
    assert result["emission.text"] == pytest.approx(2 / 3)                 # the text reply with a block fails
    assert [r["emission"] for r in records] == ["ok", "none", "ok", "ok", "ok", "extra_blocks"]
    expected = M.alignment(conditioning["image"], 2 * conditioning["image"])
    assert result["l2.image"] == pytest.approx(expected["l2"]) and result["cos.image"] == pytest.approx(1.0)
    assert "l2.audio" not in result                                        # no caption embedding for that item
    assert result["bleu4"] == pytest.approx(M.bleu4({3: replies[3].text, 4: replies[4].text},
                                                    {3: items[3].references, 4: items[4].references}))
    # one image and one audio decoded (--decode 1), written, scored by ImageBind against their captions
    assert sorted(Path(r["media"]).name for r in records if "media" in r) == ["audio_0.wav", "image_0.png"]
    assert -1.0 <= result["imagebind.image"] <= 1.0 and -1.0 <= result["imagebind.audio"] <= 1.0
    # decoding is seeded: the same conditioning decodes to the same image again
    again = decoders.decode("image", conditioning["image"], seed=3)
    assert np.array_equal(np.asarray(again.data), np.asarray(records[0]["decoded"].data))

    run = {"name": "programmed", "slug": "programmed", "path": "", "kind": "base", "stage": None, "step": None,
           "loaded": [], "metrics": result, "records": records}
    paths = write_report(tmp_path, [run], {"config": "tiny", "seed": 3})
    report = paths["report"].read_text()
    assert "| programmed | – |" in report and "emission image" in report and "thumbs/programmed_image_0.png" in report
    assert (tmp_path / "plots" / "emission_image.png").is_file() and (tmp_path / "thumbs").is_dir()
    saved = json.loads(paths["metrics"].read_text())
    assert saved["checkpoints"][0]["metrics"]["emission.image"] == 0.5
    lines = (tmp_path / "programmed" / "replies.jsonl").read_text().splitlines()
    assert len(lines) == len(items) and json.loads(lines[0])["emission"] == "ok"


def test_evaluate_cli_writes_the_report_and_is_deterministic(tiny_env, tmp_path, capsys):
    from nextgpt.checkpoint import delta as checkpoint
    from nextgpt.model.nextgpt import build_model
    from nextgpt.model.trainable import set_trainable

    few = "data.datasets=[cc3m_enc,cc3m_dec,alpaca_instruction]"      # 3 requests: seconds on a busy CPU
    cfg = eval_config(tiny_env, few)
    torch.manual_seed(5)
    model = build_model(cfg)
    set_trainable(model, cfg)
    delta = checkpoint.save_delta(model, tmp_path / "run" / "checkpoint-7", cfg, {"stage": 3, "step": 7})
    (tmp_path / "run" / "latest").write_text("checkpoint-7\n")
    # --no-loss: the held-out loss (test_held_out_items_of_every_kind) would need the caption embeddings
    argv = [*eval_argv(tiny_env, few), "--limit", "1", "--decode", "1", "--seed", "4", "--no-loss", "--ckpt", "base",
            str(tmp_path / "run")]
    assert evaluate.main([*argv, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "| base | – |" in out and "| run/checkpoint-7 | 7 |" in out
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    names = [c["name"] for c in first["checkpoints"]]
    assert names == ["base", "run/checkpoint-7"] and first["checkpoints"][1]["path"] == str(delta)
    for run in first["checkpoints"]:
        assert {"emission.image", "emission.text", "bleu4", "cider_d"} <= set(run["metrics"])
    assert (tmp_path / "a" / "report.md").read_text().count("| run/checkpoint-7 |") == 1
    assert (tmp_path / "a" / "plots" / "emission_image.png").is_file()
    assert evaluate.main([*argv[:argv.index("--ckpt") + 2], "--out", str(tmp_path / "b")]) == 0     # base again
    second = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert first["checkpoints"][0]["metrics"] == second["checkpoints"][0]["metrics"]
    assert (tmp_path / "a" / "base" / "replies.jsonl").read_text() == (tmp_path / "b" / "base" / "replies.jsonl").read_text()


def test_evaluate_bad_inputs_are_one_line_errors(tiny_env, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from nextgpt.checkpoint import delta as checkpoint
    from nextgpt.model.nextgpt import build_model

    def error(*argv) -> str:
        assert evaluate.main([*argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error")]
        # one error line, the last thing printed (progress bars may come before it), no traceback
        assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err[-2000:]
        return errors[0]

    assert "checkpoint not found" in error(*eval_argv(tiny_env), "--ckpt", str(tmp_path / "nothing"))
    assert "empty held-out split" in error(*eval_argv(tiny_env, "data.eval_fraction=0.0"), "--ckpt", "base")
    assert "image decoder is missing" in error(*eval_argv(tiny_env, f"model.decoders.image={tmp_path / 'no_sd'}"),
                                               "--ckpt", "base", "--limit", "1")
    # a delta trained on another base: its token rows are 32 wide where this Vicuna's are 64
    cfg = eval_config(tiny_env)
    other = checkpoint.save_delta(build_model(cfg), tmp_path / "other", cfg, {"stage": 3, "step": 1})
    state = load_file(str(other / "delta.safetensors"))
    state = {k: (v[:, :32].contiguous() if k.startswith("token_rows") else v) for k, v in state.items()}
    save_file(state, str(other / "delta.safetensors"))
    (other / "meta.json").unlink()
    assert "shape" in error(*eval_argv(tiny_env), "--ckpt", str(other), "--limit", "1", "--decode", "0")
