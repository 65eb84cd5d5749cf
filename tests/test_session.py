"""The run session's own decisions, without training: where a run resumes from, which
checkpoints it refuses, how a global batch is split, and what the parallel layout says."""

from __future__ import annotations

import json
import os

import pytest

from lmforge.pretrain.config.layout import Layout
from lmforge.pretrain.config.schema import ModelConfig, ParallelConfig
from lmforge.pretrain.core.durable import sha256_file
from lmforge.pretrain.core.errors import CheckpointError, ConfigurationError
from lmforge.pretrain.run.session import check_resume_compatible, grad_accum_steps, resolve_resume


def _checkpoint(root, *, sha: str, deepspeed: bool = False) -> str:
    ckpt = os.path.join(root, "checkpoints", "step_00000004")
    os.makedirs(os.path.join(ckpt, "deepspeed" if deepspeed else "dcp"))
    with open(os.path.join(ckpt, "trainer_state.json"), "w") as f:
        json.dump({"step": 4, "tokenizer_sha256": sha}, f)
    with open(os.path.join(ckpt, "config.yaml"), "w") as f:
        f.write("name: x\nmodel:\n  n_layer: 1\nparallel:\n  strategy: ddp\n")
    files = {
        name: {"sha256": sha256_file(os.path.join(ckpt, name))}
        for name in ("trainer_state.json", "config.yaml")
    }
    with open(os.path.join(ckpt, "manifest.json"), "w") as f:
        json.dump({"format_version": 1, "step": 4, "files": files}, f)
    with open(os.path.join(root, "checkpoints", "latest"), "w") as f:
        f.write("step_00000004\n")
    return ckpt


def test_resolve_resume(tmp_path):
    run = str(tmp_path / "run")
    assert resolve_resume(run_dir=run, resume=None) is None  # a new run
    assert resolve_resume(run_dir=run, resume="auto") is None  # nothing to resume yet
    ckpt = _checkpoint(run, sha="a" * 64)
    assert resolve_resume(run_dir=run, resume="auto") == ckpt
    assert resolve_resume(run_dir=run, resume=ckpt) == ckpt
    # the pointer file itself names the checkpoint to resume
    assert resolve_resume(run_dir=run, resume=os.path.join(run, "checkpoints", "latest")) == ckpt
    with pytest.raises(ConfigurationError, match="already exists; continue it with resume=auto"):
        resolve_resume(run_dir=run, resume=None)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_resume(run_dir=run, resume=str(tmp_path / "nowhere"))


def test_resume_checks_tokenizer_and_state_format(tmp_path):
    ckpt = _checkpoint(str(tmp_path / "run"), sha="a" * 64)
    saved = check_resume_compatible(
        ckpt, strategy="ddp", tokenizer_sha="a" * 64, tokenizer_fix="use the same data"
    )
    assert saved == {"name": "x", "model": {"n_layer": 1}, "parallel": {"strategy": "ddp"}}
    with pytest.raises(CheckpointError) as err:
        check_resume_compatible(
            ckpt, strategy="ddp", tokenizer_sha="b" * 64, tokenizer_fix="use the same data"
        )
    assert str(err.value) == (
        f"{ckpt} was trained with another tokenizer (sha256 {'a' * 12}…) than this run's "
        f"({'b' * 12}…); use the same data"
    )
    with pytest.raises(CheckpointError, match="DeepSpeed engine cannot load"):
        check_resume_compatible(
            ckpt, strategy="deepspeed", tokenizer_sha="a" * 64, tokenizer_fix=""
        )


def test_grad_accum_steps_names_every_factor():
    factors = [("seq_len", 64), ("micro_batch_size", 4), ("data_parallel", 2)]
    assert grad_accum_steps(key="global_batch_tokens", total=2048, factors=factors, world=2) == 4
    with pytest.raises(ConfigurationError) as err:
        grad_accum_steps(key="global_batch_tokens", total=1000, factors=factors, world=2)
    assert str(err.value) == (
        "train.global_batch_tokens=1000 is not a multiple of seq_len*micro_batch_size*"
        "data_parallel = 64*4*2 = 512 (world_size 2); use e.g. 1024"
    )


def test_layout_degrees_and_replicas():
    tp = Layout.of(ParallelConfig(tensor_parallel=2), world_size=4, model=ModelConfig())
    assert (tp.dp, tp.tp, tp.pp) == (2, 2, 1)
    assert tp.describe() == "dp 2 x tp 2 x pp 1 = 4 rank(s)"
    # ("dp", "tp") mesh: ranks 0, 1 are replica 0's two tensor-parallel halves
    assert [tp.dp_rank(r) for r in range(4)] == [0, 0, 1, 1]
    pp = Layout.of(ParallelConfig(pipeline_parallel=2), world_size=4, model=ModelConfig())
    # ("pp", "dp") mesh: ranks 0, 1 are stage 0 of replicas 0 and 1
    assert [pp.dp_rank(r) for r in range(4)] == [0, 1, 0, 1]
    zero3 = Layout(ParallelConfig(strategy="deepspeed", zero_stage=3), 8)
    assert (zero3.dp, zero3.shards_params, zero3.shards_grads) == (8, True, True)
    zero1 = Layout(ParallelConfig(strategy="deepspeed", zero_stage=1), 8)
    assert (zero1.shards_optimizer, zero1.shards_grads, zero1.shards_params) == (True, False, False)


def test_layout_refuses_with_every_degree_named():
    with pytest.raises(ConfigurationError) as err:
        Layout.of(ParallelConfig(tensor_parallel=3), world_size=4, model=ModelConfig(n_head=4))
    msg = str(err.value)
    assert msg.startswith(
        "parallel layout (world_size=4, tensor_parallel=3, pipeline_parallel=1, "
        "data_parallel=world_size/(tp*pp)=1.33333): world_size must be a multiple of "
        "tensor_parallel*pipeline_parallel=3"
    )
    assert "tensor_parallel=3 must divide model.n_head=4" in msg  # both problems, one line
    with pytest.raises(ConfigurationError, match="pipeline_parallel=5 exceeds model.n_layer=4"):
        Layout.of(ParallelConfig(pipeline_parallel=5), world_size=5, model=ModelConfig())
    with pytest.raises(ConfigurationError, match="fp16 needs loss scaling"):
        Layout.of(ParallelConfig(strategy="fsdp"), world_size=2, precision="fp16")


def test_a_corrupt_or_foreign_manifest_is_one_line(tmp_path):
    from lmforge.pretrain.checkpoint.store import verify_checkpoint

    ckpt = tmp_path / "step_00000004"
    ckpt.mkdir()
    (ckpt / "manifest.json").write_bytes(b'{"format_version": 1, "files": {\xff')
    with pytest.raises(CheckpointError, match="is not valid JSON .* the checkpoint is corrupt"):
        verify_checkpoint(str(ckpt))
    (ckpt / "manifest.json").write_text('{"format_version": 1, "step": 4}')
    with pytest.raises(CheckpointError, match="has a manifest.json that is not a checkpoint's"):
        verify_checkpoint(str(ckpt))
