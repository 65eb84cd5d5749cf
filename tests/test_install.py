"""lmforge installed: one top-level name in site-packages, the presets inside it, and no module
importable under two names.

The wheel tests build lmforge from a copy of the source tree once, install it into a fresh venv
beside two dummy top-level packages named `launcher` and `scaling` (names other distributions
own), and run that venv's `lmforge` outside the repository (its dependencies from the
repository's .venv on PYTHONPATH, which reads no .pth file, so the repository's editable install
stays out).
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import tomllib

from lmforge.pretrain.config import presets
from tests.conftest import REPO
from tests.runs import TINY

SOURCES = ["pyproject.toml", "README.md", "launcher", "pretrain", "finetune", "scaling", "configs"]
PARTS = ("launcher", "pretrain", "finetune", "scaling")  # the repository's folders of code
DUMMIES = ("launcher", "scaling")
QUIET = {"capture_output": True, "text": True, "check": True, "timeout": 300}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, env, work): a fresh venv with the wheel and the two dummies, and an empty folder
    outside the repository to run it from."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp)],
        cwd=src,
        **QUIET,
    )
    (wheel,) = tmp.glob("lmforge-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], **QUIET)
    site = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ],
        **QUIET,
    ).stdout.strip()
    for name in DUMMIES:  # as another distribution would have installed them
        os.makedirs(os.path.join(site, name))
        with open(os.path.join(site, name, "__init__.py"), "w") as f:
            f.write(f"WHO = 'the dummy {name}'\n")
    subprocess.run([*pip, "--python", str(venv / "bin/python"), "install", "-q", "--no-deps",
                    str(wheel)], **QUIET)  # fmt: skip
    work = tmp / "work"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"], PYTHONNOUSERSITE="1")
    return venv, site, env, work


def _lmforge(installed, *args: str, cwd=None) -> subprocess.CompletedProcess:
    venv, _, env, work = installed
    return subprocess.run(
        [str(venv / "bin/lmforge"), *args],
        cwd=cwd or work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_wheel_adds_one_top_level_name(installed):
    venv, site, env, work = installed
    ours = sorted(set(os.listdir(site)) - set(DUMMIES) - {"__pycache__"})
    assert ours == ["lmforge", "lmforge-0.1.0.dist-info"], ours
    record = os.path.join(site, "lmforge-0.1.0.dist-info", "RECORD")
    with open(record) as f:
        tops = {line.split(",")[0].split("/")[0] for line in f if line.strip()}
    assert tops == {"lmforge", "lmforge-0.1.0.dist-info", ".."}, tops  # ..: bin/lmforge
    parts = sorted(os.listdir(os.path.join(site, "lmforge")))
    assert parts == ["configs", "finetune", "launcher", "pretrain", "scaling"], parts


def test_the_dummies_and_lmforge_both_import(installed):
    venv, site, env, work = installed
    probe = (
        "import launcher, scaling, lmforge.launcher.cli, lmforge.scaling.fit, lmforge.configs; "
        "print(launcher.WHO, '|', scaling.WHO, '|', lmforge.launcher.cli.__file__)"
    )
    out = subprocess.run([str(venv / "bin/python"), "-c", probe], cwd=work, env=env, **QUIET)
    who_launcher, who_scaling, cli = (p.strip() for p in out.stdout.split("|"))
    assert (who_launcher, who_scaling) == ("the dummy launcher", "the dummy scaling")
    assert cli.startswith(site + "/lmforge/launcher/"), cli  # not the repository's


def test_installed_wheel_resolves_presets_outside_the_repository(installed):
    venv, _, _, work = installed
    listed = _lmforge(installed, "print-config", "--presets")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith(f"# presets in {venv}/lib/"), listed.stdout[:200]
    for line in ("model:", "  tiny ", "parallel:", "  zero3 ", "pretrain:", "  demo "):
        assert line in listed.stdout
    shown = _lmforge(installed, "print-config", "configs/pretrain/demo.yaml", "model=tiny",
                     "parallel=zero3")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "name: demo" in shown.stdout and "d_model: 128" in shown.stdout
    assert "strategy: deepspeed" in shown.stdout and "zero_stage: 3" in shown.stdout
    bad = _lmforge(installed, "print-config", "demo", "parallel=zero5")
    assert bad.returncode != 0
    assert bad.stderr.splitlines()[-1] == (
        "error: `parallel`='zero5' is neither a file nor a parallel preset; give a YAML file or "
        "one of the parallel presets: " + ", ".join(presets.names("parallel"))
        + " (lmforge print-config --presets)"
    )  # fmt: skip
    assert not (work / "configs").exists() and os.listdir(work) == []


def test_installed_wheel_pretrains_outside_the_repository(installed, tiny_data, tmp_path):
    """Two steps of the demo preset from another folder, with the dummies installed beside."""
    venv, _, env, _ = installed
    runs = tmp_path / "runs"
    out = _lmforge(installed, "pretrain", "demo", *TINY, f"data.path={tiny_data}",
                   f"runs_dir={runs}", "name=installed", "train.max_steps=2",
                   cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    with open(runs / "installed" / "metrics.jsonl") as f:
        steps = [r["step"] for r in map(json.loads, f) if r["kind"] == "train"]
    assert steps == [1, 2]
    probe = "import launcher, scaling; print(launcher.WHO, scaling.WHO)"
    still = subprocess.run([str(venv / "bin/python"), "-c", probe], cwd=tmp_path, env=env, **QUIET)
    assert still.stdout.strip() == "the dummy launcher the dummy scaling"


def _folders() -> set[str]:
    found = {"lmforge.configs"}
    for part in PARTS:
        for dirpath, _, files in os.walk(os.path.join(REPO, part)):
            if "__init__.py" in files:
                found.add("lmforge." + os.path.relpath(dirpath, REPO).replace(os.sep, "."))
    return found


def test_pyproject_lists_every_package():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    assert listed == _folders()


def _first_party_imports_outside_the_namespace(path: str) -> list[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom):  # relative: resolves to two names as well
            names = ["." * node.level + (node.module or "")]
        else:
            continue
        bad += [f"{path}:{node.lineno} {n}" for n in names if n.split(".")[0] in (*PARTS, "")]
    return bad


def test_no_module_is_importable_under_two_names(tmp_path):
    """The code and the tests import lmforge's modules as lmforge.* only; outside the
    repository's root the short names do not exist; and importing every module of lmforge loads
    nothing under a short name (two names would be two copies with two sets of classes)."""
    bad = []
    for top in (*PARTS, "tests", "scripts"):
        for dirpath, _, files in os.walk(os.path.join(REPO, top)):
            bad += [
                p
                for f in files
                if f.endswith(".py")
                for p in _first_party_imports_outside_the_namespace(os.path.join(dirpath, f))
            ]
    assert bad == []
    # ... nor in the code that tests hand to another Python as text (python -c, scripts)
    in_text = re.compile(
        r"\b(from|import)\s+(launcher|pretrain|finetune|scaling)(\.\w+)*\s+import\b"
    )
    for top in (*PARTS, "tests", "scripts"):
        for dirpath, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith(".py"):
                    with open(os.path.join(dirpath, f)) as fh:
                        bad += [f"{f}: {m.group(0)}" for m in in_text.finditer(fh.read())]
    assert bad == []
    short = "; ".join(
        f"importlib.util.find_spec('{p}') is None or sys.exit('{p} importable')" for p in PARTS
    )
    probe = subprocess.run(
        [sys.executable, "-c", f"import importlib.util, sys; {short}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, probe.stderr
    for name in sorted(_folders() - {"lmforge.configs"}):
        for f in os.listdir(os.path.join(REPO, *name.split(".")[1:])):
            if f.endswith(".py") and f not in ("__init__.py", "__main__.py"):
                importlib.import_module(f"{name}.{f[:-3]}")
    assert [m for m in sys.modules if m.split(".")[0] in PARTS] == []
