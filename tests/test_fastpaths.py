"""The fast paths, in real runs: `train.compile` (each transformer block compiled with
torch.compile) under DDP, FSDP with activation checkpointing and tensor parallel on 2 gloo
processes, and `train.precision=fp8` (torchao float8 training).

Compiled runs give the eager run's losses within bf16 tolerance, write the same checkpoint keys,
resume exactly, and fall back to eager mode in one line where inductor has no C++ compiler.
float8 needs a float8 GPU and torchao (the refusals are in tests/test_bad_input.py); here the
choice of layers runs everywhere and the conversion under FSDP2 where torchao is installed (on
torch's CPU float8 matmuls); scripts/check_fp8_gpu.py checks whole runs on a GPU.

Compiling is slow on a small CPU: the runs are the smallest model, shared between the tests
(each made once per module, when a test first asks for it); inductor's on-disk cache makes
later sessions faster.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import lmforge
from tests.gloo_workers import run_distributed
from tests.runs import TINY, _rows, checkpoint_weights, latest_checkpoint, read_metrics

STEPS = 20
# 1 block, width 32, 32-token windows, bf16; shuffled data and dropout (random numbers every
# step), a checkpoint every 8 steps.
RUN = [
    *TINY,
    "train.precision=bf16",
    "model.dropout=0.1",
    f"train.max_steps={STEPS}",
    "checkpoint.interval=8",
    "checkpoint.keep_last=3",
    "optim.lr=3e-3",
    "optim.warmup_steps=3",
    "data.shuffle=true",
    "logging.plot=false",
]
LAYOUTS = {
    "ddp": [],
    "fsdp-ac": ["parallel=configs/parallel/fsdp-ac.yaml"],
    "tp2": ["parallel=configs/parallel/tp2.yaml"],
}
BF16_TOLERANCE = 0.02  # per-step loss difference (losses near 6 nats)


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """``get(name, nproc, *overrides, env=...)``: the directory of that run, made once; its
    stdout is kept as stdout.txt."""
    root = str(tmp_path_factory.mktemp("fastpaths"))
    made: dict[str, str] = {}

    def get(name: str, nproc: int, *extra: str, env: dict | None = None) -> str:
        if name not in made:
            args = [f"data.path={tiny_data}", f"runs_dir={root}", f"name={name}", *RUN, *extra]
            nprocs = ["--nproc", str(nproc)] if nproc > 1 else []
            proc = lmforge("pretrain", *args, *nprocs, env=env)
            made[name] = os.path.join(root, name)
            with open(os.path.join(made[name], "stdout.txt"), "w") as f:
                f.write(proc.stdout)
        return made[name]

    return get


def losses(run_dir: str) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def stdout(run_dir: str) -> str:
    with open(os.path.join(run_dir, "stdout.txt")) as f:
        return f.read()


def checkpoint_keys(run_dir: str, step: int) -> tuple[list[str], list[str]]:
    """The keys of a checkpoint's DCP state (model and optimizer) and of its full weights."""
    from lmforge.pretrain.core.safeload import dcp_reader

    ckpt = os.path.join(run_dir, "checkpoints", f"step_{step:08d}")
    dcp = dcp_reader(os.path.join(ckpt, "dcp")).read_metadata().state_dict_metadata
    return sorted(dcp), sorted(load_file(os.path.join(ckpt, "model.safetensors")))


# --- train.compile ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compiled_blocks_train_like_eager(runs, layout):
    """2 processes, 20 steps: the compiled run's losses are the eager DDP run's within bf16
    tolerance, and its checkpoints hold the same keys (no wrapper in a parameter name)."""
    eager = runs("eager-ddp", 2)
    compiled = runs(f"compiled-{layout}", 2, "train.compile=true", *LAYOUTS[layout])
    assert "torch.compile failed" not in stdout(compiled)
    got, want = losses(compiled), losses(eager)
    assert len(got) == len(want) == STEPS
    worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
    assert worst < BF16_TOLERANCE, f"compiled {layout} differs from eager by {worst:.4f}"
    dcp_keys, weight_keys = checkpoint_keys(compiled, STEPS)
    assert (dcp_keys, weight_keys) == checkpoint_keys(eager, STEPS)
    assert not any("_orig_mod" in k for k in dcp_keys + weight_keys)


def test_compiled_run_resumes_exactly(runs, tiny_data, tmp_path):
    """A compiled DDP run resumed from its step-8 checkpoint (what a crash at step 10 leaves)
    ends with the uninterrupted compiled run's per-step rows and weights, bitwise."""
    whole = runs("compiled-ddp", 2, "train.compile=true")
    run_dir = str(tmp_path / "resumed")
    shutil.copytree(whole, run_dir)
    ckpts = os.path.join(run_dir, "checkpoints")
    for step in (16, 20):
        shutil.rmtree(os.path.join(ckpts, f"step_{step:08d}"))
    with open(os.path.join(ckpts, "latest"), "w") as f:
        f.write("step_00000008")
    args = [f"data.path={tiny_data}", f"runs_dir={tmp_path}", "name=resumed", *RUN]
    lmforge("pretrain", *args, "train.compile=true", "resume=auto", "--nproc", "2")
    assert latest_checkpoint(run_dir) == f"step_{STEPS:08d}"
    assert _rows(run_dir) == _rows(whole)
    a, b = checkpoint_weights(run_dir, STEPS), checkpoint_weights(whole, STEPS)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), f"{k} differs bitwise"


def test_compile_without_a_compiler_continues_eagerly(runs, tmp_path):
    """Inductor on a CPU needs a C++ compiler: without one (and nothing cached) the run says
    so in one line and trains eagerly, exactly as an eager run."""
    eager = runs("eager-1", 1, "train.max_steps=4")
    env = {"CXX": "/nonexistent/c++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    fallback = runs("no-compiler", 1, "train.max_steps=4", "train.compile=true", env=env)
    warnings = [line for line in stdout(fallback).splitlines() if "torch.compile" in line]
    assert len(warnings) == 1, warnings
    assert "C++ compiler" in warnings[0] and "continues in eager mode" in warnings[0]
    assert losses(fallback) == losses(eager)


# --- train.precision=fp8 ---------------------------------------------------------------------


def test_float8_takes_the_block_projections_only():
    """The blocks' projections whose dimensions are multiples of 16 compute in float8; the head,
    other dimensions and projections wrapped by LoRA stay in bf16."""
    from lmforge.pretrain.config.schema import ModelConfig
    from lmforge.pretrain.model.transformer import GPT
    from lmforge.pretrain.parallel.float8 import float8_eligible

    model = GPT(ModelConfig(n_layer=1, n_head=4, d_model=64, ffn_hidden=72, vocab_size=512))
    chosen = [name for name, m in model.named_modules() if float8_eligible(m, name)]
    assert chosen == [f"layers.0.attention.{w}" for w in ("wq", "wk", "wv", "wo")]
    assert not float8_eligible(model.output, "output")  # 64 x 512: the head, by name
    wq = model.layers[0].attention.wq
    assert not float8_eligible(wq, "base_model.model.layers.0.attention.wq.base_layer")


# Where `make venv` installs torchao for this test: beside the environment's site-packages, not
# in it (importable everywhere, peft and transformers would load it in every lmforge process and
# print its kernel-loading warnings on every command's stderr). Only the float8 workers see it.
FLOAT8_SITE = os.path.join(sys.prefix, "float8")


def _torchao_site() -> str | None:
    """The folder the float8 workers add to their path (None: torchao is installed as usual)."""
    if importlib.util.find_spec("torchao") is not None:
        return None
    if os.path.isdir(os.path.join(FLOAT8_SITE, "torchao")):
        return FLOAT8_SITE
    raise AssertionError(
        f"torchao is neither installed nor in {FLOAT8_SITE}: run `make venv` (it installs it "
        "there), or `pip install torchao`"
    )


def _float8_fsdp(rank: int, world: int, precision: str, site: str | None = None) -> dict:
    """6 steps of FSDP2 on 2 gloo ranks through MeshStrategy."""
    if site is not None:
        sys.path.insert(0, site)
    from lmforge.pretrain.config.layout import Layout
    from lmforge.pretrain.config.schema import ModelConfig, OptimConfig, ParallelConfig
    from lmforge.pretrain.model.loss import causal_lm_loss
    from lmforge.pretrain.model.transformer import GPT
    from lmforge.pretrain.parallel.mesh import MeshStrategy
    from lmforge.pretrain.train.optim import build_optimizer, build_scheduler

    optim = OptimConfig(lr=3e-3, warmup_steps=1)
    strategy = MeshStrategy(precision="bf16", layout=Layout(ParallelConfig(strategy="fsdp"), world))
    # The preflight refuses float8 on a CPU; past it, the strategy's float8 path runs as on a
    # GPU, on torch's CPU float8 matmuls.
    strategy.precision = precision
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, d_model=64, max_seq_len=32, vocab_size=512))
    names = sorted(model.state_dict())
    model, optimizer = strategy.prepare(model, lambda m: build_optimizer(m, optim))
    scheduler = build_scheduler(optimizer, total_steps=6, cfg=optim)
    data = torch.Generator().manual_seed(rank)
    out = []
    for _ in range(6):
        ids = torch.randint(0, 512, (2, 33), generator=data)
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
        out.append(float(strategy.forward_backward(model, [batch], causal_lm_loss)))
        strategy.step(model, optimizer, scheduler, grad_clip=1.0)
    float8 = [n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"]
    scaled = [
        m.weight._local_tensor._precomputed_scale is not None
        for m in model.modules()
        if type(m).__name__ == "Float8Linear"
    ]
    return {
        "losses": out,
        "same_names": sorted(model.state_dict()) == names,
        "float8": float8,
        "scaled": all(scaled),
    }


def test_float8_under_fsdp_tracks_bf16():
    """FSDP2 with float8 all-gathers: the 14 block projections convert (not the head), the
    parameter names stay, every weight's scale is precomputed after a step, and 6 steps give
    the bf16 run's losses within tolerance."""
    fp8 = run_distributed(_float8_fsdp, "fp8", _torchao_site())
    bf16 = run_distributed(_float8_fsdp, "bf16")
    for rank in range(2):
        got = fp8[rank]
        assert got["same_names"] and got["scaled"]
        assert len(got["float8"]) == 14 and not any("output" in n for n in got["float8"])
        worst = max(abs(a - b) for a, b in zip(got["losses"], bf16[rank]["losses"], strict=True))
        assert worst < BF16_TOLERANCE, f"float8 differs from bf16 by {worst:.4f}"
