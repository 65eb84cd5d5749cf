"""The layers point down (docs/architecture.md): read every first-party module's imports and
check that none reaches a higher layer, that there are no import cycles, and that no function
imports the standard library locally (local imports are for heavy libraries only)."""

from __future__ import annotations

import ast
import os
import sys

import pytest

from tests.conftest import REPO

PACKAGES = ("pretrain", "finetune", "scaling", "launcher")

# Lower numbers are lower layers; a module may import its own layer and those below.
PRETRAIN_LAYERS = {
    # core: errors, process helpers, durable files, stop signals held while starting, the
    # run directory's lock
    "pretrain": 0,
    "pretrain.errors": 0,
    "pretrain.dist": 0,
    "pretrain.durable": 0,
    "pretrain.signals": 0,
    "pretrain.runlock": 0,
    "pretrain.safeload": 0,  # reading pickled checkpoint files without running their code
    "pretrain.presets": 0,  # the packaged config presets and how an argument names one
    # what a run is: config, layout, losses
    "pretrain.config": 1,
    "pretrain.layout": 1,
    "pretrain.dsconfig": 1,  # the user's DeepSpeed JSON (no torch: checked with the config)
    "pretrain.loss": 1,
    # model and data
    "pretrain.model": 2,
    "pretrain.tokenizer": 2,
    "pretrain.sources": 2,
    "pretrain.prepare": 2,
    "pretrain.data": 2,
    "pretrain.flops": 2,
    "pretrain.optim": 2,
    "pretrain.metrics": 2,
    # parallelize
    "pretrain.parallel": 3,
    "pretrain.memory": 3,
    # the loop
    "pretrain.trainer": 4,
    "pretrain.preemption": 4,
    # checkpoints
    "pretrain.checkpoint": 5,
    "pretrain.consolidate": 5,
    # the run session and the commands built on it
    "pretrain.session": 6,
    "pretrain.run": 6,
    "pretrain.ckpt_bench": 6,  # lmforge bench --checkpoint
}
PACKAGE_LAYERS = {"finetune": 7, "scaling": 8, "launcher": 9}


def layer(module: str) -> int:
    for name in sorted(PRETRAIN_LAYERS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return PRETRAIN_LAYERS[name]
    top = module.split(".")[0]
    if top == "pretrain":
        raise AssertionError(f"{module} has no layer: add it to PRETRAIN_LAYERS")
    return PACKAGE_LAYERS[top]


def modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(REPO, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    out[name.removesuffix(".__init__")] = path
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """First-party import edges (module-level and local), and the function-local imports of
    the standard library as ``module:line name``."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    local_stdlib = []
    for mod, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in _runtime_nodes(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                names = []
            edges[mod].update(n for n in names if n in mods and n != mod)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Import):
                        top = sub.names[0].name.split(".")[0]
                    elif isinstance(sub, ast.ImportFrom) and sub.level == 0:
                        top = (sub.module or "").split(".")[0]
                    else:
                        continue
                    if top in sys.stdlib_module_names:
                        local_stdlib.append(f"{mod}:{sub.lineno} {top}")
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
    assert "pretrain.session" in edges["pretrain.run"]
    assert "pretrain.parallel.common" in edges["pretrain.parallel.mesh"]
    assert "pretrain.errors" in edges["launcher.slurm"]


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
    edges = {"pretrain.model": {"pretrain.trainer"}, "pretrain.trainer": {"pretrain.model"}}
    assert cycles(edges) == [["pretrain.model", "pretrain.trainer"]]
    assert layer("pretrain.trainer") > layer("pretrain.model")  # so model -> trainer is upward
