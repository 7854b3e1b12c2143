"""code/inference.py: prompt (+ media) -> reply text and png / mp4 / wav files, on the tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

import inference
from nextgpt.config import REPO_ROOT

TINY_STAGE_3 = str(REPO_ROOT / "code" / "config" / "tiny" / "stage_3.yaml")


# ---------------------------------------------------------------------------------------------------------------
# Interactive lines

def test_parse_line_tags_and_flags(tmp_path):
    request = inference.parse_line("<Image>/x/cat.jpg</Image> what is this <audio> a b.wav </audio> and "
                                   "--video 'my clip.mp4' here")
    assert request.text == "what is this and here"
    assert request.media == [("image", Path("/x/cat.jpg")), ("audio", Path("a b.wav")),
                             ("video", Path("my clip.mp4"))]


def test_parse_line_plain_text_and_errors():
    assert inference.parse_line("  show me a red circle  ").media == []
    assert inference.parse_line("  show me a red circle  ").text == "show me a red circle"
    with pytest.raises(ValueError, match="--image needs a file path"):
        inference.parse_line("describe --image")
    assert inference.parse_line("it's a \"red\" one").text == "it's a \"red\" one"


def test_check_media_names_the_file(tmp_path):
    missing = inference.Request("hi", [("image", tmp_path / "nope.png")])
    with pytest.raises(FileNotFoundError, match="nope.png: image file not found"):
        inference.check_media(missing)
    wrong = tmp_path / "sound.wav"
    wrong.write_bytes(b"x")
    with pytest.raises(ValueError, match="sound.wav: not a image file"):
        inference.check_media(inference.Request("hi", [("image", wrong)]))


def test_missing_checkpoint_is_one_clear_line(tmp_path, capsys):
    code = inference.main(["--config", TINY_STAGE_3, "--ckpt", str(tmp_path / "no_such_delta"),
                           "--prompt", "hello"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "no_such_delta: checkpoint not found" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# End to end through inference.main on the tiny checkpoints, with a *programmed* LLM.
#
# A random tiny LLM emits random ids, so a test cannot wait for it to produce a signal block. Instead the tiny
# Vicuna is turned into a lookup table: with every attention o_proj and MLP down_proj zeroed, the last hidden state
# is RMSNorm(embedding of the current token), so the greedy next token is the lm_head row that points along the
# current token's embedding. Rows are set (orthonormal embeddings) so that generation walks
#     <prompt ends with t0> -> WORD -> [IMG0..3] -> [VID0..23] -> [AUD0..7] -> </s>        ("signal" delta)
#     <prompt ends with t0> -> WORD -> </s>                                                 ("text" delta)
# The base rows (t0, WORD, </s>) live in the LLM folder, the 38 new rows in the delta, exactly as after training.
# Everything after that is the real code: prompt template, generate, signal-block scan, output projectors,
# diffusers pipelines, writers.

SCALE = 10.0


@pytest.fixture(scope="module")
def programmed(tiny_env, tmp_path_factory):
    import torch
    from transformers import LlamaForCausalLM

    from nextgpt import checkpoint
    from nextgpt.data.conversation import prompt_for_generation
    from nextgpt.model import llm as llm_utils
    from nextgpt.model.nextgpt import build_model, set_trainable
    from nextgpt.tokens import load_tokenizer

    root = tmp_path_factory.mktemp("programmed")
    tokenizer, token_ids = load_tokenizer(tiny_env.ckpt / "vicuna")
    prompt_ends = {prompt_for_generation(text, [], tokenizer, token_ids).input_ids[-1]
                   for text in ("Show me everything", "Tell me a joke.")}
    assert len(prompt_ends) == 1, "the generation prompt should end with the same token whatever the question"
    (t0,) = prompt_ends
    word = tokenizer.encode("Sure", add_special_tokens=False)[-1]
    eos = token_ids.eos
    new_ids = token_ids.new_token_ids                                  # <Img>, </Img>, [IMG0..3], [VID..], [AUD..]
    signal = [i for m in ("image", "video", "audio") for i in token_ids.signal[m]]

    llm = LlamaForCausalLM.from_pretrained(str(tiny_env.ckpt / "vicuna"))
    hidden = llm.config.hidden_size
    basis = torch.linalg.qr(torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(0)))[0].T
    vector = {t0: basis[0], word: basis[1], **{token: basis[2 + k] for k, token in enumerate(new_ids)}}
    with torch.no_grad():
        for layer in llm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        llm.model.embed_tokens.weight[t0] = vector[t0]
        llm.model.embed_tokens.weight[word] = vector[word]
        llm.lm_head.weight[word] = SCALE * vector[t0]
        # </s> follows WORD (text delta) and the last signal token; [IMG0] beats it after WORD with 2x SCALE
        llm.lm_head.weight[eos] = SCALE * (vector[word] + vector[signal[-1]])
    llm_dir = root / "vicuna"
    llm.save_pretrained(str(llm_dir))
    tokenizer.save_pretrained(str(llm_dir))

    overrides = [f"model.llm={llm_dir}", "inference.do_sample=false"]
    cfg = tiny_env.config("stage_3", *overrides, "train.trainable=[lora,input_proj,output_proj]")
    deltas = {}
    for kind in ("signal", "text"):
        torch.manual_seed(0)
        model = build_model(cfg)
        embed_rows = torch.stack([vector[i] for i in new_ids])                        # (38, D)
        head_rows = torch.zeros(len(new_ids), hidden)
        if kind == "signal":
            chain = [word] + signal
            for previous, token in zip(chain, chain[1:]):
                head_rows[new_ids.index(token)] = SCALE * vector[previous] * (2 if previous == word else 1)
        llm_utils.set_token_matrix(model.llm, "embed_tokens", embed_rows, model.token_ids)
        llm_utils.set_token_matrix(model.llm, "lm_head", head_rows, model.token_ids)
        set_trainable(model, cfg)
        deltas[kind] = checkpoint.save_delta(model, root / f"delta_{kind}", cfg, {"stage": 3, "step": 0})
    word_text = tokenizer.decode([word]).strip()
    signal_text = "".join(tokenizer.convert_ids_to_tokens(signal))
    return {"overrides": overrides, "deltas": deltas, "word": word_text, "signal_text": signal_text}


def run_main(tiny_env, programmed, kind, out, *arguments, extra=()):
    argv = tiny_env.argv("stage_3", *programmed["overrides"], *extra)
    return inference.main([*argv, "--ckpt", str(programmed["deltas"][kind]), "--out", str(out), *arguments])


def test_end_to_end_image_in_image_video_audio_out(tiny_env, programmed, tmp_path, capsys):
    import av
    import numpy as np
    import soundfile
    from PIL import Image

    cfg = tiny_env.config("stage_3")
    settings = cfg.inference
    image_in = next((tiny_env.data / "T_X_pair_data" / "cc3m" / "images").iterdir())
    _ = tiny_env.imagebind                                  # the tiny ImageBind encodes the input image
    code = run_main(tiny_env, programmed, "signal", tmp_path, "--prompt", "Show me everything",
                    "--image", str(image_in), "--seed", "3")
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio_0.wav", "image_0.png", "reply_0.txt",
                                                           "video_0.mp4"]
    reply = (tmp_path / "reply_0.txt").read_text().strip()
    assert reply.startswith(programmed["word"]) and reply.replace(" ", "").endswith(programmed["signal_text"])
    assert f"assistant: {reply}" in printed
    for name in ("image_0.png", "video_0.mp4", "audio_0.wav", "reply_0.txt"):
        assert f"wrote {tmp_path / name}" in printed

    with Image.open(tmp_path / "image_0.png") as image:
        assert image.size == (settings.image_width, settings.image_height)
    with av.open(str(tmp_path / "video_0.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert float(container.streams.video[0].average_rate) == settings.video_fps
    assert np.stack(frames).shape == (settings.video_frames, settings.video_height, settings.video_width, 3)
    waveform, rate = soundfile.read(str(tmp_path / "audio_0.wav"))
    assert rate == 16000 and len(waveform) == int(settings.audio_seconds * rate)



def test_text_only_reply_writes_no_media(tiny_env, programmed, tmp_path, capsys):
    code = run_main(tiny_env, programmed, "text", tmp_path, "--prompt", "Tell me a joke.")
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert [p.name for p in tmp_path.iterdir()] == ["reply_0.txt"]
    assert (tmp_path / "reply_0.txt").read_text().strip() == programmed["word"]
    assert "loading the" not in printed                    # no decoder was loaded


def test_truncated_signal_block_is_reported(tiny_env, programmed, tmp_path, capsys):
    code = run_main(tiny_env, programmed, "signal", tmp_path, "--prompt", "Show me everything",
                    extra=("inference.max_new_tokens=3",))
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "the image signal block was cut off at max_new_tokens=3" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["reply_0.txt"]


def test_interactive_session_loads_once_and_numbers_outputs(tiny_env, programmed, tmp_path, capsys, monkeypatch):
    import io

    image_in = next((tiny_env.data / "T_X_pair_data" / "cc3m" / "images").iterdir())
    _ = tiny_env.imagebind
    lines = f"Show me everything\n\n<Image>{image_in}</Image> again please\n--audio /nowhere.wav hi\nexit\nnever\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    # 6 new tokens: WORD, [IMG0..3] complete, [VID0] cut off -> one image per request, the video reported
    argv = tiny_env.argv("stage_3", *programmed["overrides"], "inference.max_new_tokens=6")
    code = inference.main([*argv, "--ckpt", str(programmed["deltas"]["signal"]), "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["image_0.png", "image_1.png", "reply_0.txt", "reply_1.txt"]
    assert printed.count("loaded ") == 1                     # the LLM + delta once
    assert printed.count("loading the image decoder") == 1   # each pipeline once
    assert printed.count("the video signal block was cut off") == 2
    assert printed.count("assistant: ") == 2                 # the line after `exit` is never read
    assert "error: /nowhere.wav: audio file not found" in printed


def test_legacy_pytorch_model_pt(tiny_env, programmed, tmp_path, capsys):
    """An original-layout pytorch_model.pt loads through import_legacy and gives the same reply."""
    from nextgpt import checkpoint
    from nextgpt.model.nextgpt import build_model

    cfg = tiny_env.config("stage_3", *programmed["overrides"])
    model = build_model(cfg)
    checkpoint.load_delta(model, programmed["deltas"]["signal"])
    legacy = checkpoint.export_legacy(model, tmp_path / "legacy" / "pytorch_model.pt", dtype=None)
    argv = tiny_env.argv("stage_3", *programmed["overrides"])
    out = tmp_path / "out"
    code = inference.main([*argv, "--ckpt", str(legacy), "--out", str(out), "--prompt", "Tell me a joke."])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert (out / "reply_0.txt").read_text().strip().replace(" ", "").endswith(programmed["signal_text"])
    assert (out / "image_0.png").exists()
