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
    """Plain decoding (--no-force-signal): max_new_tokens cuts the block, and that is said."""
    code = run_main(tiny_env, programmed, "signal", tmp_path, "--prompt", "Show me everything", "--no-force-signal",
                    extra=("inference.max_new_tokens=3",))
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "the image signal block was cut off at max_new_tokens=3" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["reply_0.txt"]


def test_force_signal_starts_no_block_it_cannot_finish_and_require_appends_one(tiny_env, programmed, tmp_path,
                                                                              capsys):
    """inference.force_signal (the default): with 3 new tokens the 4-token image block is not started, so nothing
    is cut; --require image then puts the block at the end of the reply and the image is decoded."""
    code = run_main(tiny_env, programmed, "signal", tmp_path / "forced", "--prompt", "Show me everything",
                    extra=("inference.max_new_tokens=3",))
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "cut off" not in printed and [p.name for p in (tmp_path / "forced").iterdir()] == ["reply_0.txt"]
    code = run_main(tiny_env, programmed, "text", tmp_path / "required", "--prompt", "Tell me a joke.",
                    "--require", "image")
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "no image signal block in the reply; one was put at its end" in printed
    assert sorted(p.name for p in (tmp_path / "required").iterdir()) == ["image_0.png", "reply_0.txt"]
    reply = (tmp_path / "required" / "reply_0.txt").read_text().strip().replace(" ", "")
    assert reply == programmed["word"] + "[IMG0][IMG1][IMG2][IMG3]"


def test_interactive_session_loads_once_and_numbers_outputs(tiny_env, programmed, tmp_path, capsys, monkeypatch):
    import io

    image_in = next((tiny_env.data / "T_X_pair_data" / "cc3m" / "images").iterdir())
    _ = tiny_env.imagebind
    lines = f"Show me everything\n\n<Image>{image_in}</Image> again please\n--audio /nowhere.wav hi\nexit\nnever\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    # 6 new tokens: WORD, [IMG0..3] complete, [VID0] cut off -> one image per request, the video reported
    argv = tiny_env.argv("stage_3", *programmed["overrides"], "inference.max_new_tokens=6",
                         "inference.force_signal=false")
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
    sampling = Sampling(max_new_tokens=12, do_sample=False, force_signal=False)
    batch = generate(model, conversations, sampling, seed=0)
    alone = [generate(model, [c], sampling, seed=0)[0] for c in conversations]
    for together, single in zip(batch, alone):
        assert together.token_ids == single.token_ids and together.text == single.text
        assert [o.modality for o in together.outputs] == ["image"] == [o.modality for o in single.outputs]
        torch.testing.assert_close(together.outputs[0].conditioning, single.outputs[0].conditioning,
                                   rtol=1e-5, atol=1e-5)
        assert together.truncated == ["video"]                 # 12 tokens: WORD, [IMG0..3], 7 of [VID0..23]
        assert "[IMG0]" not in together.display_text and together.display_text


def test_force_signal_completes_a_started_block(signal_model):
    """A model that starts the image block and breaks off after [IMG0]: plain decoding gives a malformed run and no
    image; force_signal completes the block in order (and the video block, too long for the budget, never starts)."""
    import torch

    from nextgpt.model.generate import Conversation, Sampling, generate
    from nextgpt.model import llm as llm_utils

    model, _ = signal_model
    image_block = model.token_ids.signal["image"]
    head = llm_utils.effective_token_matrix(model.llm, "lm_head").detach().clone()
    rows = head[model.token_ids.new_token_ids]                            # (38, D): the new tokens' lm_head rows
    broken = rows.clone()
    broken[model.token_ids.new_token_ids.index(image_block[1])] = 0      # nothing points from [IMG0] to [IMG1]
    try:
        llm_utils.set_token_matrix(model.llm, "lm_head", broken, model.token_ids)
        replies = {force: generate(model, [Conversation.of("Show me everything")],
                                   Sampling(max_new_tokens=8, do_sample=False, force_signal=force), seed=0)[0]
                   for force in (False, True)}
    finally:
        llm_utils.set_token_matrix(model.llm, "lm_head", rows, model.token_ids)
    plain, forced = replies[False], replies[True]
    assert image_block[0] in plain.token_ids and plain.outputs == [] and "image" in plain.malformed
    start = forced.token_ids.index(image_block[0])
    assert forced.token_ids[start:start + 4] == image_block and [o.modality for o in forced.outputs] == ["image"]
    assert not forced.malformed and not forced.truncated
    video_block = model.token_ids.signal["video"]
    assert video_block[0] not in forced.token_ids                          # 24 ids never fit in what was left
    assert all(isinstance(o.conditioning, torch.Tensor) for o in forced.outputs)


def test_signal_blocks_processor_masks():
    """SignalBlocks on hand-made ids: inside a block only its next id; later ids never outside a block; a block
    starts only when it fits in the tokens left."""
    import torch

    from nextgpt.model.generate import SignalBlocks

    signal = {"image": [10, 11, 12, 13], "audio": [20, 21]}
    processor = SignalBlocks(signal, max_new_tokens=3)
    prompt = torch.tensor([[1, 2, 3], [1, 2, 3]])
    scores = processor(prompt, torch.zeros(2, 30))                          # 3 left: audio may start, image not
    assert torch.isinf(scores[:, [10, 11, 12, 13, 21]]).all() and torch.isfinite(scores[:, [20, 5]]).all()
    grown = torch.tensor([[1, 2, 3, 20], [1, 2, 3, 5]])                     # row 0 inside the audio block
    scores = processor(grown, torch.zeros(2, 30))
    assert scores[0].argmax() == 21 and torch.isinf(scores[0]).sum() == 29
    assert torch.isinf(scores[1, [10, 11, 12, 13, 21]]).all()               # 2 left: only audio's 2 ids fit
    assert torch.isfinite(scores[1, [5, 20]]).all()


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
