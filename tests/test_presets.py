"""Presets: configs/ shipped in the wheel as lmforge_configs, named by path or by name.

The wheel test builds lmforge from a copy of the source tree, installs it into a fresh venv and
runs that venv's `lmforge` outside the repository (its dependencies from the repository's .venv
on PYTHONPATH, which reads no .pth file, so the repository's editable install stays out).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from pretrain import presets
from pretrain.config import ModelConfig, ParallelConfig, PretrainConfig, load_config
from pretrain.errors import ConfigurationError
from tests.conftest import REPO

SOURCES = ["pyproject.toml", "README.md", "launcher", "pretrain", "finetune", "scaling", "configs"]


def test_names_paths_and_unknown_names(tmp_path, monkeypatch):
    """In-process: a bare name, a repository spelling that does not exist here, a local file
    that wins over the preset of the same name, and the one-line list for an unknown name."""
    monkeypatch.chdir(tmp_path)  # no configs/ here
    cfg = load_config(PretrainConfig, ["demo", "model=mini", "parallel=zero3"])
    assert (cfg.name, cfg.model.d_model, cfg.parallel.zero_stage) == ("demo", 256, 3)
    cfg = load_config(
        PretrainConfig, ["configs/pretrain/demo.yaml", "model=configs/model/small.yaml"]
    )
    assert cfg.model.d_model == 384
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs/model/small.yaml").write_text("d_model: 64\nn_head: 4\n")
    local = load_config(ModelConfig, ["configs/model/small.yaml"])
    assert local.d_model == 64  # an existing file wins
    assert load_config(ParallelConfig, ["fsdp"]).strategy == "fsdp"
    with pytest.raises(ConfigurationError) as err:
        load_config(PretrainConfig, ["demo", "model=tinny"])
    assert str(err.value).startswith("`model`='tinny' is neither a file nor a model preset; give")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigurationError, match="not found: configs/parallel/zero4.yaml; give"):
        load_config(PretrainConfig, ["demo", "parallel=configs/parallel/zero4.yaml"])
    with pytest.raises(ConfigurationError, match="'dmeo' is neither .* pretrain presets: demo"):
        load_config(PretrainConfig, ["dmeo"])
    # a mapping or a plain value is still an override, not a preset name
    assert load_config(PretrainConfig, ["demo", "model={n_layer: 2}"]).model.n_layer == 2


def test_every_preset_listed_with_its_description():
    listing = presets.listing()
    for section in os.listdir(os.path.join(REPO, "configs")):
        assert f"\n{section}:\n" in listing
        for f in os.listdir(os.path.join(REPO, "configs", section)):
            name = f.rsplit(".", 1)[0]
            desc = presets.description(os.path.join(REPO, "configs", section, f))
            assert desc and "\n" not in desc and len(desc) < 100, (f, desc)
            assert f"  {name:<14} {desc}" in listing
    assert "tiny model for tests" in listing


def test_installed_wheel_resolves_presets_outside_the_repository(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    pip = [sys.executable, "-m", "pip"]
    quiet = {"capture_output": True, "text": True, "check": True, "timeout": 300}
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path)],
        cwd=src,
        **quiet,
    )
    (wheel,) = tmp_path.glob("lmforge-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], **quiet)
    subprocess.run([*pip, "--python", str(venv / "bin/python"), "install", "-q", "--no-deps",
                    str(wheel)], **quiet)  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"], PYTHONNOUSERSITE="1")
    python = str(venv / "bin/python")
    where = subprocess.run(
        [python, "-c", "import launcher, lmforge_configs; print(launcher.__file__)"],
        cwd=work,
        env=env,
        **quiet,
    ).stdout.strip()
    assert where.startswith(str(venv)), where  # not the repository's launcher

    def installed(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(venv / "bin/lmforge"), *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    listed = installed("print-config", "--presets")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith(f"# presets in {venv}/lib/"), listed.stdout[:200]
    for line in ("model:", "  tiny ", "parallel:", "  zero3 ", "pretrain:", "  demo "):
        assert line in listed.stdout
    shown = installed("print-config", "configs/pretrain/demo.yaml", "model=tiny", "parallel=zero3")
    assert shown.returncode == 0, shown.stderr
    assert "name: demo" in shown.stdout and "d_model: 128" in shown.stdout
    assert "strategy: deepspeed" in shown.stdout and "zero_stage: 3" in shown.stdout
    bad = installed("print-config", "demo", "parallel=zero5")
    assert bad.returncode != 0
    assert bad.stderr.splitlines()[-1] == (
        "error: `parallel`='zero5' is neither a file nor a parallel preset; give a YAML file or "
        "one of the parallel presets: " + ", ".join(presets.names("parallel"))
        + " (lmforge print-config --presets)"
    )  # fmt: skip
    assert not (work / "configs").exists() and os.listdir(work) == []
