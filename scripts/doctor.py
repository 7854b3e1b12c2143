"""Before a run: would it start here? Every problem is one line with its fix; exit 0 only when none.

    python scripts/doctor.py --config code/config/stage_1.yaml                     # `make doctor`
    python scripts/doctor.py --config code/config/stage_2.yaml --ds_config code/dsconfig/offload.json --num_gpus 8
    python scripts/doctor.py --config ... --hostfile hostfile                       # `make doctor HOSTFILE=...`

Checks, in order:
  devices   CUDA devices (and --num_gpus of them), bf16 on each (else code/dsconfig/fp16.json), the dsconfig's
            precision on this device (fp16 is refused on CPU)
  memory    free memory of each GPU against scripts/estimate.py's prediction for the config and dsconfig
  ops       the DeepSpeed ops the dsconfig makes DeepSpeed compile at first use and whether their tools are on
            PATH (nvcc, c++, ninja): nextgpt.training.deepspeed.check_compiled_ops, what train.py refuses at start
  backend   NCCL on GPUs, gloo on CPU
  disk      free space at train.output_dir for train.keep_last checkpoints + the one being written
  nodes     with --hostfile: pdsh and ssh (DeepSpeed's hostfile launch), and over ssh that every host sees the
            nonce written into train.output_dir, data.embed_dir and data.feature_dir (one shared folder)
  checkpoints   what scripts/check_ckpt.py finds for the config (its own report: `make check-ckpt`)
Exit status: 0 the run would start, 1 problems found (each printed), 2 a bad config or dsconfig.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import secrets
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from nextgpt import cli
from nextgpt import config as config_lib
from nextgpt.training.deepspeed import check_compiled_ops, ops_to_compile
from nextgpt.runtime import CPU_DS_CONFIG, ds_dtype, load_ds_config

GIB = 2**30
# Bytes a checkpoint keeps per trainable parameter: the delta (fp32) + DeepSpeed's module states (the dsconfig's
# dtype, at most 4) + fp32 master weights and Adam m, v (12); each rank's partitions add up to one copy.
CHECKPOINT_BYTES_PER_PARAM = 4 + 4 + 12
CHECKPOINT_FIXED_BYTES = 32 * 2**20      # tokenizer files, config, meta, DeepSpeed's scripts, rank states


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)

    def ok(self, what: str, text: str) -> None:
        print(f"  ok       {what:<11} {text}")

    def note(self, what: str, text: str) -> None:
        print(f"  note     {what:<11} {text}")

    def problem(self, what: str, text: str) -> None:
        self.problems.append(text)
        print(f"  PROBLEM  {what:<11} {text}")


def check_devices(report: Report, ds: dict, ds_path: Path, num_gpus: int | None) -> bool:
    """-> whether CUDA is in use."""
    import torch

    dtype = ds_dtype(ds)
    if not torch.cuda.is_available():
        report.note("devices", "no CUDA device: the run uses DeepSpeed's CPU accelerator (gloo)")
        if dtype == torch.float16:
            report.problem("devices", f"{ds_path} enables fp16, which DeepSpeed refuses on CPU: use "
                                      f"DS_CONFIG={CPU_DS_CONFIG} (bf16 / fp32)")
        if num_gpus:
            report.problem("devices", f"NUM_GPUS={num_gpus} but no CUDA device is visible: check the driver "
                                      "(nvidia-smi) and CUDA_VISIBLE_DEVICES, or leave NUM_GPUS out on CPU")
        return False
    count = torch.cuda.device_count()
    names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
    report.ok("devices", f"{count} CUDA device(s): {', '.join(names)}; torch CUDA {torch.version.cuda}")
    if num_gpus and num_gpus > count:
        report.problem("devices", f"NUM_GPUS={num_gpus} but {count} CUDA device(s) visible: use NUM_GPUS={count}")
    if dtype == torch.bfloat16:
        no_bf16 = [i for i in range(count) if not torch.cuda.get_device_capability(i) >= (8, 0)]
        if no_bf16:
            report.problem("devices", f"cuda:{no_bf16[0]} ({torch.cuda.get_device_name(no_bf16[0])}) has no bf16 "
                                      f"(compute capability < 8.0) and {ds_path} enables it: use "
                                      "DS_CONFIG=code/dsconfig/fp16.json")
        else:
            report.ok("devices", "bf16 supported on every device")
    return True


def check_memory(report: Report, config: str, overrides: list[str], ds_path: Path, gpus: int) -> None:
    """Free memory of each GPU against scripts/estimate.py's total per GPU (its own numbers, printed there)."""
    import torch

    import estimate

    args = estimate.parser().parse_args(["--config", config, "--ds_config", str(ds_path), "--gpus", str(gpus),
                                         "--shape", "config", "--max-records", "200",
                                         *[x for o in overrides for x in ("--set", o)]])
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            need = estimate.run(args)["memory_gib"]["total"]
    except (OSError, ValueError) as e:
        report.problem("memory", f"scripts/estimate.py could not predict the memory ({cli.describe(e)[0]}): fix that "
                                 "first (make validate checks the data)")
        return
    for i in range(torch.cuda.device_count()):
        free = torch.cuda.mem_get_info(i)[0] / GIB
        if free < need:
            report.problem("memory", f"cuda:{i} has {free:.1f} GiB free, the run needs about {need:.1f} GiB per GPU "
                                     "(scripts/estimate.py): use code/dsconfig/offload.json, a smaller "
                                     "train.micro_batch_size or more GPUs")
            return
    report.ok("memory", f"about {need:.1f} GiB per GPU needed (scripts/estimate.py), every GPU has more free")


def check_ops(report: Report, ds: dict, ds_path: Path, cuda: bool) -> None:
    """What train.py checks at start (nextgpt.training.deepspeed.check_compiled_ops), said beforehand."""
    if not ops_to_compile(ds, cuda):
        report.ok("ops", f"{ds_path.name}: DeepSpeed compiles nothing at start")
        return
    try:
        for note in check_compiled_ops(ds, ds_path, cuda):
            report.ok("ops", f"{note} (about a minute at the first start, cached in TORCH_EXTENSIONS_DIR)")
    except ValueError as e:
        report.problem("ops", str(e))


def check_backend(report: Report, cuda: bool) -> None:
    import torch.distributed as dist

    name, available = ("nccl", dist.is_nccl_available()) if cuda else ("gloo", dist.is_gloo_available())
    if available:
        report.ok("backend", f"torch.distributed {name}")
    else:
        report.problem("backend", f"this torch build has no {name} backend: install PyPI's torch wheel "
                                  "(requirements.txt)")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(report: Report, cfg) -> None:
    """Room for keep_last checkpoints plus the one being written (a save writes before it rotates)."""
    from estimate import llm_shape, projector_params, trainable_counts

    out = cfg.path(cfg.train.output_dir)
    try:
        shape = llm_shape(cfg, "config")
    except (OSError, ValueError):
        shape = llm_shape(cfg, "7b")
    trainable = trainable_counts(cfg, shape, projector_params(cfg, shape.d))["total"]
    each = trainable * CHECKPOINT_BYTES_PER_PARAM + CHECKPOINT_FIXED_BYTES
    kept = cfg.train.keep_last if cfg.train.keep_last > 0 else 1 + (cfg.train.max_steps or 10**6) // max(
        1, cfg.train.save_every or 10**9)
    need = each * (kept + 1)
    free = shutil.disk_usage(_existing_parent(out)).free
    line = (f"{out}: {free / GIB:.1f} GiB free, {kept} + 1 checkpoint(s) of about {each / GIB:.2f} GiB need "
            f"{need / GIB:.1f} GiB")
    if free < need:
        report.problem("disk", f"{line}: free space there, lower train.keep_last, or point train.output_dir at a "
                               "larger disk")
    else:
        report.ok("disk", line)


def _hosts(hostfile: Path) -> list[str]:
    hosts = []
    for number, line in enumerate(hostfile.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if line:
            if "slots=" not in line:
                raise ValueError(f"{hostfile}:{number}: expected '<host> slots=<n>', got {line!r}")
            hosts.append(line.split()[0])
    if not hosts:
        raise ValueError(f"{hostfile}: no hosts")
    return hosts


def check_nodes(report: Report, cfg, hostfile: Path) -> None:
    """pdsh + ssh to every host, and every host sees the nonce in each folder a rank writes (nextgpt.training.peers does
    the same collectively when train.py starts)."""
    hosts = _hosts(hostfile)
    for tool in ("pdsh", "ssh"):
        if shutil.which(tool) is None:
            report.problem("nodes", f"{tool} not found, which DeepSpeed's --hostfile launch runs: install it "
                                    "(apt-get install pdsh openssh-client), or start each node's launcher with "
                                    "--no_ssh --node_rank R (README, Multi-GPU and multi-node)")
            return
    folders = {"train.output_dir": cfg.path(cfg.train.output_dir), "data.embed_dir": cfg.path(cfg.data.embed_dir),
               "data.feature_dir": cfg.path(cfg.data.feature_dir)}
    nonce = secrets.token_hex(8)
    written = []
    try:
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f".shared-check.{nonce}").write_text(nonce)
            written.append(folder / f".shared-check.{nonce}")
        port = os.environ.get("SSH_PORT")
        for host in hosts:
            command = " ; ".join(f"cat {shlex.quote(str(p))} 2>/dev/null || echo MISSING" for p in written)
            ssh = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", *(["-p", port] if port else []), host,
                   command]
            try:
                done = subprocess.run(ssh, capture_output=True, text=True, timeout=30)
            except subprocess.TimeoutExpired:
                done = None
            if done is None or done.returncode != 0:
                why = (done.stderr.strip().splitlines() or ["no answer"])[-1] if done else "timed out"
                report.problem("nodes", f"ssh {host}: {why}: set up passwordless ssh to every host, or start each "
                                        "node with --no_ssh --node_rank R (train.py then checks the folders itself)")
                continue
            for (key, folder), answer in zip(folders.items(), done.stdout.split()):
                if answer != nonce:
                    report.problem("nodes", f"{key} {folder}: host {host} does not see the file written here: put "
                                            "it on a shared file system mounted at the same path on every node")
        if not [p for p in report.problems if p.startswith(("ssh ", "data.", "train."))]:
            report.ok("nodes", f"{len(hosts)} host(s) reachable by ssh, each sees {', '.join(folders)}")
    finally:
        for path in written:
            path.unlink(missing_ok=True)


def check_checkpoints(report: Report, cfg) -> None:
    import check_ckpt

    with contextlib.redirect_stdout(io.StringIO()):
        items = check_ckpt.Checker(cfg).run(None)
    bad = [item for item in items if item.problem and not item.optional]
    for item in bad:
        report.problem("checkpoint", f"{item.what} {item.path}: {item.problem}; `make check-ckpt` says where it "
                                     "comes from")
    if not bad:
        report.ok("checkpoint", f"check-ckpt: {len(items)} item(s) present and plausible")


def run(args) -> int:
    cfg = config_lib.from_args(args)
    ds_path = Path(args.ds_config) if args.ds_config else None
    import torch

    if ds_path is None:
        from nextgpt.runtime import default_ds_config

        ds_path = default_ds_config()
    world = args.num_gpus or (torch.cuda.device_count() if torch.cuda.is_available() else 1)
    ds = load_ds_config(ds_path, cfg, world)  # a contradiction with the YAML: the run's own error line (exit 2)
    print(f"doctor: {args.config} with {ds_path}" + (f", hostfile {args.hostfile}" if args.hostfile else ""))
    report = Report()
    cuda = check_devices(report, ds, ds_path, args.num_gpus)
    if cuda:
        check_memory(report, args.config, args.overrides, ds_path, world)
    check_ops(report, ds, ds_path, cuda)
    check_backend(report, cuda)
    check_disk(report, cfg)
    if args.hostfile:
        check_nodes(report, cfg, Path(args.hostfile))
    check_checkpoints(report, cfg)
    if report.problems:
        print(f"{len(report.problems)} problem(s): the run would not start (or fail early) as configured")
        return 1
    print("no problems: the run would start")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_config_args(p, default="code/config/stage_1.yaml")
    p.add_argument("--ds_config", "--ds-config", default=None, help="DeepSpeed JSON (default: as train.py)")
    p.add_argument("--num_gpus", "--num-gpus", type=int, default=None, help="GPUs the launch will use")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile (<host> slots=<n> per line)")
    args = p.parse_args(argv)
    return cli.run(lambda: run(args), "doctor")


if __name__ == "__main__":
    raise SystemExit(main())
