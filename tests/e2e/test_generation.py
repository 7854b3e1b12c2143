"""code/inference.py end to end (prompt (+ media) -> reply text and png / mp4 / wav files) and nextgpt.model.generate,
on the tiny checkpoints with a programmed LLM. The parts that load no model: tests/unit/model/test_inference.py."""

from __future__ import annotations

import pytest

import inference
from tiny import programmed_llm


# ---------------------------------------------------------------------------------------------------------------
# End to end through inference.main on the tiny checkpoints, with a *programmed* LLM (scripts/tiny/programmed_llm.py:
# greedy generation walks WORD -> [IMG0..3] -> [VID0..23] -> [AUD0..7] -> </s>, or WORD -> </s> for the "text" delta).

@pytest.fixture(scope="module")
def programmed(tiny_env, tmp_path_factory):
    return programmed_llm.build(tiny_env, tmp_path_factory.mktemp("programmed"))


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
        assert image.size == (settings.image.width, settings.image.height)
    with av.open(str(tmp_path / "video_0.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert float(container.streams.video[0].average_rate) == settings.video.fps
    assert np.stack(frames).shape == (settings.video.frames, settings.video.height, settings.video.width, 3)
    waveform, rate = soundfile.read(str(tmp_path / "audio_0.wav"))
    assert rate == 16000 and len(waveform) == int(settings.audio.seconds * rate)



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
    from nextgpt.checkpoint import delta as checkpoint
    from nextgpt.checkpoint import legacy as legacy_lib
    from nextgpt.model.nextgpt import build_model

    cfg = tiny_env.config("stage_3", *programmed["overrides"])
    model = build_model(cfg)
    checkpoint.load_delta(model, programmed["deltas"]["signal"])
    legacy = legacy_lib.export_legacy(model, tmp_path / "legacy" / "pytorch_model.pt", dtype=None)
    argv = tiny_env.argv("stage_3", *programmed["overrides"])
    out = tmp_path / "out"
    code = inference.main([*argv, "--ckpt", str(legacy), "--out", str(out), "--prompt", "Tell me a joke."])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert (out / "reply_0.txt").read_text().strip().replace(" ", "").endswith(programmed["signal_text"])
    assert (out / "image_0.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# nextgpt.model.generate: the one generation path (inference.py, app.py, evaluate.py)

@pytest.fixture(scope="module")
def signal_model(tiny_env, programmed):
    from nextgpt.checkpoint.load import load_model

    cfg = tiny_env.config("stage_3", *programmed["overrides"])
    model, info = load_model(cfg, programmed["deltas"]["signal"])
    return model, info


def test_batch_equals_one_at_a_time_and_rows_keep_their_media(tiny_env, signal_model):
    """Left-padded batch rows give the same ids and conditioning as each conversation alone (greedy)."""
    import torch

    from nextgpt.data.types import Media
    from nextgpt.model.generate import Conversation, Sampling, generate

    model, _ = signal_model
    image = next((tiny_env.data / "T_X_pair_data" / "cc3m" / "images").iterdir())
    _ = tiny_env.imagebind
    conversations = [Conversation.of("Show me everything"),
                     Conversation.of("a much longer question about the picture, please", [
                         Media("image", str(image), image.name)])]
    sampling = Sampling(max_new_tokens=12, do_sample=False)
    batch = generate(model, conversations, sampling, seed=0)
    alone = [generate(model, [c], sampling, seed=0)[0] for c in conversations]
    for together, single in zip(batch, alone):
        assert together.token_ids == single.token_ids and together.text == single.text
        assert [o.modality for o in together.outputs] == ["image"] == [o.modality for o in single.outputs]
        torch.testing.assert_close(together.outputs[0].conditioning, single.outputs[0].conditioning,
                                   rtol=1e-5, atol=1e-5)
        assert together.truncated == ["video"]                 # 12 tokens: WORD, [IMG0..3], 7 of [VID0..23]
        assert "[IMG0]" not in together.display_text and together.display_text


def test_stream_yields_text_then_the_reply_with_media(tiny_env, signal_model, programmed, tmp_path):
    from nextgpt.model.generate import Conversation, Reply, Sampling, stream
    from nextgpt.model.decoders import Decoders

    model, _ = signal_model
    decoders = Decoders(model.cfg)
    items = list(stream(model, Conversation.of("Show me everything"), Sampling(max_new_tokens=6, do_sample=False),
                        seed=1, decoders=decoders, out_dir=tmp_path))
    *pieces, reply = items
    assert isinstance(reply, Reply) and pieces and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces).replace(" ", "").startswith(programmed["word"])
    assert [o.modality for o in reply.outputs] == ["image"]
    assert reply.outputs[0].path == tmp_path / "image_0.png" and reply.outputs[0].path.is_file()


def test_multi_turn_history_rebuilds_the_signal_block(signal_model):
    from nextgpt.data.conversation import prompt_for_generation
    from nextgpt.data.types import Turn
    from nextgpt.model.generate import Conversation, Sampling, generate

    model, _ = signal_model
    sampling = Sampling(max_new_tokens=6, do_sample=False)
    (first,) = generate(model, [Conversation.of("Show me everything")], sampling, seed=0)
    history = Conversation([Turn("human", "Show me everything"), first.as_turn(), Turn("human", "again")])
    ids = prompt_for_generation(history.turns, [], model.tokenizer, model.token_ids).input_ids
    image_block = model.token_ids.signal["image"]
    assert any(ids[i:i + len(image_block)] == image_block for i in range(len(ids)))
    (second,) = generate(model, [history], sampling, seed=0)
    assert [o.modality for o in second.outputs] == ["image"]


def test_too_long_conversation_and_bad_sampling_are_one_line_errors(signal_model):
    from nextgpt.model.generate import Conversation, Sampling, generate

    model, _ = signal_model
    context = model.causal_lm.config.max_position_embeddings
    with pytest.raises(ValueError, match=r"the conversation is \d+ tokens; the model's context is"):
        generate(model, [Conversation.of("word " * context)], Sampling(max_new_tokens=2), seed=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Sampling(temperature=0.0, do_sample=True)


def test_checkpoint_info_reads_meta(signal_model, programmed, tmp_path):
    from nextgpt.checkpoint.load import checkpoint_info

    _, info = signal_model
    assert (info.kind, info.stage, info.step) == ("delta", 3, 0)
    assert "stage 3, step 0" in info.describe()
    with pytest.raises(FileNotFoundError, match="nowhere: checkpoint not found"):
        checkpoint_info(tmp_path / "nowhere")
