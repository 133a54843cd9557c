"""Structure of ``src/``: layers only import downwards, no import cycles, no look-alike module names.

Layers, lowest first (a package may import its own modules and any lower layer, never a higher one or a
sibling of its own rank):

    utils  <  config  <  data, models  <  evaluation  <  assembly  <  thresholds  <  training  <  inference
           <  apps (src/train.py, eval.py, predict.py)  <  experiments

``config`` declares every setting (plain dataclasses), so the models build from it; ``assembly`` builds
objects from settings and checkpoint files for training and inference alike, so inference needs nothing
from training; ``training`` runs the evaluation after each task, so ``evaluation`` sits below it.
``experiments/`` is a client: it may import the package (never ``tests/``), and nothing imports it.
Every import counts, including those inside functions and under ``TYPE_CHECKING``: a lazy import hides a
dependency from the reader but not from the design.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "moleflow"
LAYERS = {
    "utils": 0,
    "config": 1,
    "data": 2,
    "models": 2,
    "evaluation": 3,
    "assembly": 4,
    "thresholds": 5,
    "training": 6,
    "inference": 7,
}
CLI_MODULES = {"moleflow.cli", "moleflow.__main__"}  # the installed commands: above every layer
APPS_RANK = 9  # the entry points next to the package: src/*.py


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    files = sorted((SRC / PACKAGE).rglob("*.py")) + sorted(SRC.glob("*.py"))
    return {_module_name(p): p for p in files}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The known module an import names (``a.b.c`` -> ``a.b.c``, or its longest known prefix)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every moleflow module ``module`` imports, anywhere in the file (top level, functions, TYPE_CHECKING)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # a submodule by its name, otherwise (a class, a function) the module the name comes from
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, modules) if name.split(".")[0] == PACKAGE else None
            if target is not None and target != module:
                found.add(target)
    return found


def _rank(module: str) -> tuple[str, float]:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return "apps", APPS_RANK
    if parts == [PACKAGE]:  # the package's face (its public names): above every layer, below the apps
        return PACKAGE, APPS_RANK - 0.5
    if module in CLI_MODULES:
        return "cli", APPS_RANK - 1
    if len(parts) < 2 or parts[1] not in LAYERS:
        msg = f"{module} is in no layer: add its package to LAYERS in {Path(__file__).name}."
        raise AssertionError(msg)
    return parts[1], LAYERS[parts[1]]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_every_package_has_a_layer() -> None:
    packages = {p.name for p in (SRC / PACKAGE).iterdir() if p.is_dir() and any(p.glob("*.py"))}
    assert packages == set(LAYERS)
    modules = {p.stem for p in (SRC / PACKAGE).glob("*.py")} - {"__init__"}
    assert {f"{PACKAGE}.{m}" for m in modules} == CLI_MODULES  # no loose module besides the commands


def test_imports_only_go_down() -> None:
    upward = []
    for module, targets in _graph().items():
        layer, rank = _rank(module)
        for target in sorted(targets):
            other, other_rank = _rank(target)
            if other != layer and other_rank >= rank:
                upward.append(f"{module} ({layer}) imports {target} ({other})")
    assert not upward, "imports from a higher layer or a sibling:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles found by a depth-first search, each as the modules around it."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_search_finds_a_cycle() -> None:
    graph = {"detector": {"export", "scoring"}, "export": {"pipeline"}, "pipeline": {"detector"}, "scoring": set()}
    assert _cycles(graph) == [["detector", "export", "pipeline", "detector"]]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from moleflow.training.module_checkpoints import load_checkpoint", {"moleflow.training.module_checkpoints"}),
        ("import moleflow.models.router", {"moleflow.models.router"}),
        ("from moleflow.models import router", {"moleflow.models.router"}),
        ("from . import metrics", {"moleflow.evaluation.metrics"}),
        ("def f():\n    from moleflow.utils.files import atomic_write", {"moleflow.utils.files"}),
        ("import torch\nfrom torch import nn", set()),
    ],
)
def test_the_parser_sees_every_kind_of_import(source: str, expected: set[str], tmp_path: Path) -> None:
    fake = tmp_path / "evaluation_probe.py"
    fake.write_text(source)
    assert _imports("moleflow.evaluation.probe", fake, _modules()) == expected


def _look_alikes(names: list[str]) -> list[tuple[str, str]]:
    """Pairs of module names of one package that begin alike (6+ letters), e.g. calibration / calibrating."""
    return [
        (a, b)
        for i, a in enumerate(sorted(names))
        for b in sorted(names)[i + 1 :]
        if len(os.path.commonprefix([a, b])) >= 6
    ]


def test_module_names_do_not_look_alike() -> None:
    """Names say what a module is: unique across the package, and no two in one folder that begin alike."""
    files = [p for p in (SRC / PACKAGE).rglob("*.py") if p.name != "__init__.py"]
    stems = [p.stem for p in files]
    assert sorted({s for s in stems if stems.count(s) > 1}) == []
    for folder in sorted({p.parent for p in files}):
        assert _look_alikes([p.stem for p in files if p.parent == folder]) == [], folder.name
    assert _look_alikes(["calibration", "calibrating", "stacked_head", "stacked_layers", "scoring"]) == [
        ("calibrating", "calibration"),
        ("stacked_head", "stacked_layers"),
    ]


EXPERIMENTS = SRC.parent / "experiments"


def _top_level_imports(path: Path) -> set[str]:
    """The first name of every absolute import in a file (``tests``, ``moleflow``, ``experiments``, ...)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_experiments_are_a_client_of_the_package() -> None:
    """experiments/ imports the installed package, never tests/ or the entry scripts, and never edits sys.path;
    the package never imports experiments/."""
    problems = []
    for path in sorted(EXPERIMENTS.rglob("*.py")):
        names = _top_level_imports(path)
        bad = sorted(names & {"tests", "train", "eval", "predict"})
        if bad:
            problems.append(f"{path.relative_to(SRC.parent)} imports {bad}")
        if "sys.path" in path.read_text():
            problems.append(f"{path.relative_to(SRC.parent)} edits sys.path")
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        if "experiments" in _top_level_imports(path):
            problems.append(f"{path.relative_to(SRC)} imports experiments")
    assert not problems, "\n".join(problems)
