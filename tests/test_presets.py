"""Presets: configs/ shipped in the wheel as lmforge.configs, named by path or by name (the
installed wheel's presets: tests/test_install.py)."""

from __future__ import annotations

import os

import pytest

from lmforge.pretrain.config import presets
from lmforge.pretrain.config.schema import ModelConfig, ParallelConfig, PretrainConfig, load_config
from lmforge.pretrain.core.errors import ConfigurationError
from tests.conftest import REPO


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
    with pytest.raises(
        ConfigurationError, match="'dmeo' is neither .* pretrain presets: continue, demo"
    ):
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
