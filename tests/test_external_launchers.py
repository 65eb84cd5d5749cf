"""Launching lmforge every way a cluster does, and DeepSpeed JSONs as users bring them.

- DeepSpeed JSONs of the shapes DeepSpeed's and transformers' documentation show: which ZeRO
  stage and offload win, how "auto" is resolved, what happens to optimizer/scheduler blocks
  (config resolution only: cheap; the real 2-process ZeRO-3 run of transformers' "auto" JSON is
  tests/test_distributed.py's zero3-offload case).
- The world a launcher started (torchrun, srun, accelerate, MPI), read from the environment.
- `lmforge launch` with torchrun's options.
- Real launches: plain torchrun and `accelerate launch` train 2 ranks exactly like
  `lmforge pretrain --nproc 2`; so does plain srun on the test SLURM cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from lmforge.launcher.cli import main
from lmforge.launcher.local import rendezvous
from lmforge.pretrain.config.dsconfig import resolve_blocks
from lmforge.pretrain.config.layout import Layout
from lmforge.pretrain.config.schema import PretrainConfig, load_config
from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.pretrain.core.launch_env import first_host, join_launched_world, tasks_on_node
from lmforge.pretrain.parallel.memory import estimate_memory
from lmforge.pretrain.parallel.zero import deepspeed_config, zero_settings
from tests.conftest import REPO, run_process
from tests.runs import _args, _rows

HF_ZERO3 = os.path.join(REPO, "tests", "data", "ds_config_zero3_auto.json")

# DeepSpeed's documentation: ZeRO-2 with explicit numbers.
DS_ZERO2 = {
    "zero_optimization": {
        "stage": 2,
        "allgather_partitions": True,
        "allgather_bucket_size": 5e8,
        "overlap_comm": False,
        "reduce_scatter": True,
        "reduce_bucket_size": 5e8,
        "contiguous_gradients": True,
    }
}
# DeepSpeed's documentation: ZeRO-3 with optimizer and parameter offload.
DS_ZERO3_OFFLOAD = {
    "zero_optimization": {
        "stage": 3,
        "contiguous_gradients": True,
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_prefetch_bucket_size": 1e7,
        "stage3_param_persistence_threshold": 1e5,
        "reduce_bucket_size": 1e7,
        "sub_group_size": 1e9,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    }
}
# DeepSpeed's getting-started config: explicit batch, an Adam block, fp16, the old boolean ZeRO.
DS_GETTING_STARTED = {
    "train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "Adam", "params": {"lr": 0.00015}},
    "fp16": {"enabled": True},
    "zero_optimization": True,
}
# transformers' documented ZeRO-2 config: "auto" everywhere, AdamW and WarmupLR blocks.
HF_ZERO2 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16},
    "bf16": {"enabled": "auto"},
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
    },
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"},
    },
    "zero_optimization": {
        "stage": 2,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "allgather_partitions": True,
        "allgather_bucket_size": 2e8,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 2e8,
        "contiguous_gradients": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}
BASE = ["name=x", "data.path=unused", "train.max_steps=50", "model.vocab_size=512"]
BASE += ["parallel.strategy=deepspeed"]
D_MODEL = 64


def _write(tmp_path, config: dict, name: str = "ds.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


def _cfg(path: str, *extra: str) -> PretrainConfig:
    return load_config(
        PretrainConfig,
        [*BASE, f"model.d_model={D_MODEL}", f"parallel.deepspeed_config={path}", *extra],
    )


def _engine(cfg: PretrainConfig, precision: str = "bf16", world: int = 2) -> dict:
    return deepspeed_config(
        cfg.parallel,
        precision=precision,
        world_size=world,
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum=4,
        grad_clip=cfg.train.grad_clip,
        num_params=1_000_000,
        hidden_size=cfg.model.d_model,
    )


def _autos(obj) -> list:
    if isinstance(obj, dict):
        return [a for v in obj.values() for a in _autos(v)]
    if isinstance(obj, list):
        return [a for v in obj for a in _autos(v)]
    return [obj] if obj == "auto" else []


# --- DeepSpeed JSON: stage and offload --------------------------------------------------------
def test_the_json_stage_runs_unless_the_config_sets_one(tmp_path, capsys):
    """`"zero_optimization": {"stage": 3}` runs ZeRO-3 (it ran stage 2 silently before); a
    preset or an override setting parallel.zero_stage wins, and the engine says so."""
    path = _write(tmp_path, {"zero_optimization": {"stage": 3}})
    cfg = _cfg(path)
    layout = Layout.of(cfg.parallel, world_size=2)
    assert cfg.parallel.stage == 3 and layout.zero_stage == 3 and layout.shards_params
    assert layout.describe().endswith("; deepspeed ZeRO-3 (ds.json)")
    assert _engine(cfg)["zero_optimization"]["stage"] == 3
    assert "deepspeed: ZeRO stage 3 from ds.json (parallel.zero_stage not set)" in (
        capsys.readouterr().out
    )
    for extra in ("parallel=configs/parallel/zero2.yaml", "parallel.zero_stage=2"):
        cfg = _cfg(path, extra)
        assert cfg.parallel.stage == 2 and not Layout(cfg.parallel, 2).shards_params
        assert _engine(cfg)["zero_optimization"]["stage"] == 2
        out = capsys.readouterr().out
        assert "parallel.zero_stage=2 wins over ds.json's zero_optimization.stage=3" in out
    # no stage in the JSON, none in the config: lmforge's default
    assert _cfg(_write(tmp_path, {"zero_optimization": {"overlap_comm": True}})).parallel.stage == 2


def test_offload_comes_from_the_json_unless_set(tmp_path, capsys):
    """DeepSpeed's documented ZeRO-3 offload JSON offloads both (and the memory estimate counts
    it); parallel.offload_*=false wins over it; a preset's offload wins over a JSON without."""
    path = _write(tmp_path, DS_ZERO3_OFFLOAD)
    cfg = _cfg(path)
    assert cfg.parallel.offloads_optimizer and cfg.parallel.offloads_params
    zero = _engine(cfg)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu"} and zero["offload_param"] == {
        "device": "cpu"
    }
    # the JSON's own numbers stay
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (1e7, 1e7)
    assert "offload_param to cpu from ds.json" in capsys.readouterr().out
    flags = load_config(
        PretrainConfig,
        [*BASE, f"model.d_model={D_MODEL}", "parallel=configs/parallel/zero3-offload.yaml"],
    )
    args = dict(world_size=2, precision="bf16", micro_batch_size=8, seq_len=256, grad_accum=1)
    from_json = estimate_memory(cfg.model, parallel=cfg.parallel, **args)
    from_flags = estimate_memory(flags.model, parallel=flags.parallel, **args)
    assert from_json.offloaded == from_flags.offloaded > 0 and from_json.params == 0

    cfg = _cfg(path, "parallel.offload_params=false")
    assert cfg.parallel.offloads_optimizer and not cfg.parallel.offloads_params
    assert "offload_param" not in _engine(cfg)["zero_optimization"]
    out = capsys.readouterr().out
    assert "parallel.offload_params=false wins over ds.json's offload_param device cpu" in out

    cfg = _cfg(
        _write(tmp_path, DS_ZERO2, "z2.json"), "parallel=configs/parallel/zero3-offload.yaml"
    )
    zero = _engine(cfg)["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"] == {"device": "cpu"}
    assert "parallel.zero_stage=3 wins over z2.json's zero_optimization.stage=2" in (
        capsys.readouterr().out
    )


def test_deepspeed_docs_zero2_keeps_its_numbers(tmp_path, capsys):
    engine = _engine(_cfg(_write(tmp_path, DS_ZERO2)))
    zero = engine["zero_optimization"]
    assert zero == {**DS_ZERO2["zero_optimization"], "stage": 2}
    assert engine["train_batch_size"] == 8 * 4 * 2 and engine["bf16"] == {"enabled": True}
    assert "warning" not in capsys.readouterr().out


def test_deepspeed_getting_started_shape(tmp_path, capsys):
    """An explicit optimizer lr must agree with optim.lr; batch and fp16 are the train
    section's (a warning each); `"zero_optimization": true` is stage 1."""
    path = _write(tmp_path, DS_GETTING_STARTED)
    with pytest.raises(ConfigurationError) as err:
        _cfg(path)
    assert "`optimizer.params.lr`=0.00015 differs from lmforge's 0.0003 (optim.lr)" in str(
        err.value
    )
    assert 'write "auto" or remove the "optimizer" block, and set optim.lr instead' in str(
        err.value
    )
    cfg = _cfg(path, "optim.lr=0.00015")
    engine = _engine(cfg, precision="fp32")
    assert cfg.parallel.stage == 1 and engine["zero_optimization"]["stage"] == 1
    assert engine["fp16"] == {"enabled": False} and engine["train_batch_size"] == 8 * 4 * 2
    assert "optimizer" not in engine
    out = capsys.readouterr().out
    assert "sets train_batch_size=8; lmforge uses 64 from the train section" in out
    assert "sets fp16.enabled=true; lmforge uses false" in out
    assert '"optimizer" (Adam) not passed to DeepSpeed: lmforge\'s AdamW' in out


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_transformers_auto_jsons_resolve(tmp_path, capsys, precision):
    """transformers' ZeRO-2 and ZeRO-3 JSONs: every "auto" filled in as its integration does
    (train and optim sections, hidden-size buckets), the optimizer and scheduler blocks
    resolved to optim.* and not passed to DeepSpeed, nothing warned."""
    for path in (_write(tmp_path, HF_ZERO2), HF_ZERO3):
        cfg = _cfg(path, "optim.lr=1e-3", "optim.warmup_steps=7", "optim.weight_decay=0.05")
        engine = _engine(cfg, precision=precision)
        assert _autos(engine) == []
        assert "optimizer" not in engine and "scheduler" not in engine
        assert engine["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size
        assert engine["gradient_accumulation_steps"] == 4
        assert engine["train_batch_size"] == cfg.train.micro_batch_size * 4 * 2
        assert engine["gradient_clipping"] == cfg.train.grad_clip
        assert engine["bf16"]["enabled"] is (precision == "bf16")
        assert engine["fp16"]["enabled"] is False and engine["fp16"]["loss_scale"] == 0
        zero = engine["zero_optimization"]
        assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
        blocks = resolve_blocks(cfg.parallel, cfg.optim, total_steps=50)
        assert blocks["optimizer"]["params"] == {
            "lr": 1e-3,
            "betas": [0.9, 0.95],
            "eps": 1e-8,
            "weight_decay": 0.05,
        }
        assert blocks["scheduler"]["params"] == {
            "warmup_min_lr": 0,
            "warmup_max_lr": 1e-3,
            "warmup_num_steps": 7,
        }
        out = capsys.readouterr().out
        assert "warning" not in out
        assert '"optimizer" (AdamW) and "scheduler" (WarmupLR) not passed to DeepSpeed' in out
    # ZeRO-3's buckets from the model's width, as transformers sizes them from hidden_size
    assert zero["stage"] == 3 and zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["reduce_bucket_size"] == D_MODEL**2
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * D_MODEL**2)
    assert zero["stage3_param_persistence_threshold"] == 10 * D_MODEL
    assert zero_settings(cfg.parallel, 10**6, hidden_size=D_MODEL) == zero  # memory.py's view


def test_transformers_warmup_decay_scheduler(tmp_path):
    """WarmupDecayLR's total_num_steps resolves to the run's steps; an explicit value must be
    the run's (else one line); so must warmup_num_steps."""
    decay = {
        "type": "WarmupDecayLR",
        "params": {
            "last_batch_iteration": -1,
            "total_num_steps": "auto",
            "warmup_min_lr": "auto",
            "warmup_max_lr": "auto",
            "warmup_num_steps": "auto",
        },
    }
    cfg = _cfg(_write(tmp_path, {**HF_ZERO2, "scheduler": decay}))
    params = resolve_blocks(cfg.parallel, cfg.optim, total_steps=50)["scheduler"]["params"]
    assert params["total_num_steps"] == 50 and params["warmup_num_steps"] == 100
    decay["params"]["total_num_steps"] = 50
    _cfg(_write(tmp_path, {**HF_ZERO2, "scheduler": decay}))  # the run's length: accepted
    decay["params"]["warmup_num_steps"] = 1000
    with pytest.raises(ConfigurationError, match="set optim.warmup_steps instead"):
        _cfg(_write(tmp_path, {**HF_ZERO2, "scheduler": decay}))


# --- the world a launcher started ---------------------------------------------------------------
TORCHRUN = {
    "RANK": "1",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "job",
}
SRUN = {
    "SLURM_JOB_ID": "253",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_NODELIST": "localhost",
    "SLURM_NTASKS": "4",
    "OMP_NUM_THREADS": "1",
}


def test_torchrun_world_is_joined_and_contradictions_refused():
    world = join_launched_world(nproc=1, env=dict(TORCHRUN))
    assert (world.launcher, world.rank, world.world_size, world.local_world_size) == (
        "torchrun",
        1,
        4,
        2,
    )
    assert join_launched_world(nproc=2, env=dict(TORCHRUN)).world_size == 4  # = this node's
    with pytest.raises(ConfigurationError) as err:
        join_launched_world(nproc=4, env=dict(TORCHRUN))
    assert str(err.value).startswith(
        "--nproc 4: torchrun started this process as one of 4 ranks (2 on this node)"
    )
    assert "drop --nproc" in str(err.value)
    with pytest.raises(ConfigurationError, match="but not MASTER_ADDR"):
        join_launched_world(env={k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"})
    # variables a lone process set for itself are no launcher's world
    assert join_launched_world(nproc=2, env={"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert join_launched_world(nproc=2, env={}) is None


def test_srun_tasks_become_ranks():
    env = dict(SRUN)
    world = join_launched_world(env=env)
    assert (world.launcher, world.rank, world.world_size) == ("srun", 3, 4)
    assert (world.local_rank, world.local_world_size) == (1, 2)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == (
        "3",
        "4",
        "1",
        "2",
    )
    assert env["MASTER_ADDR"] == "localhost" and 20000 <= int(env["MASTER_PORT"]) < 40000
    with pytest.raises(ConfigurationError, match="srun started this process as one of 4"):
        join_launched_world(nproc=4, env=dict(SRUN))
    # the batch script itself (no step), or a step of one task: a process alone
    batch = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    assert join_launched_world(env=batch) is None and "RANK" not in batch
    one = dict(SRUN, SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0")
    assert join_launched_world(nproc=2, env=one) is None
    # torch's variables (lmforge launch's workers under srun) win over SLURM's
    assert join_launched_world(env={**SRUN, **TORCHRUN}).launcher == "torchrun"
    assert [tasks_on_node("2(x3),1", n) for n in range(4)] == [2, 2, 2, 1]
    assert first_host("localhost,gpu[1-2]") == "localhost"


def test_launchers_that_cannot_be_joined_are_refused():
    simple = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(ConfigurationError, match="accelerate launch --multi_gpu"):
        join_launched_world(env=simple)
    ds = {**TORCHRUN, "ACCELERATE_USE_DEEPSPEED": "true"}
    with pytest.raises(ConfigurationError, match=r"set parallel.strategy=deepspeed \(parallel"):
        join_launched_world(env=ds)
    with pytest.raises(ConfigurationError, match="MPI launcher"):
        join_launched_world(env={"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"})
    accelerate = {**TORCHRUN, "ACCELERATE_MIXED_PRECISION": "no"}
    assert join_launched_world(env=accelerate).launcher == "accelerate launch"


# --- lmforge launch takes torchrun's options ------------------------------------------------------
def test_launch_takes_torchrun_spellings(capsys):
    from lmforge.launcher.cli import _parser

    for spelling in (
        ["--nproc-per-node", "2", "--node-rank", "1", "--master-addr", "h", "--master-port", "9"],
        ["--nproc_per_node", "2", "--node_rank", "1", "--master_addr", "h", "--master_port", "9"],
    ):
        args = _parser().parse_args(
            ["launch", *spelling, "--rdzv_id", "j", "--max_restarts", "0", "--nnodes", "2:2"]
            + ["pretrain", "x.yaml"]
        )
        assert (args.nproc, args.node_rank, args.master_addr, args.master_port) == (2, 1, "h", 9)
        assert (args.rdzv_id, args.max_restarts, args.nnodes, args.cmd) == (
            "j",
            0,
            2,
            ["pretrain", "x.yaml"],
        )
    assert rendezvous(standalone=True)[0] == "c10d"
    assert rendezvous(nnodes=2, node_rank=1, master_addr="h") == ("static", "h:29500", {"rank": 1})
    assert rendezvous(nnodes=2, rdzv_endpoint="h:1") == ("c10d", "h:1", {})
    assert rendezvous(nnodes=2, node_rank=1, rdzv_endpoint="h:1", rdzv_backend="static") == (
        "static",
        "h:1",
        {"rank": 1},
    )
    assert rendezvous(nnodes=2, master_addr="h", master_port=5, rdzv_backend="c10d") == (
        "c10d",
        "h:5",
        {},
    )
    with pytest.raises(SystemExit):
        main(["launch", "--help"])
    usage = capsys.readouterr().out
    for flag in (
        "--nproc-per-node N, --nproc_per_node N",
        "--node-rank RANK, --node_rank RANK",
        "--master-addr ADDR, --master_addr ADDR",
        "--master-port PORT, --master_port PORT",
        "--standalone",
        "--rdzv-backend {c10d,static}, --rdzv_backend {c10d,static}",
        "--rdzv-endpoint HOST:PORT, --rdzv_endpoint HOST:PORT",
        "--rdzv-id ID, --rdzv_id ID",
        "--max-restarts N, --max_restarts N",
    ):
        assert flag in usage, flag


# --- real launches ------------------------------------------------------------------------------
def _lmforge_script() -> str:
    """The `lmforge` console script of this environment (what `$(which lmforge)` gives)."""
    script = os.path.join(os.path.dirname(sys.executable), "lmforge")
    assert os.path.isfile(script), "no lmforge console script: `pip install -e .` (make venv does)"
    return script


def _run(argv: list[str], env: dict | None = None, timeout: float = 150):
    return run_process(argv, env=env, timeout=timeout)


def _provenance_world(run_dir: str) -> int:
    with open(os.path.join(run_dir, "provenance.jsonl")) as f:
        return json.loads(f.readline())["world_size"]


def _assert_two_ranks_like_lmforge(run_dir: str, proc, reference: str) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s) [ddp, data parallel 2]" in proc.stdout
    assert _provenance_world(run_dir) == 2
    final = os.path.join(run_dir, "checkpoints", "step_00000014")
    assert os.path.isfile(os.path.join(final, "rng_rank00001.pt"))
    # the same metrics, step by step, as `lmforge pretrain --nproc 2`: the ranks read their
    # shards and average their gradients
    assert _rows(run_dir) == _rows(reference)


def test_plain_torchrun_trains_two_ranks(tiny_data, tmp_path, reference_runs):
    """`torchrun --standalone --nproc-per-node 2 $(which lmforge) pretrain ...`, and a --nproc
    that contradicts the world torchrun made is refused in one line."""
    ref = reference_runs(2, "fp32", "parallel.strategy=ddp")
    args = _args(tiny_data, str(tmp_path), "torchrun", 1, "fp32", "parallel.strategy=ddp")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = _run(
        [torchrun, "--standalone", "--nproc-per-node", "2", _lmforge_script(), "pretrain"] + args
    )
    _assert_two_ranks_like_lmforge(os.path.join(tmp_path, "torchrun"), proc, ref)

    # (torchrun's own parser takes any --nproc* word, so the world is given by hand here)
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "x"}
    args = _args(tiny_data, str(tmp_path), "contradiction", 1, "fp32")
    proc = _run(
        [sys.executable, "-m", "lmforge.launcher.cli", "pretrain", *args, "--nproc", "3"], env
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "[rank 0] error: --nproc 3: torchrun started this process as one of 2 ranks (2 on this "
        "node), and lmforge joins that world as one rank; drop --nproc (the launcher decides "
        "how many run)"
    ]
    assert not os.path.exists(os.path.join(tmp_path, "contradiction"))


def test_accelerate_launch_trains_two_ranks(tiny_data, tmp_path, reference_runs):
    """`accelerate launch` with a 2-process config file (torch elastic: CPUs too) trains 2
    ranks; its single-process launcher asked for 2 is refused in one line, nothing written."""
    ref = reference_runs(2, "fp32", "parallel.strategy=ddp")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\n"
        "num_processes: 2\nmachine_rank: 0\nmixed_precision: 'no'\ngpu_ids: all\n"
        "main_training_function: main\nuse_cpu: false\n"
    )
    args = _args(tiny_data, str(tmp_path), "accelerate", 1, "fp32", "parallel.strategy=ddp")
    launch = [accelerate, "launch", "--config_file", str(config), _lmforge_script(), "pretrain"]
    _assert_two_ranks_like_lmforge(os.path.join(tmp_path, "accelerate"), _run(launch + args), ref)

    args = _args(tiny_data, str(tmp_path), "alone", 1, "fp32")
    proc = _run(
        [accelerate, "launch", "--num_processes", "2", _lmforge_script(), "pretrain", *args]
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: accelerate launch was asked for several processes but started this one alone "
        "(its single-process launcher, used with --cpu or without several GPUs); run "
        "`accelerate launch --multi_gpu --num_processes N` (torch elastic: CPUs too), or "
        "`lmforge launch --nproc N`"
    ]
    assert not os.path.exists(os.path.join(tmp_path, "alone"))


def _slurm_up() -> bool:
    from tests.test_slurm import _cluster_up  # sets SLURM_CONF to the test cluster's

    return _cluster_up()


def test_plain_srun_trains_two_ranks(tiny_data, tmp_path, reference_runs):
    """`srun -N 2 -n 2 lmforge pretrain ...` on the test cluster (two emulated nodes): each
    task is a rank, rank 0's node found through SLURM; `lmforge launch` with more tasks than
    nodes is refused."""
    if shutil.which("srun") is None or not _slurm_up():
        pytest.skip("no SLURM cluster answers: run `tests/slurm/cluster.sh start`")
    ref = reference_runs(2, "fp32", "parallel.strategy=ddp")
    args = _args(tiny_data, str(tmp_path), "srun", 1, "fp32", "parallel.strategy=ddp")
    srun = ["srun", "--nodes=2", "--ntasks=2", "--time=10"]
    proc = _run([*srun, _lmforge_script(), "pretrain", *args])
    _assert_two_ranks_like_lmforge(os.path.join(tmp_path, "srun"), proc, ref)

    proc = _run(
        [
            "srun",
            "--nodes=1",
            "--ntasks=2",
            _lmforge_script(),
            "launch",
            "--nproc",
            "2",
            "pretrain",
            *args,
        ]
    )
    assert proc.returncode != 0
    assert "lmforge launch runs once per node, but this srun step has 2 tasks on 1 node(s)" in (
        proc.stderr
    )
