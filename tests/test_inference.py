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
