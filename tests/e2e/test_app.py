"""code/app.py: the Gradio chat, driven in a real browser (Debian's headless chromium through selenium).

The app runs as its own process on the tiny checkpoints with the programmed LLM of scripts/tiny/programmed_llm.py, whose
greedy reply is WORD [IMG0..3] [VID0 ...: with max new tokens 6 every request yields exactly one image (the video
block is cut off), so a test can wait for a generated <img>. Without chromium + chromedriver (installed by .ci/run
with apt-get) the browser tests skip and say why.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import app
from tiny import programmed_llm
from nextgpt.config import REPO_ROOT
from nextgpt.runtime import free_port

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
START_TIMEOUT = 240          # seconds for the app to load the model and listen (the CPU may be shared)
REPLY_TIMEOUT = 120


def test_missing_checkpoint_is_one_line_exit_2(tiny_env, tmp_path, capsys):
    code = app.main([*tiny_env.argv("stage_3"), "--ckpt", str(tmp_path / "no_such_delta")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "no_such_delta: checkpoint not found" in err
    assert err.count("\n") == 1


def test_modality_of_upload():
    assert app.modality_of(Path("a.JPG")) == "image" and app.modality_of(Path("b.wav")) == "audio"
    with pytest.raises(ValueError, match="notes.txt: unsupported file type"):
        app.modality_of(Path("notes.txt"))


# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def programmed(tiny_env, tmp_path_factory):
    return programmed_llm.build(tiny_env, tmp_path_factory.mktemp("programmed_app"))


@pytest.fixture(scope="module")
def server(tiny_env, programmed, tmp_path_factory):
    """The app on a free port, serving the programmed signal delta; yields its URL, stops it afterwards."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium/chromedriver on PATH (.ci/run installs them: apt-get install chromium "
                    "chromium-driver)")
    pytest.importorskip("selenium", reason="selenium is not installed (requirements.txt)")
    _ = tiny_env.imagebind                              # the tiny ImageBind encodes uploaded images
    port = free_port()
    argv = tiny_env.argv("stage_3", *programmed["overrides"], "inference.max_new_tokens=6",
                         "inference.force_signal=false")           # plain decoding: the video block is cut
    log = tmp_path_factory.mktemp("app_log") / "app.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(REPO_ROOT / "code" / "app.py"), *argv, "--ckpt",
                                    str(programmed["deltas"]["signal"]), "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + START_TIMEOUT
        while "serving on" not in log.read_text() or not _listening(port):
            if process.poll() is not None or time.time() > deadline:
                pytest.fail(f"the app did not start (exit {process.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": f"http://127.0.0.1:{port}/", "log": log, "word": programmed["word"]}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
    # SIGTERM ends the app through atexit: its upload / generated-file folder is gone
    (root,) = re.findall(r"session files under (\S+) ", log.read_text())
    assert not Path(root).exists()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium/chromedriver on PATH")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium_profile")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)    # no driver download: Debian's
    yield driver
    driver.quit()


def _send(driver, text: str, upload: Path | None = None) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    if upload is not None:
        driver.find_element(By.CSS_SELECTOR, "#message input[type=file]").send_keys(str(upload))
        # the upload shows as a thumbnail in the textbox before the message can go
        _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#message .thumbnail-item, #message img"), 30)
    textarea = driver.find_element(By.CSS_SELECTOR, "#message textarea")
    textarea.send_keys(text)
    textarea.send_keys(Keys.ENTER)


def _wait(driver, condition, timeout: float):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)


def _bot_images(driver) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#chat .bot-row img")


def _chat_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, "#chat").text


def test_upload_image_get_reply_and_generated_image(server, browser, tiny_env, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server["url"])
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#message textarea"), 60)
    assert "stage 3, step 0" in browser.find_element(By.CSS_SELECTOR, "#checkpoint").text
    image = next((tiny_env.data / "T_X_pair_data" / "cc3m" / "images").iterdir())
    _send(browser, "describe this and show me a picture", image)
    _wait(browser, lambda d: _bot_images(d), REPLY_TIMEOUT)
    generated = _bot_images(browser)[0]
    _wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                              generated), 30)
    assert "image_0.png" in generated.get_attribute("src")
    text = _chat_text(browser)
    assert server["word"] in text and "describe this and show me a picture" in text
    assert "video signal block was cut off" in text
    # the generated file is listed for download
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#downloads td.filename[aria-label='image_0.png']"), 30)
    browser.save_screenshot(str(tmp_path / "app.png"))
    assert (tmp_path / "app.png").stat().st_size > 10_000


def test_corrupt_upload_is_a_chat_message_and_the_next_request_works(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server["url"])                              # a fresh session
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#message textarea"), 60)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really an image" * 10)
    _send(browser, "what is in this picture?", broken)
    _wait(browser, lambda d: "error:" in _chat_text(d), REPLY_TIMEOUT)
    assert "broken.png" in _chat_text(browser)
    _send(browser, "show me a picture")
    _wait(browser, lambda d: _bot_images(d), REPLY_TIMEOUT)
    assert "image_" in _bot_images(browser)[0].get_attribute("src")
    assert "Traceback" not in _chat_text(browser)


# ---------------------------------------------------------------------------------------------------------------
# The chat handler in-process (no browser): what a request does to the conversation and the session folder

@pytest.fixture(scope="module")
def handler(tiny_env, programmed, tmp_path_factory):
    from nextgpt.checkpoint.load import load_model
    from nextgpt.model.decoders import Decoders

    cfg = tiny_env.config("stage_3", *programmed["overrides"], "inference.max_new_tokens=6")
    model, info = load_model(cfg, programmed["deltas"]["signal"])
    return app.Server(cfg, model, info, Decoders(cfg), tmp_path_factory.mktemp("sessions"))


def _last(handler, message, history, state, max_new_tokens=6):
    *_, (textbox, history, state, files) = handler.respond(message, history, state, 0.4, 1.0, max_new_tokens, 2,
                                                           7.5, 0)
    return textbox, history, state, files


def test_handler_turns_media_errors_and_clear(handler, tmp_path):
    import av
    from PIL import Image

    _, history, state, files = _last(handler, {"text": "show me a picture", "files": []}, [], None)
    assert [t.role for t in state.turns] == ["human", "gpt"] and state.turns[1].output_modality == "image"
    # force_signal (on by default) completes the block, so the image is the last entry: no "out of order" note
    assert files == [str(state.folder / "image_0.png")] and history[-1]["content"] == {"path": files[0]}
    # bad inputs: a chat message each, the conversation unchanged, the text kept in the box for another try
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    empty_video = tmp_path / "empty.mp4"
    with av.open(str(empty_video), mode="w") as container:              # a valid mp4 with no frames
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
    for upload, expected in ((notes, "notes.txt: unsupported file type"), (empty_video, "empty.mp4")):
        textbox, history, state, _ = _last(handler, {"text": "look", "files": [str(upload)]}, history, state)
        assert history[-1]["content"].startswith("⚠️ error: ") and expected in history[-1]["content"]
        assert textbox["text"] == "look" and len(state.turns) == 2 and state.media == []
    _, history, state, _ = _last(handler, {"text": "word " * 600, "files": []}, history, state)
    assert "the model's context is" in history[-1]["content"] and len(state.turns) == 2
    # the next request still works and continues the conversation; numbering goes on
    _, history, state, files = _last(handler, {"text": "again", "files": []}, history, state)
    assert len(state.turns) == 4 and files[-1].endswith("image_1.png")
    with Image.open(files[-1]) as image:
        assert image.size == (handler.cfg.inference.image.width, handler.cfg.inference.image.height)
    # enough tokens for the whole programmed reply: an image, a video and a sound, each inline and downloadable
    _, history, state, files = _last(handler, {"text": "everything", "files": []}, history, state, max_new_tokens=40)
    assert [Path(f).name for f in files[-3:]] == ["image_2.png", "video_0.mp4", "audio_0.wav"]
    assert [h["content"] for h in history[-3:]] == [{"path": f} for f in files[-3:]]
    folder = state.folder
    history, state, files = handler.clear(state)
    assert history == [] and files == [] and not folder.exists() and state.folder.is_dir() and state.turns == []
