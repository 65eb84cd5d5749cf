"""Every YAML in configs/ loads; every bad input gives the promised one-line error."""

from __future__ import annotations

import glob
import os

import pytest
from omegaconf import OmegaConf

from lmforge.finetune.config import FinetuneConfig
from lmforge.launcher.cli import main
from lmforge.launcher.slurm import SlurmProfile
from lmforge.pretrain.config.schema import (
    ModelConfig,
    ParallelConfig,
    PrepareConfig,
    PretrainConfig,
    load_config,
    to_container,
)
from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.scaling.config import ScalingConfig
from tests.conftest import REPO

SCHEMAS = {
    "model": ModelConfig,
    "prepare": PrepareConfig,
    "pretrain": PretrainConfig,
    "parallel": ParallelConfig,
    "slurm": SlurmProfile,
    "finetune": FinetuneConfig,
    "scaling": ScalingConfig,
}


@pytest.mark.parametrize(
    "path",
    sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)),
    ids=lambda p: os.path.relpath(p, REPO),
)
def test_every_yaml_loads(path):
    section = os.path.basename(os.path.dirname(path))
    cfg = load_config(SCHEMAS[section], [path])
    assert isinstance(cfg, SCHEMAS[section])
    _assert_applied(OmegaConf.to_container(OmegaConf.load(path)), to_container(cfg))


def _assert_applied(given, loaded, key: str = "") -> None:
    """Every value a file gives is the loaded config's (in sections and lists of sections)."""
    if isinstance(given, dict):
        for k, v in given.items():
            assert k in loaded, f"{key}{k} is not in the loaded config"
            _assert_applied(v, loaded[k], f"{key}{k}.")
    elif isinstance(given, list) and any(isinstance(v, dict) for v in given):
        assert len(loaded) == len(given), key.rstrip(".")
        for i, (g, v) in enumerate(zip(given, loaded, strict=True)):
            _assert_applied(g, v, f"{key.rstrip('.')}[{i}].")
    else:
        assert loaded == given, f"{key.rstrip('.')}: {loaded!r} != {given!r}"


def test_section_preset_and_order(tmp_path):
    args = [
        "name=x",
        "data.path=d",
        "train.max_steps=5",
        f"model={REPO}/configs/model/small.yaml",
        "model.n_layer=3",
    ]
    cfg = load_config(PretrainConfig, args)
    assert (cfg.model.d_model, cfg.model.n_layer) == (384, 3)  # preset, then the later override
    cfg = load_config(PretrainConfig, [*args, f"model={REPO}/configs/model/tiny.yaml"])
    assert (cfg.model.d_model, cfg.model.n_layer) == (128, 4)  # later wins


def _error(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, f"exit code {code}"
    assert len(err) == 1, f"expected one line, got {err}"
    return err[0]


BASE = ("pretrain", "name=x", "data.path=/nonexistent", "train.max_steps=5")


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["optim.lrr=1"], "unknown config key `optim.lrr`; did you mean `optim.lr`?"),
        (["optim.lr=fast"], "config key `optim.lr`"),
        (["model.d_model=100", "model.n_head=3"], "must be divisible by `model.n_head`=3"),
        (["train.seq_len=4096"], "exceeds `model.max_seq_len`"),
        (["train.max_tokens=100"], "can't provide both `train.max_steps` and `train.max_tokens`"),
        (["train.precision=fp64"], "config key `train.precision`"),
        (["model.n_kv_head=3"], "must be a multiple of `model.n_kv_head`=3"),
        (["name=a/b"], "must be a plain directory name"),
        (["/no/such.yaml"], "config file not found: /no/such.yaml"),
        (["parallel.zero_stage=2"], "`parallel.zero_stage` needs `parallel.strategy=deepspeed`"),
        (["parallel.strategy=deepspeed", "parallel.zero_stage=4"], "must be 0-3, got 4"),
        (
            [
                "parallel.strategy=deepspeed",
                "parallel.zero_stage=2",
                "parallel.offload_params=true",
            ],
            "`parallel.offload_params` needs parallel.zero_stage=3",
        ),
        (
            [
                "parallel.strategy=deepspeed",
                "parallel.zero_stage=0",
                "parallel.offload_optimizer=true",
            ],
            "needs ZeRO stage >= 1",
        ),
        (["parallel.strategy=zero"], "config key `parallel.strategy`"),
        (
            ["parallel.tensor_parallel=3"],
            "parallel layout (world_size=1, tensor_parallel=3, pipeline_parallel=1, data_parallel"
            "=world_size/(tp*pp)=0.333333): world_size must be a multiple of tensor_parallel",
        ),
        (["parallel.tensor_parallel=3"], "tensor_parallel=3 must divide model.n_head=4"),
        (["parallel.pipeline_parallel=9"], "pipeline_parallel=9 exceeds model.n_layer=4"),
        (
            ["parallel.tensor_parallel=2", "model.tie_embeddings=true"],
            "model.tie_embeddings=true cannot be split",
        ),
        (
            ["parallel.tensor_parallel=2", "model.family=qwen3", "model.qk_norm=true"],
            "model.qk_norm=true (Qwen3) is not split by tensor parallelism yet",
        ),
        (["model.qk_norm=true"], "`model.qk_norm`=true is not part of `model.family`=llama"),
        (["model.family=qwen2"], "`model.family`=qwen2 has `model.qkv_bias`"),
        (
            ["model.family=qwen2", "model.qkv_bias=true", "model.head_dim=16"],
            "`model.family`=qwen2 has heads of d_model / n_head",
        ),
        (["model.head_dim=7"], "the head width 7 must be even for RoPE"),
        (["model.rope_scaling.factor=0.5"], "`model.rope_scaling` needs factor >= 1"),
        (["parallel.tensor_parallel=0"], "`parallel.tensor_parallel` must be >= 1, got 0"),
        (
            ["parallel.strategy=deepspeed", "parallel.pipeline_parallel=2"],
            "run under strategy ddp or fsdp",
        ),
        (
            ["parallel.strategy=fsdp", "parallel.pipeline_parallel=2"],
            "combines with data parallel only",
        ),
    ],
)
def test_bad_config_one_line(capsys, extra, expected):
    assert expected in _error(capsys, *BASE, *extra)


def test_missing_required_and_run_length(capsys):
    assert "`data.path` is not set" in _error(capsys, "pretrain", "name=x", "train.max_steps=1")
    assert "set the run length" in _error(capsys, "pretrain", "name=x", "data.path=d")


def test_missing_data(capsys):
    msg = _error(capsys, *BASE)
    assert "/nonexistent" in msg and "lmforge prepare" in msg


def test_bad_batch_and_vocab(capsys, tiny_data, tmp_path):
    common = (
        "pretrain",
        "name=x",
        f"data.path={tiny_data}",
        f"runs_dir={tmp_path}",
        "train.max_steps=1",
        "train.seq_len=64",
        "model.max_seq_len=64",
    )
    msg = _error(capsys, *common, "train.micro_batch_size=3", "train.global_batch_tokens=1000")
    assert "train.global_batch_tokens=1000 is not a multiple" in msg and "use e.g." in msg
    msg = _error(capsys, *common, "model.vocab_size=999")
    assert "model.vocab_size=999" in msg and "512" in msg
    assert not os.path.exists(tmp_path / "x"), "a refused run must not leave a run directory"


def test_prepare_errors(capsys, tmp_path):
    assert "`sources` is empty" in _error(capsys, "prepare", f"out={tmp_path}/o")
    msg = _error(capsys, "prepare", f"out={tmp_path}/o", "sources=[{path: /no/such/file.txt}]")
    assert "/no/such/file.txt" in msg


def test_consolidate_errors(capsys, tmp_path):
    msg = _error(capsys, "consolidate", str(tmp_path), "--out", str(tmp_path / "o"))
    assert "neither a checkpoint" in msg and "runs/<name>" in msg
    assert not (tmp_path / "o").exists()


def test_submit_errors(capsys, monkeypatch):
    job = ("--", "pretrain", "configs/pretrain/demo.yaml")
    msg = _error(capsys, "submit", "nodez=2", *job)
    assert "unknown config key `nodez`; did you mean `nodes`?" in msg
    assert "`time` must be" in _error(capsys, "submit", "time=soon", *job)
    assert "needs a command after `--`" in _error(capsys, "submit", "configs/slurm/local.yaml")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "sbatch not found" in _error(capsys, "submit", "configs/slurm/local.yaml", *job)


def test_print_config(capsys):
    assert main(["print-config", "name=x", "data.path=d", "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "d_model: 128" in out
    assert main(["print-config", "--keys"]) == 0
    keys = capsys.readouterr().out
    assert "optim.lr = 0.0003  # Peak learning rate." in keys


def test_print_config_for_scaling(capsys):
    assert main(["print-config", "--for", "scaling", "--keys"]) == 0
    keys = capsys.readouterr().out
    assert "shape.aspect_ratio = 32.0" in keys and "fit.holdout = []" in keys
    assert main(["print-config", "--for", "scaling", "configs/scaling/demo.yaml"]) == 0
    assert "holdout:\n  - 4800000000000.0" in capsys.readouterr().out


def test_load_config_raises_configuration_error():
    with pytest.raises(ConfigurationError):
        load_config(PretrainConfig, ["nme=x"])


def test_deepspeed_json_is_completed_not_contradicted(tmp_path, capsys):
    """A user's DeepSpeed JSON keeps its own settings; batch, precision and clipping are ours."""
    import json

    from lmforge.pretrain.parallel import deepspeed_config

    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "train_batch_size": 999,
                "bf16": {"enabled": False, "immediate_grad_update": True},
                "zero_optimization": {"stage": 1, "overlap_comm": True},
                "wall_clock_breakdown": True,
            }
        )
    )
    par = ParallelConfig(
        strategy="deepspeed", zero_stage=3, offload_optimizer=True, deepspeed_config=str(user)
    )
    cfg = deepspeed_config(
        par,
        precision="bf16",
        world_size=4,
        micro_batch_size=2,
        grad_accum=8,
        grad_clip=1.0,
        num_params=5_000_000,
    )
    assert cfg["train_batch_size"] == 2 * 8 * 4 and cfg["gradient_accumulation_steps"] == 8
    assert cfg["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert cfg["zero_optimization"] == {
        "stage": 3,
        "overlap_comm": True,
        "offload_optimizer": {"device": "cpu"},
        "reduce_bucket_size": 5_000_000,  # sized to the model (the default is 5e8)
        "allgather_bucket_size": 5_000_000,
    }
    assert cfg["wall_clock_breakdown"] is True and cfg["gradient_clipping"] == 1.0
    out = capsys.readouterr().out
    assert "train_batch_size=999" in out and "lmforge uses 64" in out


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["pretrain", *BASE[1:], "--nproc", "0"], "--nproc 0: give at least one process"),
        (["finetune", "name=f", "init_from=x", "task.train=t", "--nproc", "-2"], "--nproc -2"),
        (["launch", "--nproc", "0", "pretrain", *BASE[1:]], "--nproc 0: give at least one"),
        (["generate", "runs/x", "--max-new-tokens", "-1"], "--max-new-tokens -1: give at least 1"),
        (["generate", "runs/x", "--top-p", "1.5"], "--top-p 1.5: give a probability mass"),
        (
            ["evaluate", "runs/x", "--text", "a.txt", "--out", "/nonexistent-dir/x.json"],
            "--out /nonexistent-dir/x.json: no directory /nonexistent-dir",
        ),
        (["runs", "no-such-run", "--runs-dir", "/tmp"], "no run no-such-run under /tmp"),
        (
            ["submit", "configs/slurm/local.yaml", "--array", "x-y", "--dry-run", "--", "prepare"],
            "--array 'x-y' is not a SLURM array",
        ),
        ([*BASE, "model=configs/model/no-such-preset.yaml"], "config file not found: configs/"),
    ],
)
def test_bad_command_line_one_line(capsys, argv, expected):
    """Values no command can use: one line naming the value, exit 2, before anything runs."""
    assert expected in _error(capsys, *argv)


@pytest.mark.parametrize(
    "command",
    [
        ["export", "{data}", "--out", "{tmp}/out"],
        ["consolidate", "{data}", "--out", "{tmp}/out"],
        ["generate", "{data}"],
        ["evaluate", "{data}", "--text", "{tmp}/x.txt"],
        ["finetune", "name=f", "runs_dir={tmp}", "init_from={data}", "task.train=t.csv"],
    ],
    ids=lambda c: c[0],
)
def test_prepared_data_given_as_a_model_is_one_line(capsys, tiny_data, tmp_path, command):
    """Every command that reads a model refuses a prepared-data directory in one line, and
    writes nothing."""
    argv = [a.format(data=tiny_data, tmp=tmp_path) for a in command]
    msg = _error(capsys, *argv)
    assert f"{tiny_data} holds prepared data (`lmforge prepare`'s output), not a checkpoint" in msg
    assert os.listdir(tmp_path) == []
