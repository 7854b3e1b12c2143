"""What the multi-process end-to-end tests share (tests/e2e/test_train.py, test_ranks_heterogeneous.py): a
`deepspeed --num_gpus N code/train.py` launch (CPU, gloo) and the tensors a checkpoint trained."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nextgpt import config as config_lib

REPO = config_lib.REPO_ROOT


def launch_train(argv: list[str], num_gpus: int = 2, timeout: float = 400) -> subprocess.CompletedProcess:
    """code/train.py through DeepSpeed's launcher on a free master port, without the rank variables of the test
    process (the launcher sets each rank's own); fails the test with the output's tail when it exits non-zero."""
    from nextgpt.runtime import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus),
                             "--master_port", str(free_port()), str(REPO / "code" / "train.py"), *argv],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def delta_tensors(checkpoint: Path) -> dict:
    """{name: tensor} of a checkpoint's delta.safetensors plus its LoRA adapter (if any)."""
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoint / "delta.safetensors"))
    adapter = checkpoint / "adapter" / "adapter_model.safetensors"
    if adapter.is_file():
        tensors |= {f"adapter.{k}": v for k, v in load_file(str(adapter)).items()}
    return tensors
