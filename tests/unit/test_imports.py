"""The package's import graph (read with ast, nothing imported): a room (a sub-package of nextgpt) imports only the
top-level modules and the rooms below it, the top imports no room, there are no cycles between modules, and
nothing in code/nextgpt imports the tooling (scripts/, dev/, tests/)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "code" / "nextgpt"
TOP = {"config", "typed", "modalities", "tokens", "runtime", "io", "cli", "launch"}  # launch: a 2-line forwarder
ROOMS = ["store", "imagebind", "data", "model", "checkpoint", "eval", "training"]     # bottom to top
TOOLING = {"tiny", "bench", "chaos", "scripts", "dev", "tests", "programmed_llm", "conftest"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    # a module importing its own package (`from nextgpt import store` in store/convert.py: the package's facade)
    # is not an edge
    return {name: {m for m in imports(path) if m in modules and m != name and not name.startswith(m + ".")}
            for name, path in modules.items()}


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ROOMS) else "top"


def test_top_holds_only_the_shared_modules():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == TOP, sorted(top ^ TOP)
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(ROOMS)


def test_rooms_import_only_the_top_and_the_rooms_below():
    rank = {room: i for i, room in enumerate(ROOMS)}
    bad = []
    for module, targets in graph().items():
        here = room_of(module)
        for target in targets:
            there = room_of(target)
            if there == "top" or there == here:
                continue
            if here == "top" and module != "nextgpt.launch" or here != "top" and rank[there] > rank[here]:
                bad.append(f"{module} -> {target}")
    assert not bad, bad


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_package_never_imports_the_tooling():
    bad = [f"{module_name(p)} -> {m}" for p in PACKAGE.rglob("*.py") for m in imports(p)
           if m.split(".")[0] in TOOLING]
    assert not bad, bad
