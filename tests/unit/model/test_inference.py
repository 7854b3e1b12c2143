"""code/inference.py's parts that load no model: interactive lines, one-line errors, decoder and sampling settings.
End to end on the tiny checkpoints (inference.main, nextgpt.model.generate): tests/e2e/test_generation.py."""

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


def test_decoder_settings_are_one_mapping_per_modality(tiny_env):
    from nextgpt.config import ConfigError

    cfg = tiny_env.config("stage_3", "inference.video.frames=3", "inference.audio.seconds=0.5")
    assert cfg.inference.decoding("video").frames == 3 and cfg.inference.audio.seconds == 0.5
    with pytest.raises(ConfigError, match="unknown key 'inference.image_steps'"):
        tiny_env.config("stage_3", "inference.image_steps=3")
    with pytest.raises(ConfigError, match="inference.video.frames: must be > 0"):
        tiny_env.config("stage_3", "inference.video.frames=0")
    with pytest.raises(ConfigError, match="inference.image.height: must be a multiple of 8"):
        tiny_env.config("stage_3", "inference.image.height=30")


def test_sampling_defaults_have_one_home():
    """Sampling's defaults are the config schema's inference.* defaults (nextgpt.config), not a second copy."""
    from nextgpt.config import InferenceConfig
    from nextgpt.model.generate import Sampling

    assert Sampling() == Sampling.from_config(InferenceConfig())
