"""The web demo under load, short form (issue 26; `make chaos` runs the full one: python -m chaos.app_load):
4 gradio_client sessions at once, 12 requests mixing text, image generation, uploads at and over the size limit and
a long generation, one session closing its connection mid-reply. Every request is answered or refused with a
message, the server answers afterwards, RSS / open files settle, session folders are removed."""

from __future__ import annotations

import pytest

from chaos import app_load
from nextgpt.runtime import free_port
from tiny import programmed_llm


def test_app_under_load_answers_every_request_and_cleans_up(tiny_env, tmp_path):
    pytest.importorskip("gradio_client", reason="gradio_client is not installed (requirements.txt)")
    _ = tiny_env.imagebind
    programmed = programmed_llm.build(tiny_env, tmp_path / "programmed")
    image = sorted((tiny_env.data / "T_X_pair_data" / "cc3m" / "images").glob("*.jpg"))[0]
    limit = 64 * 1024
    report = app_load.load_test(app_load.app_command(tiny_env, programmed, free_port(), limit), programmed["word"],
                                image, tmp_path / "load", clients=4, requests=12, disconnects=1, size_limit=limit)
    print({k: v for k, v in report.items() if k != "results"})
    assert report["problems"] == [], report["problems"]
    assert report["outcomes"]["answered"] >= 6 and report["outcomes"]["refused"] >= 1     # the oversize uploads
