"""Device, dtype and distribution, decided once at the top of a run (with the reason printed), plus the
DeepSpeed JSON resolution ("auto" values filled from the YAML, contradictions rejected) and seeding.

Nothing happens at import; deepspeed is imported inside the functions that need it.
"""

from __future__ import annotations

import copy
import math
import os
import random
import socket
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nextgpt.io import read_json

# Variables every process of a torch.distributed job needs (a launcher sets them; a plain `python` run does not).
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
CPU_DS_CONFIG = "code/dsconfig/cpu.json"
GPU_DS_CONFIG = "code/dsconfig/gpu.json"


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int
    world_size: int
    local_rank: int
    backend: str
    reason: str
    env_we_set: list[str] = field(default_factory=list)   # removed again by shutdown()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def to_device(value, device: torch.device):
    """Tensors (inside dicts/lists) to `device`; everything else (names, Sample records) as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [v.to(device, non_blocking=True) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------------------
# Device and dtype of a process that runs no DeepSpeed engine (inference, evaluation, the app, precompute): the one
# rule, decided once at the top of the script; the parts (ImageBind encoder, caption encoder, loaders) take the
# decision as arguments. A training run decides in setup() from the DeepSpeed JSON.

def pick_device(requested: "str | torch.device | None" = None, dtype: torch.dtype | None = None,
                local_rank: int | None = None) -> tuple[torch.device, torch.dtype, str]:
    """(device, dtype, reason): `requested` (cpu | cuda | cuda:N), else the GPU (cuda:local_rank under a launcher)
    when there is one, else the CPU; `dtype` given, else bf16 (fp16 where bf16 is unsupported) on a GPU, fp32 on
    the CPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: no CUDA device is available")
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank) if local_rank is not None else torch.device("cuda")
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        dtype = dtype or (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        reason = f"{torch.cuda.get_device_name(device)}: {str(dtype).removeprefix('torch.')}"
    else:
        dtype = dtype or torch.float32
        reason = f"CPU: {str(dtype).removeprefix('torch.')}" + ("" if requested else " (no CUDA device)")
    return device, dtype, reason


def default_ds_config() -> Path:
    """The DeepSpeed JSON a run uses without --ds_config: gpu.json (every stage: the YAML owns the numbers,
    code/dsconfig/README.md), cpu.json without a GPU."""
    from nextgpt.config import REPO_ROOT

    return REPO_ROOT / (GPU_DS_CONFIG if torch.cuda.is_available() else CPU_DS_CONFIG)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_env(local_rank: int | None = None) -> list[str]:
    """Fill RANK/WORLD_SIZE/... for a run started without a launcher; return the names we set.

    Without them deepspeed.init_distributed goes looking for mpi4py. A launcher (deepspeed, torchrun) sets all five;
    we never overwrite what it set.
    """
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": str(local_rank if local_rank is not None else 0),
                "MASTER_ADDR": "127.0.0.1"}
    set_here = []
    for name in DIST_ENV:
        if name in os.environ:
            continue
        os.environ[name] = str(free_port()) if name == "MASTER_PORT" else defaults[name]
        set_here.append(name)
    return set_here


def ds_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return torch.float32


def setup(ds_config: dict[str, Any], ds_path: str | os.PathLike = "", local_rank: int | None = None,
          verbose: bool = True, timeout: float | None = None) -> Runtime:
    """Decide device/dtype/backend, initialise torch.distributed through DeepSpeed, print the reason once.
    `timeout` (seconds; train.dist_timeout): how long a collective waits for a rank that stopped answering."""
    env_we_set = single_process_env(local_rank)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    accelerator = get_accelerator()
    dtype = ds_dtype(ds_config)
    if accelerator.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
        reason = (f"{torch.cuda.device_count()} CUDA device(s): cuda:{local_rank}, nccl, "
                  f"{str(dtype).removeprefix('torch.')} from {ds_path or 'the DeepSpeed config'}")
    elif accelerator.device_name() == "cpu":
        if dtype == torch.float16:
            shutdown(Runtime(torch.device("cpu"), dtype, rank, world_size, local_rank, "gloo", "", env_we_set))
            raise ValueError(f"{ds_path}: fp16 is not supported on CPU by DeepSpeed; use {CPU_DS_CONFIG} (bf16/fp32)")
        device, backend = torch.device("cpu"), "gloo"
        reason = (f"no CUDA device: DeepSpeed CPU accelerator, gloo, {str(dtype).removeprefix('torch.')} "
                  f"from {ds_path or 'the DeepSpeed config'}")
        # The shared-memory allreduce op would be compiled (~24 s) at every start; gloo does the job here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    else:
        raise ValueError(f"unsupported DeepSpeed accelerator {accelerator.device_name()!r}; expected cuda or cpu")
    if timeout is None:
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    else:
        wait = timedelta(seconds=timeout)
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=wait)
        # ZeRO reduces gradients in DeepSpeed's clone of the world group, which torch.distributed.new_group would
        # give its own default timeout (30 min on gloo); made here with ours, DeepSpeed's cache hands it out.
        from deepspeed.utils import groups

        groups._WORLD_GROUP = torch.distributed.new_group(ranks=range(world_size), timeout=wait)
    runtime = Runtime(device, dtype, rank, world_size, local_rank, backend,
                      f"{reason}; rank {rank}/{world_size}", env_we_set)
    if verbose and runtime.is_main:
        print(f"runtime: {runtime.reason}", flush=True)
    return runtime


def shutdown(runtime: Runtime | None) -> None:
    """Destroy the process group (a 2-rank gloo run crashed at exit without it) and undo our env defaults."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        # DeepSpeed caches process groups it derived from the world group (a clone of it, ZeRO/expert groups);
        # they die with it, and a later run in this process (tests, notebooks) must not be handed them.
        groups._WORLD_GROUP = None
        groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
        groups.mesh_device = None
        for cache in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                      groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
                      groups._ALL_TO_ALL_GROUP):
            cache.clear()
    for name in (runtime.env_we_set if runtime else []):
        os.environ.pop(name, None)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on any rank (every rank must call this)."""
    return any_rank_each([flag], device)[0]


def any_rank_each(flags: list[bool], device: torch.device) -> list[bool]:
    """Per flag, whether it is true on any rank: one all-reduce (every rank calls this with as many flags)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return list(flags)
    value = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return [v > 0 for v in value.tolist()]


def mean_over_ranks(sums: dict[str, float], counts: dict[str, float], names: list[str],
                    device: torch.device) -> dict[str, float]:
    """{name: sum / count} over all ranks, for the `names` seen at least once on some rank. Every rank calls this
    with the same `names` (a rank may lack some terms, e.g. a modality absent from its micro-batches)."""
    packed = torch.tensor([[sums.get(n, 0.0), counts.get(n, 0.0)] for n in names], dtype=torch.float64,
                          device=device).reshape(-1, 2)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(packed)
    return {n: total / count for n, (total, count) in zip(names, packed.tolist()) if count > 0}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # all devices


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed JSON: the YAML owns every number; the JSON owns the mechanics (ZeRO, precision, offload).

AUTO = "auto"


def _expected(cfg: Any, world_size: int, total_steps: int | None) -> dict[tuple[str, ...], tuple[Any, str]]:
    """JSON key path -> (value the YAML implies, where in the YAML it comes from)."""
    t = cfg.train
    micro, accum = t.micro_batch_size, t.gradient_accumulation_steps
    expected = {
        ("train_micro_batch_size_per_gpu",): (micro, "train.micro_batch_size"),
        ("gradient_accumulation_steps",): (accum, "train.gradient_accumulation_steps"),
        ("train_batch_size",): (micro * accum * world_size,
                                f"train.micro_batch_size {micro} x train.gradient_accumulation_steps {accum} "
                                f"x world size {world_size}"),
        ("gradient_clipping",): (t.grad_clip, "train.grad_clip"),
        ("optimizer", "params", "lr"): (t.lr, "train.lr"),
        ("optimizer", "params", "betas"): (list(t.betas), "train.betas"),
        ("optimizer", "params", "eps"): (t.eps, "train.eps"),
        ("optimizer", "params", "weight_decay"): (t.weight_decay, "train.weight_decay"),
        ("scheduler", "params", "warmup_min_lr"): (t.min_lr, "train.min_lr"),
        ("scheduler", "params", "warmup_max_lr"): (t.lr, "train.lr"),
        ("scheduler", "params", "warmup_num_steps"): (t.warmup_steps, "train.warmup_steps"),
    }
    if total_steps is not None:
        expected[("scheduler", "params", "total_num_steps")] = (total_steps, "train.max_steps (or epochs x steps)")
    return expected


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def fill_ds_config(ds: dict[str, Any], cfg: Any, world_size: int, total_steps: int | None = None,
                   ds_path: str | os.PathLike = "the DeepSpeed config") -> dict[str, Any]:
    """A copy of `ds` with its "auto" values filled from the YAML (total_num_steps only once `total_steps` is
    known; `ds` itself is left as it was); raise ValueError naming both files when the JSON states a number that
    contradicts the YAML, and (once `total_steps` is given) when an "auto" is left with nothing to fill it from."""
    ds = copy.deepcopy(ds)
    yaml_name = cfg.source or "the YAML config"
    for keys, (value, origin) in _expected(cfg, world_size, total_steps).items():
        node = ds
        for k in keys[:-1]:
            node = node.get(k)
            if not isinstance(node, dict):
                break
        else:
            if keys[-1] not in node:
                continue  # not stated in the JSON: the section may be absent (e.g. no scheduler) or DS's default
            current = node[keys[-1]]
            if current == AUTO:
                node[keys[-1]] = value
            elif not _same(current, value):
                raise ValueError(f"{ds_path}: {'.'.join(keys)}={current!r} contradicts {yaml_name} "
                                 f"({origin} = {value!r}); write \"auto\" in the JSON or change the YAML")
    if total_steps is not None and (left := unresolved(ds)):
        raise ValueError(f"{ds_path}: values still 'auto' with nothing to fill them from: {', '.join(left)}")
    return ds


def load_ds_config(path: str | os.PathLike, cfg: Any, world_size: int) -> dict[str, Any]:
    """Read the JSON and fill everything except the step count (known once the data is built)."""
    path = Path(path)
    ds = read_json(path, "DeepSpeed config not found")
    if not isinstance(ds, dict):
        raise ValueError(f"{path}: top level must be an object")
    return fill_ds_config(ds, cfg, world_size, None, path)


def unresolved(ds: Any, prefix: str = "") -> list[str]:
    """Key paths still holding "auto" (must be empty before deepspeed.initialize)."""
    if isinstance(ds, dict):
        return [p for k, v in ds.items() for p in unresolved(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if ds == AUTO else []
