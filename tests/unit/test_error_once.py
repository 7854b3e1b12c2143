"""A fatal error in a multi-rank run: one `error:` line, printed once (rank 0); every rank's line and traceback
go to the run's log (train.log). Ranks are simulated with the launcher's RANK / WORLD_SIZE variables."""

from __future__ import annotations

import pytest

from nextgpt import cli


def _fail():
    raise ValueError("data.root: no such folder, /nowhere")


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_only_rank_zero_prints_and_every_rank_logs(rank, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "4")
    log = tmp_path / "train.log"
    cli.set_log(log)
    assert cli.run(_fail, "train") == 2
    err = capsys.readouterr().err
    if rank == 0:
        assert err == "error: data.root: no such folder, /nowhere\n"
    else:
        assert err == ""
    text = log.read_text()
    assert f"rank {rank} of 4" in text and "error: data.root: no such folder, /nowhere" in text
    assert "Traceback" in text


def test_single_process_still_prints(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.run(_fail, "train") == 2
    assert capsys.readouterr().err == "error: data.root: no such folder, /nowhere\n"
