"""nextgpt.training.deepspeed.build_ds_config: the run's DeepSpeed JSON, built once from the config after the data
and not changed afterwards (the file as read stays as it was; build_engine only reads the result)."""

from __future__ import annotations

import copy

from nextgpt import config as config_lib
from nextgpt import runtime
from nextgpt.training.deepspeed import build_ds_config

REPO = config_lib.REPO_ROOT


def test_the_json_is_built_once_from_the_config():
    cfg = config_lib.load(REPO / "code" / "config" / "stage_3.yaml",
                          ["train.lr=1.0e-3", "train.min_lr=1.0e-5", "train.module_lr={lora: 4.0e-3}",
                           "train.optimizer_8bit=true"])
    path = REPO / "code" / "dsconfig" / "stage_3.json"
    read = runtime.load_ds_config(path, cfg, 2)
    before = copy.deepcopy(read)
    groups = [{"params": [], "lr": 1.0e-3, "name": "input_proj"}, {"params": [], "lr": 4.0e-3, "name": "lora"}]
    built = build_ds_config(read, cfg, 2, 50, groups, path)
    assert read == before                                           # a new dict; what was read is unchanged
    assert runtime.unresolved(built) == [] and built["scheduler"]["params"]["total_num_steps"] == 50
    assert built["scheduler"]["params"]["warmup_max_lr"] == [1.0e-3, 4.0e-3]
    assert built["scheduler"]["params"]["warmup_min_lr"] == [1.0e-5, 4.0e-5]
    assert "optimizer" not in built and built["zero_allow_untested_optimizer"] is True   # AdamW8bit from code
