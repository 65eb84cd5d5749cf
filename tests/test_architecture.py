"""The layers point down (docs/architecture.md): read every first-party module's imports and
check that none reaches a higher layer, that there are no import cycles (counting the imports
made for type annotations only, which would otherwise hide one), and that no function imports the
standard library locally (local imports are for heavy libraries only).

The layers are the folders: each folder under pretrain/ is one layer, and the other packages sit
above the core in the order finetune, scaling, launcher. A module's layer is its folder's, so a new
module needs no entry here; a new folder does."""

from __future__ import annotations

import ast
import os
import sys

import pytest

from tests.conftest import REPO

PACKAGES = ("pretrain", "finetune", "scaling", "launcher")

# Lower numbers are lower layers; a module may import its own layer and those below.
LAYERS = {
    "lmforge.pretrain.core": 0,  # errors, processes, launch environments, durable files, locks
    "lmforge.pretrain.config": 1,  # what a run is: structured configs, layout, presets
    "lmforge.pretrain.model": 2,  # the transformer, losses, FLOPs
    "lmforge.pretrain.data": 2,  # tokenizers, sources, prepared shards, batches
    "lmforge.pretrain.parallel": 3,  # strategies and the memory estimate
    "lmforge.pretrain.train": 4,  # the loop, callbacks, optimizer, metric sinks, signals
    "lmforge.pretrain.checkpoint": 5,  # step directories, consolidation
    "lmforge.pretrain.forecast": 5,  # a run's forecast of itself, the ledger, the loss curve's law
    "lmforge.pretrain.run": 6,  # the session and the pretraining workload
    "lmforge.finetune": 7,
    "lmforge.scaling": 8,
    "lmforge.launcher": 9,
}


def layer(module: str) -> int:
    """The layer of ``module``: its folder's (``lmforge.pretrain`` itself, only a docstring, is
    the bottom)."""
    if module == "lmforge.pretrain":
        return 0
    for name, number in LAYERS.items():
        if module == name or module.startswith(name + "."):
            return number
    raise AssertionError(f"{module} is in no layer: put it in a folder of LAYERS")


def modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(REPO, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    out["lmforge." + name.removesuffix(".__init__")] = path
    return out


def first_party_imports(source: str, mods: set[str]) -> set[str]:
    """The modules of ``mods`` that ``source`` imports anywhere: at module level, in a function,
    or under ``if TYPE_CHECKING:``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            names = []
        found.update(n for n in names if n in mods)
    return found


def local_stdlib_imports(source: str) -> list[int]:
    """The lines where a function of ``source`` imports the standard library."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import):
                    top = sub.names[0].name.split(".")[0]
                elif isinstance(sub, ast.ImportFrom) and sub.level == 0:
                    top = (sub.module or "").split(".")[0]
                else:
                    continue
                if top in sys.stdlib_module_names:
                    lines.append(sub.lineno)
    return lines


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """First-party import edges, and the function-local imports of the standard library as
    ``module:line``."""
    mods = modules()
    edges: dict[str, set[str]] = {}
    local_stdlib = []
    for mod, path in mods.items():
        with open(path) as f:
            source = f.read()
        edges[mod] = first_party_imports(source, set(mods)) - {mod}
        local_stdlib += [f"{mod}:{line}" for line in local_stdlib_imports(source)]
    return edges, local_stdlib


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_is_read(graph):
    edges, _ = graph
    # the reader sees real edges (a broken reader would pass every check below)
    assert "lmforge.pretrain.run.session" in edges["lmforge.pretrain.run.pretraining"]
    assert "lmforge.pretrain.parallel.common" in edges["lmforge.pretrain.parallel.mesh"]
    assert "lmforge.pretrain.core.errors" in edges["lmforge.launcher.slurm"]


def test_no_arrow_points_up(graph):
    edges, _ = graph
    upward = sorted(
        f"{a} -> {b}" for a, targets in edges.items() for b in targets if layer(b) > layer(a)
    )
    assert upward == []


def test_no_import_cycles(graph):
    edges, _ = graph
    assert cycles(edges) == []


def test_no_local_imports_of_the_standard_library(graph):
    _, local_stdlib = graph
    assert local_stdlib == []


def test_the_checker_finds_a_cycle_and_an_upward_arrow():
    model, loop = "lmforge.pretrain.model.transformer", "lmforge.pretrain.train.loop"
    assert cycles({model: {loop}, loop: {model}}) == [[model, loop]]
    assert layer(loop) > layer(model)  # so model -> loop is upward


def test_an_annotation_only_import_counts():
    """``if TYPE_CHECKING:`` hides an import from the interpreter, not from the layers: a cycle
    through one is still a cycle (the two modules cannot be read apart)."""
    mods = {"lmforge.pretrain.model.transformer", "lmforge.pretrain.train.loop"}
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from lmforge.pretrain.train.loop import Trainer\n"
    )
    assert first_party_imports(source, mods) == {"lmforge.pretrain.train.loop"}


def test_every_folder_is_one_layer():
    """Each folder under pretrain/ is a layer of LAYERS, and LAYERS names no folder that is gone."""
    folders = {
        f"lmforge.pretrain.{d}"
        for d in os.listdir(os.path.join(REPO, "pretrain"))
        if os.path.isfile(os.path.join(REPO, "pretrain", d, "__init__.py"))
    }
    assert folders == {name for name in LAYERS if name.startswith("lmforge.pretrain.")}
    loose = [f for f in os.listdir(os.path.join(REPO, "pretrain")) if f.endswith(".py")]
    assert loose == ["__init__.py"]  # no module outside a layer's folder


def _names_by_folder() -> dict[str, list[str]]:
    """The module and subpackage names of each folder of code (tests/ included)."""
    out = {}
    for top in (*PACKAGES, "tests"):
        for dirpath, dirs, files in os.walk(os.path.join(REPO, top)):
            if "__pycache__" in dirpath:
                continue
            names = [f[:-3] for f in files if f.endswith(".py") and f != "__init__.py"]
            names += [d for d in dirs if os.path.isfile(os.path.join(dirpath, d, "__init__.py"))]
            out[os.path.relpath(dirpath, REPO)] = sorted(names)
    return out


def test_no_two_names_in_a_folder_differ_by_a_suffix_only():
    """plan.py beside planner.py, test_launcher.py beside test_launchers.py: a reader cannot
    tell which holds what."""
    clashes = [
        f"{folder}: {a} / {b}"
        for folder, names in _names_by_folder().items()
        for a in names
        for b in names
        if a != b and b.startswith(a)
    ]
    assert clashes == []


def test_one_meaning_per_class_name():
    """No two classes of the project share a name (an import would say which one only by its
    module)."""
    where: dict[str, list[str]] = {}
    for mod, path in modules().items():
        with open(path) as f:
            for node in ast.parse(f.read()).body:
                if isinstance(node, ast.ClassDef):
                    where.setdefault(node.name, []).append(mod)
    assert {name: mods for name, mods in where.items() if len(mods) > 1} == {}


def long_functions(source: str, limit: int) -> list[str]:
    """``name:line (N lines)`` of every function of ``source`` (nested ones too) longer than
    ``limit`` lines, decorators not counted."""
    return [
        f"{node.name}:{node.lineno} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > limit
    ]


def test_the_cli_has_no_long_function():
    """launcher/cli/: one module per command, each function short enough to read at once (a
    command's arguments are split over several functions rather than one long parser)."""
    found = []
    for dirpath, _, files in os.walk(os.path.join(REPO, "launcher", "cli")):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                with open(path) as fh:
                    found += [f"{f}:{p}" for p in long_functions(fh.read(), 80)]
    assert found == []
    assert long_functions("def f():\n" + "    x = 1\n" * 80, 80) == ["f:1 (81 lines)"]
