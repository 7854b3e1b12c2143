"""Bring your own data / LLM / export / tracking (issue 18), on the tiny setup.

- scripts/prepare_data.py: each raw format (folder + CSV/JSONL, img2dataset, AudioCaps, WebVid) -> the pair layout and
  catalog entries the real readers load; missing rows are listed, not fatal.
- model.llm = tiny Qwen2 (chat template, no BOS) and tiny Mistral (GQA, vicuna_v0): stages 1 -> 2 -> 3 train through
  code/train.py, and inference writes an image from a *programmed* delta (see tests/e2e/test_generation.py for the idea:
  with o_proj / down_proj zeroed the greedy next token is a lookup table, so generation walks prompt -> [IMG0..3] ->
  eos on the real template, generate, signal scan, projector and decoder code).
- code/export.py: the merged HF folder gives the project model's logits within 1e-5 (fp32 CPU) with random LoRA and
  token rows; legacy .pt imports back; an 8-bit base is refused.
- train.report_to: [wandb] in offline mode writes its run file; train.module_lr builds per-group lrs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import prepare_data
from nextgpt import config as config_lib

REPO = config_lib.REPO_ROOT
SCALE = 10.0


# -- prepare_data -------------------------------------------------------------------------------------------------

def _catalog(tmp_path):
    path = tmp_path / "catalog.yaml"
    path.write_text((REPO / "code" / "config" / "catalog.yaml").read_text())
    return path


def _read(tmp_path, catalog, name):
    from nextgpt.data.readers import read_dataset

    cfg = config_lib.load(REPO / "code" / "config" / "tiny" / "stage_1.yaml",
                          [f"data.root={tmp_path / 'data'}", f"data.catalog={catalog}"])
    return read_dataset(cfg, name)


def _image(path, colour=(200, 10, 10)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_prepare_folder_csv_and_jsonl(tmp_path):
    media = tmp_path / "raw"
    _image(media / "a.jpg")
    _image(media / "sub" / "b.png")
    (media / "empty.jpg").write_bytes(b"")
    rows = [("a.jpg", "A red square."), ("sub/b.png", "another   square"), ("gone.jpg", "missing"),
            ("empty.jpg", "empty file"), ("a.jpg", "")]
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "text"])
        writer.writerows(rows)
    catalog = _catalog(tmp_path)
    root = tmp_path / "data"
    assert prepare_data.main(["folder", "--name", "mine", "--modality", "image", "--media", str(media),
                              "--captions", str(tmp_path / "captions.csv"), "--root", str(root),
                              "--catalog", str(catalog)]) == 0
    records = json.loads((root / "T_X_pair_data" / "mine" / "mine.json").read_text())
    assert records == [{"image_name": "mine_a.jpg", "caption": "A red square."},
                       {"image_name": "mine_b.png", "caption": "another square"}]
    missing = (root / "T_X_pair_data" / "mine" / "missing.txt").read_text().splitlines()
    assert len(missing) == 3 and "gone.jpg" in missing[0] and "empty" in missing[1] and "empty caption" in missing[2]
    enc, dec = _read(tmp_path, catalog, "mine_enc"), _read(tmp_path, catalog, "mine_dec")
    assert [s.media[0].name for s in enc] == ["mine_a.jpg", "mine_b.png"]
    assert all(Path(s.media[0].path).is_file() for s in enc)
    assert [t.caption for s in dec for t in s.targets] == ["a red square.", "another square"]   # normalised

    # JSONL into the same catalog: a second dataset; re-running the first is a no-op; a clash is an error
    (tmp_path / "c.jsonl").write_text(json.dumps({"file": "a.jpg", "caption": "red"}) + "\n")
    assert prepare_data.main(["folder", "--name", "mine2", "--modality", "image", "--media", str(media),
                              "--captions", str(tmp_path / "c.jsonl"), "--root", str(root), "--catalog",
                              str(catalog), "--link"]) == 0
    assert (root / "T_X_pair_data" / "mine2" / "images" / "mine2_a.jpg").is_symlink()
    assert len(_read(tmp_path, catalog, "mine2_dec")) == 1
    text = catalog.read_text()
    assert text.count("mine_enc:") == 1 and "# Dataset catalog" in text            # comments kept
    assert prepare_data.main(["folder", "--name", "mine", "--modality", "image", "--media", str(media),
                              "--captions", str(tmp_path / "captions.csv"), "--root", str(root),
                              "--catalog", str(catalog)]) == 0
    assert catalog.read_text() == text
    assert prepare_data.main(["folder", "--name", "mine", "--modality", "audio", "--media", str(media),
                              "--captions", str(tmp_path / "captions.csv"), "--root", str(root),
                              "--catalog", str(catalog)]) == 2            # no audio files at all: one error line


def test_prepare_img2dataset(tmp_path, capsys):
    src = tmp_path / "laion"
    _image(src / "00000" / "000000001.jpg")
    (src / "00000" / "000000001.txt").write_text("a photo of a cat")
    _image(src / "00001" / "000010000.jpg")
    (src / "00001" / "000010000.json").write_text(json.dumps({"caption": "a dog", "url": "http://x"}))
    (src / "00001" / "000010001.txt").write_text("failed download")          # caption without image
    catalog = _catalog(tmp_path)
    assert prepare_data.main(["img2dataset", "--name", "laion", "--src", str(src), "--root",
                              str(tmp_path / "data"), "--catalog", str(catalog)]) == 0
    assert "left out 1 row(s)" in capsys.readouterr().out
    samples = _read(tmp_path, catalog, "laion_enc")
    assert [(s.media[0].name, s.turns[1].text) for s in samples] == [("laion_000000001.jpg", "a photo of a cat"),
                                                                     ("laion_000010000.jpg", "a dog")]


def test_prepare_audiocaps_and_webvid(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "Yabc.wav").write_bytes(b"RIFF0000")             # AudioSet-style name
    (clips / "def_30.flac").write_bytes(b"fLaC0000")          # <youtube_id>_<start>
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        w.writerows([[1, "abc", 0, "a dog barks"], [2, "def", 30, "rain falls"], [3, "zzz", 0, "not downloaded"]])
    catalog = _catalog(tmp_path)
    root = tmp_path / "data"
    assert prepare_data.main(["audiocaps", "--name", "ac", "--csv", str(tmp_path / "train.csv"), "--media",
                              str(clips), "--root", str(root), "--catalog", str(catalog)]) == 0
    records = json.loads((root / "T_X_pair_data" / "ac" / "ac.json").read_text())
    assert records == [{"audio_name": "ac_Yabc.wav", "caption": "a dog barks"},
                       {"audio_name": "ac_def_30.flac", "caption": "rain falls"}]
    assert "zzz" in (root / "T_X_pair_data" / "ac" / "missing.txt").read_text()

    videos = tmp_path / "videos"
    (videos / "000001_000050").mkdir(parents=True)
    (videos / "000001_000050" / "111.mp4").write_bytes(b"\x00\x00\x00\x18ftyp")
    (videos / "222.mp4").write_bytes(b"\x00\x00\x00\x18ftyp")
    with open(tmp_path / "webvid.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        w.writerows([[111, "u", "PT10S", "000001_000050", "Waves on a beach"], [222, "u", "PT5S", "x", "A city"],
                     [333, "u", "PT5S", "x", "gone"]])
    assert prepare_data.main(["webvid", "--name", "wv", "--csv", str(tmp_path / "webvid.csv"), "--media",
                              str(videos), "--root", str(root), "--catalog", str(catalog)]) == 0
    assert [s.media[0].name for s in _read(tmp_path, catalog, "wv_enc")] == ["wv_111.mp4", "wv_222.mp4"]
    assert len((root / "T_X_pair_data" / "wv" / "missing.txt").read_text().splitlines()) == 1


# -- other LLMs ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llms(tmp_path_factory):
    from tiny import make_tiny_llms

    root = tmp_path_factory.mktemp("tiny_llms")
    assert make_tiny_llms.main(["--out", str(root)]) == 0
    return root


def test_chat_template_masks_and_refuses_markup(tiny_llms):
    from nextgpt.data.conversation import EncodeError, encode, prompt_for_generation
    from nextgpt.data.types import Sample, Target, Turn
    from nextgpt.tokens import load_tokenizer

    tokenizer, token_ids = load_tokenizer(tiny_llms / "qwen2", "chat")
    template = token_ids.template
    assert token_ids.bos is None and not template.bos and template.stop == "<|im_end|>"
    assert template.assistant.endswith("<|im_start|>assistant\n") and template.turn_end == "<|im_end|>\n"
    turns = [Turn("human", "draw a red circle"), Turn("gpt", "here it is", output_modality="image"),
             Turn("human", "thanks"), Turn("gpt", "you are welcome")]
    encoded = encode(Sample(dataset="t", source="s", index=0, turns=turns,
                            targets=[Target("image", "x.npy")]), tokenizer, token_ids, 512)
    supervised = tokenizer.decode([i for i, label in zip(encoded.input_ids, encoded.labels) if label != -100])
    assert supervised == ("here it is" + "".join(f"[IMG{k}]" for k in range(4)) + "<|im_end|>\n"
                          + "you are welcome<|im_end|>\n")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "draw a red circle"}], tokenize=False,
                                             add_generation_prompt=True)
    prompt = prompt_for_generation("draw a red circle", [], tokenizer, token_ids)
    assert tokenizer.decode(prompt.input_ids) == rendered                       # the tokenizer's own template
    with pytest.raises(EncodeError, match="chat template's token"):
        encode(Sample(dataset="t", source="s", index=0, turns=[Turn("human", "hi <|im_start|>"), Turn("gpt", "x")]),
               tokenizer, token_ids, 512)
    with pytest.raises(ValueError, match="no chat_template"):
        load_tokenizer(tiny_llms / "mistral", "chat")


def _programmed_base(source, out, tokenizer, token_ids, last_prompt_id):
    """The LLM of `source` turned into a lookup table (module docstring); -> {token: direction}."""
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(str(source))
    hidden = llm.config.hidden_size
    basis = torch.linalg.qr(torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(0)))[0].T
    new_ids = token_ids.new_token_ids
    vector = {last_prompt_id: basis[0], **{t: basis[1 + k] for k, t in enumerate(new_ids)}}
    with torch.no_grad():
        for layer in llm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        llm.model.embed_tokens.weight[last_prompt_id] = vector[last_prompt_id]
        llm.lm_head.weight[token_ids.eos] = SCALE * vector[token_ids.signal["image"][-1]]   # eos after [IMG3]
    llm.save_pretrained(str(out))
    for f in source.iterdir():                       # tokenizer files as they were (without the 38 tokens)
        if "token" in f.name or f.suffix in (".model", ".jinja"):
            (out / f.name).write_bytes(f.read_bytes())
    return vector


@pytest.mark.parametrize("llm,template", [("qwen2", "chat"), ("mistral", "vicuna_v0")])
def test_llm_through_stages_and_inference(tiny_env, tiny_llms, tmp_path, llm, template, capsys):
    import inference
    import train
    from nextgpt.checkpoint import delta as checkpoint
    from nextgpt.data.conversation import prompt_for_generation
    from nextgpt.model import llm as llm_utils
    from nextgpt.model.nextgpt import build_model
    from nextgpt.model.trainable import set_trainable
    from nextgpt.tokens import load_tokenizer

    tiny_env.embeddings()
    tiny_env.features()
    tokenizer, token_ids = load_tokenizer(tiny_llms / llm, template)
    last = prompt_for_generation("show me a picture", [], tokenizer, token_ids).input_ids[-1]
    base = tmp_path / "base"
    vector = _programmed_base(tiny_llms / llm, base, tokenizer, token_ids, last)
    chosen = [f"model.llm={base}", f"model.template={template}"]

    previous = None
    for stage in ("stage_1", "stage_2", "stage_3"):
        out = tmp_path / stage
        sets = [*chosen, f"train.output_dir={out}", f"train.init_from={previous or ''}", "train.report_to=[]"]
        assert train.main(tiny_env.argv(stage, *sets) + ["--max-steps", "1"]) == 0, capsys.readouterr().err
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(losses) == 1 and all(loss == loss and loss > 0 for loss in losses)
        previous = out
    # a new LLM needs its own stage 1: a projector trained here is refused on the tiny Vicuna (base fingerprint;
    # for Qwen2 the tokenizer's new-token ids differ already)
    with pytest.raises(ValueError, match="base|tokenizer"):
        checkpoint.load_checkpoint(build_model(tiny_env.config("stage_1")), tmp_path / "stage_1")

    # stage 3's checkpoint with the 38 new rows programmed: prompt -> [IMG0..3] -> eos
    cfg = tiny_env.config("stage_3", *chosen)
    model = build_model(cfg)
    checkpoint.load_checkpoint(model, previous)
    new_ids = token_ids.new_token_ids
    chain = [last] + token_ids.signal["image"]
    head_rows = torch.zeros(len(new_ids), model.causal_lm.config.hidden_size)
    for before, token in zip(chain, chain[1:]):
        head_rows[new_ids.index(token)] = SCALE * vector[before]
    llm_utils.set_token_matrix(model.llm, "embed_tokens", torch.stack([vector[i] for i in new_ids]), model.token_ids)
    llm_utils.set_token_matrix(model.llm, "lm_head", head_rows, model.token_ids)
    set_trainable(model, cfg)
    delta = checkpoint.save_delta(model, tmp_path / "programmed", cfg, {"stage": 3, "step": 0})

    out = tmp_path / "infer"
    argv = tiny_env.argv("stage_3", *chosen, "inference.do_sample=false")
    assert inference.main([*argv, "--ckpt", str(delta), "--prompt", "show me a picture", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["image_0.png", "reply_0.txt"]
    assert "[IMG0]" in (out / "reply_0.txt").read_text()


# -- export ---------------------------------------------------------------------------------------------------------

def test_export_hf_logits_legacy_and_8bit_refusal(tiny_env, tmp_path, capsys):
    import export
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nextgpt.checkpoint import delta as checkpoint
    from nextgpt.checkpoint import legacy as legacy_lib
    from nextgpt.model import llm as llm_utils
    from nextgpt.model.nextgpt import build_model
    from nextgpt.model.trainable import set_trainable

    cfg = tiny_env.config("stage_3")
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():                          # a trained-looking delta: LoRA B and the 38 rows non-trivial
        for name, p in llm_utils.lora_parameters(model.llm):
            p.normal_(0, 0.05)
        for name in llm_utils.TOKEN_MATRICES:
            llm_utils.token_rows_parameter(model.llm, name).normal_(0, 0.5)
    set_trainable(model, cfg)
    delta = checkpoint.save_delta(model, tmp_path / "delta", cfg, {"stage": 3, "step": 7})
    model.eval()

    out = tmp_path / "hf"
    (tmp_path / "metrics.json").write_text(json.dumps({"stage_3": {"bleu4": 0.123}}))
    assert export.main(["--ckpt", str(delta), "--out", str(out), "--dtype", "float32", "--metrics",
                        str(tmp_path / "metrics.json")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert len(tokenizer) == len(model.tokenizer)
    assert tokenizer.convert_ids_to_tokens(model.token_ids.new_token_ids)[:3] == ["<Img>", "</Img>", "[IMG0]"]
    ids = torch.tensor([[model.token_ids.bos, *model.token_ids.new_token_ids[:8],
                         *tokenizer.encode("a red circle", add_special_tokens=False)]])
    with torch.no_grad():
        ours, theirs = model.causal_lm(input_ids=ids).logits, exported(input_ids=ids).logits
    assert not any("lora" in n for n, _ in exported.named_parameters())
    assert (ours - theirs).abs().max().item() < 1e-5
    projectors = load_file(str(out / "projectors.safetensors"))
    assert torch.equal(projectors["input_proj.weight"], model.input_proj.weight.detach())
    card = (out / "README.md").read_text()
    assert "stage 3, step 7" in card and "audio_instruction" in card and '"bleu4": 0.123' in card
    assert json.loads((out / "nextgpt.json").read_text())["template"] == "vicuna_v0"

    legacy = tmp_path / "legacy"
    assert export.main(["--ckpt", str(delta), "--out", str(legacy), "--format", "legacy", "--dtype", "float32"]) == 0
    fresh = build_model(cfg)
    legacy_lib.import_legacy(fresh, legacy / "pytorch_model.pt")
    with torch.no_grad():
        assert (fresh.eval().causal_lm(input_ids=ids).logits - ours).abs().max().item() < 1e-5

    capsys.readouterr()
    assert export.main(["--ckpt", str(delta), "--out", str(tmp_path / "q"), "--set", "model.quantization=8bit"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.quantization=8bit: refusing to merge") and err.count("\n") == 1


# -- tracking and per-module learning rates ----------------------------------------------------------------------------

def test_wandb_offline_run_writes_its_files(tiny_env, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import train

    tiny_env.features()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert train.main(tiny_env.argv("stage_1", f"train.output_dir={out}", "train.report_to=[wandb]")
                      + ["--max-steps", "2"]) == 0
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    data = run_file.read_bytes()
    assert b"train/loss" in data and b"micro_batch_size" in data          # scalars and the resolved config
    assert not (out / "tensorboard").exists()                              # not selected: nothing written


def test_module_lr_groups_follow_the_schedule(tiny_env):
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    from nextgpt.training import deepspeed as engine
    from nextgpt.model.nextgpt import build_model
    from nextgpt.model.trainable import set_trainable

    cfg = tiny_env.config("stage_3", "train.lr=1.0e-3", "train.min_lr=1.0e-5", "train.warmup_steps=3",
                          "train.module_lr={lora: 4.0e-3, token_rows: 1.0e-4}")
    model = build_model(cfg)
    set_trainable(model, cfg)
    ds = {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 1.0e-5, "warmup_max_lr": 1.0e-3,
                                                           "warmup_num_steps": 3, "total_num_steps": 10,
                                                           "warmup_type": "linear"}}}
    groups = engine.param_groups(model, cfg)
    ds = engine.build_ds_config(ds, cfg, 1, 10, groups)     # the scheduler's per-group lists
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"input_proj": 1.0e-3, "output_proj": 1.0e-3, "lora": 4.0e-3, "token_rows": 1.0e-4}
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr)
    scheduler = WarmupDecayLR(optimizer, **ds["scheduler"]["params"])
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    now = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert now["lora"] == pytest.approx(4 * now["input_proj"]) and now["token_rows"] == pytest.approx(
        now["input_proj"] / 10)
    with pytest.raises(config_lib.ConfigError, match="module_lr"):
        tiny_env.config("stage_3", "train.module_lr={projector: 1.0}")


def test_wandb_media_are_written_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import numpy as np
    from PIL import Image

    from nextgpt.model.decoders import Decoded
    from nextgpt.training.runlog import RunLog

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = RunLog(tmp_path, True, ["wandb"], {"train": {"lr": 1.0}})
    log.media(3, [("generate/image_0", Decoded("image", Image.new("RGB", (16, 16), (255, 0, 0))), "score 0.5"),
                  ("generate/audio_0", Decoded("audio", np.zeros(1600, np.float32), 16000), None),
                  ("generate/video_0", Decoded("video", np.zeros((4, 16, 16, 3), np.uint8), 4), None)])
    log.close()
    media = sorted(p.suffix for p in (tmp_path / "wandb").glob("offline-run-*/files/media/*/generate/*"))
    assert media == [".gif", ".png", ".wav"]
    quiet = RunLog(tmp_path / "none", True, ["tensorboard"])
    quiet.media(3, [("generate/image_0", Decoded("image", Image.new("RGB", (4, 4))), None)])   # no W&B: nothing
    quiet.close()
    assert not (tmp_path / "none" / "wandb").exists()
