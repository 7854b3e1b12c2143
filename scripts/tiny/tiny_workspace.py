"""The tiny workspace: tiny checkpoints (make_tiny_ckpt) and toy data (make_toy_data) in one folder, plus the
config overrides that point the tiny configs at it. Tests (tests/conftest.py's `tiny_env`), benchmarks and
dev/chaos/run.py (bench_common.workspace) build theirs with it.

    env = build_tiny_env(Path("runs/work"))
    cfg = env.config("stage_2", "train.max_steps=3")      # code/config/tiny/stage_2.yaml, paths -> the workspace
    main(env.argv("stage_2", "train.max_steps=3"))         # the same as script arguments

env.ckpt        folder laid out like ckpt/tiny (vicuna/, imagebind/imagebind_tiny.pth, stable-diffusion/,
                zeroscope/, audioldm/)
env.data        folder laid out like data/toy (T_X_pair_data/, IT_data/; embed/ and features/ once built)
env.delta       where the stages' checkpoints go (the tiny configs' ckpt/tiny/delta)
env.overrides   --set strings pointing every tiny-config path (model.*, data.*, inference.*) at those folders
env.config(stage, *extra_overrides) -> Config; stage: "stage_1".."stage_3", "fine_tuning", "base" or 1..3.
                train.output_dir / train.init_from are remapped into env.delta as well; a caller that writes
                a checkpoint and must not share it passes its own f"train.output_dir={tmp_path}".
env.imagebind   Path of the tiny ImageBind .pth, built on first use
env.embeddings() / env.features()   build caption embeddings / ImageBind features once per workspace
                with code/process_embeddings.py (the same commands as `make embeddings` / `make features`)

Importing this module does no work.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIGS = REPO / "code" / "config" / "tiny"


def code_script(name: str, folder: str = "code"):
    """code/<name>.py (or <folder>/<name>.py: scripts/prepare_data.py) as a module. code/ and scripts/ hold flat
    scripts (run as `python code/<name>.py`), not packages; a test session that already imported it (pytest's
    pythonpath) gets that module."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _stage_file(stage: str | int) -> Path:
    name = f"stage_{stage}" if isinstance(stage, int) or str(stage).isdigit() else str(stage)
    path = TINY_CONFIGS / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in TINY_CONFIGS.glob("*.yaml")))
        raise ValueError(f"tiny workspace: no tiny config {path.name}; known: {known}")
    return path


@dataclass
class TinyEnv:
    root: Path
    ckpt: Path
    data: Path
    delta: Path
    overrides: list[str] = field(default_factory=list)
    _built: set[str] = field(default_factory=set)

    # -- configs ---------------------------------------------------------------------------------------------
    def _remap(self, value: str) -> str | None:
        """A tiny-config path -> the same path under this environment's folders (None: not a tiny path)."""
        for prefix, target in (("ckpt/tiny/delta", self.delta), ("ckpt/tiny", self.ckpt), ("data/toy", self.data),
                               ("runs", self.root / "runs")):
            if value == prefix or value.startswith(prefix + "/"):
                return str(target / value[len(prefix):].lstrip("/"))
        return None

    def _path_overrides(self, stage: str | int, sections: tuple[str, ...]) -> list[str]:
        from nextgpt import config

        found: list[str] = []

        def walk(node, keys):
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(v, keys + [k])
            elif isinstance(node, str) and (new := self._remap(node)) is not None:
                found.append(f"{'.'.join(keys)}={new}")

        data = config.load(_stage_file(stage)).to_dict()
        for section in sections:
            walk(data[section], [section])
        return found

    def stage_overrides(self, stage: str | int) -> list[str]:
        """self.overrides + this stage's train.* paths (output_dir, init_from) moved into self.delta."""
        return self.overrides + self._path_overrides(stage, ("train",))

    def config(self, stage: str | int, *extra_overrides: str):
        from nextgpt import config

        return config.load(_stage_file(stage), [*self.stage_overrides(stage), *extra_overrides])

    def argv(self, stage: str | int, *extra_overrides: str) -> list[str]:
        """['--config', <tiny yaml>, '--set', k=v, ...] for a script's main(argv)."""
        args = ["--config", str(_stage_file(stage))]
        for text in [*self.stage_overrides(stage), *extra_overrides]:
            args += ["--set", text]
        return args

    # -- lazily built parts ----------------------------------------------------------------------------------
    @property
    def imagebind(self) -> Path:
        path = self.ckpt / "imagebind" / "imagebind_tiny.pth"
        if not path.exists():
            from tiny import make_tiny_ckpt

            make_tiny_ckpt.write_imagebind(path)
        return path

    def _process(self, what: str, stages: tuple[str, ...], extra: tuple[str, ...]) -> None:
        if what in self._built:
            return
        process_embeddings = code_script("process_embeddings")
        for stage in stages:
            rc = process_embeddings.main([*self.argv(stage), "--all", *extra])
            if rc not in (0, None):
                raise RuntimeError(f"TinyEnv.{what}(): process_embeddings {stage} --all {' '.join(extra)} "
                                   f"exited {rc}")
        self._built.add(what)

    def embeddings(self) -> Path:
        """Caption embeddings of every stage-2/3 target, as `make embeddings` (once per session)."""
        self._process("embeddings", ("stage_3",), ())      # --all: every catalog dataset, stage 2's included
        return self.data / "embed"

    def features(self) -> Path:
        """ImageBind features of every stage-1/3 input medium, as `make features` (once per session)."""
        _ = self.imagebind
        self._process("features", ("stage_1",), ("--features",))     # --all: stage 3's inputs too
        return self.data / "features"


def tiny_env_at(root: Path, ckpt: Path | None = None, data: Path | None = None) -> TinyEnv:
    """A TinyEnv over folders (default root/ckpt, root/data; nothing is built) with the overrides that point every
    model / data / inference path of the tiny configs (the same in every stage file) at them."""
    ckpt, data = ckpt or root / "ckpt", data or root / "data"
    env = TinyEnv(root=root, ckpt=ckpt, data=data, delta=ckpt / "delta")
    env.overrides = env._path_overrides("stage_3", ("model", "data", "inference"))
    if not any(o.startswith("inference.ckpt=") for o in env.overrides):
        # the tiny configs inherit the real inference.ckpt; the tiny stage-3 delta is the one to decode with
        env.overrides.append(f"inference.ckpt={env.delta / 'stage_3'}")
    return env


def build_tiny_env(root: Path) -> TinyEnv:
    """Toy data (make_toy_data.main) and tiny checkpoints (make_tiny_ckpt.main) under `root`."""
    from tiny import make_tiny_ckpt
    from tiny import make_toy_data

    env = tiny_env_at(root)
    if make_toy_data.main(["--out", str(env.data)]) != 0:
        raise RuntimeError("tiny workspace: make_toy_data failed (see its error line above)")
    if make_tiny_ckpt.main(["--out", str(env.ckpt), "--data", str(env.data), "--only", "llm", "pipelines"]) != 0:
        raise RuntimeError("tiny workspace: make_tiny_ckpt failed (see its error line above)")
    _ = env.imagebind
    return env
