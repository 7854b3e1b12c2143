"""The pieces behind the multi-node guarantees, in one process: what counts as a rank's missing checkpoint file,
which dsconfigs make DeepSpeed compile, the dist_timeout setting, and the checks that are no-ops on one process."""

from __future__ import annotations

import pytest

from nextgpt import config as config_lib
from nextgpt.training import peers
from nextgpt.training.deepspeed import ops_to_compile
from nextgpt.checkpoint.resume import missing_parts


def test_missing_parts_names_rank_and_file():
    seen = {"rank_0.pt": "a", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt": "b", "rank_1.pt": "c"}
    written = [{"rank_0.pt": "a"}, {"rank_1.pt": "c2", "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt": "d"}]
    assert missing_parts(seen, written) == [(1, "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt", "missing"),
                                            (1, "rank_1.pt", "sha256 differs")]
    assert missing_parts(seen, [{"rank_0.pt": "a"}, {"rank_1.pt": "c"}]) == []


ADAMW = {"type": "AdamW", "params": {"lr": 1e-4}}


@pytest.mark.parametrize("ds, cuda, expected", [
    ({"optimizer": ADAMW}, True, [("fused_adam", ["nvcc", "ninja"])]),
    ({"optimizer": ADAMW}, False, [("fused_adam", ["c++", "ninja"])]),
    ({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}, True, []),
    ({"optimizer": ADAMW, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, True,
     [("cpu_adam", ["c++", "ninja"])]),
    ({"optimizer": ADAMW, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}, True,
     [("cpu_adam", ["c++", "ninja"]), ("async_io", ["c++", "ninja"])]),
    ({"optimizer": {"type": "Lamb"}}, True, [("fused_lamb", ["nvcc", "ninja"])]),
    ({}, True, []),                                    # train.optimizer_8bit: no optimizer in the JSON
])
def test_ops_to_compile(ds, cuda, expected):
    assert ops_to_compile(ds, cuda) == expected


def test_dist_timeout_must_be_positive():
    assert config_lib.load(None).train.dist_timeout == 180
    with pytest.raises(config_lib.ConfigError, match="train.dist_timeout: must be > 0"):
        config_lib.load(None, ["train.dist_timeout=0"])


def test_one_process_needs_no_proof_and_has_no_peers(tmp_path):
    peers.prove_shared({"train.output_dir": tmp_path / "out"}, 0)     # no process group: nothing to prove
    assert not (tmp_path / "out").exists()
    beat = peers.Heartbeat(0, 1).start()
    assert beat.lost() == [] and beat.explain(RuntimeError("x"), tmp_path) is None
    beat.stop()
