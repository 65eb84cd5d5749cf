"""Two (or four) gloo processes really train one model under every parallel layout: the same
20 per-step losses as one process, the same final weights, identical replicas."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from tests.gloo_workers import run_distributed
from tests.runs import SMALL_MODEL, checkpoint_weights, read_metrics

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SMALL_STEPS = 20
SMALL = [
    *SMALL_MODEL,
    "train.global_batch_tokens=1024",
    f"train.max_steps={SMALL_STEPS}",
    "train.log_interval=1",
    "train.eval_interval=10",
    "train.eval_samples=12",
    "train.precision=fp32",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "checkpoint.interval=0",
    "logging.progress=false",
]


def _train(rank: int, world: int, data: str, runs: str, name: str, extra: list[str]) -> dict:
    import torch.distributed as dist

    from lmforge.pretrain.config.schema import PretrainConfig, load_config
    from lmforge.pretrain.parallel.common import blocks
    from lmforge.pretrain.parallel.memory import estimate_memory
    from lmforge.pretrain.parallel.state import measured_state_bytes
    from lmforge.pretrain.run.pretraining import run_pretrain
    from lmforge.pretrain.train.loop import Callback

    class Record(Callback):
        def __init__(self) -> None:
            self.indices: list[list[int]] = []
            self.world = None

        def on_train_start(self, trainer) -> None:
            self.world = dist.get_world_size() if dist.is_initialized() else 1
            self.calls = 0
            attention = blocks(trainer.strategy.unwrap(trainer.model))[0].attention
            attention.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))

        def on_step_end(self, trainer) -> None:
            self.indices.append(trainer.train_batches.last_indices.tolist())
            if trainer.state.step == 1:
                self.first_step_calls = self.calls

    rec = Record()
    cfg = load_config(
        PretrainConfig, [f"data.path={data}", f"runs_dir={runs}", f"name={name}", *SMALL, *extra]
    )
    result = run_pretrain(cfg, callbacks=[rec])
    trainer = result["trainer"]
    model = trainer.strategy.unwrap(trainer.model)
    state = model.state_dict()
    local = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in state.items()}
    estimate = estimate_memory(
        cfg.model,
        parallel=cfg.parallel,
        world_size=rec.world,
        precision=trainer.strategy.precision,
        micro_batch_size=cfg.train.micro_batch_size,
        seq_len=cfg.train.seq_len,
        grad_accum=len(trainer.train_batches.next_step()),
    )
    return {
        "world": rec.world,
        "attention_calls_step1": rec.first_step_calls,
        "indices": rec.indices,
        "params": {k: v.detach().clone() for k, v in local.items()},
        "local_shapes": {k: list(v.shape) for k, v in local.items()},
        # Bytes this rank holds of weights and optimizer state (gradients match the weights'),
        # measured, and as pretrain/parallel/memory.py estimates them.
        "state_bytes": sum(measured_state_bytes(trainer.model, trainer.optimizer).values()),
        "estimated_state_bytes": estimate.params + estimate.optimizer + estimate.offloaded,
        "full_shapes": {k: list(v.shape) for k, v in state.items()},
        "grad_accum": len(trainer.train_batches.next_step()),
    }


def _losses(run_dir: str, kind: str, key: str) -> list[float]:
    return [r[key] for r in read_metrics(run_dir) if r["kind"] == kind]


@pytest.fixture(scope="module")
def one_process(tiny_data, tmp_path_factory):
    runs = str(tmp_path_factory.mktemp("one"))
    (one,) = run_distributed(_train, tiny_data, runs, "one", [], world_size=1)
    return one, os.path.join(runs, "one")


def _assert_estimate(ranks: list[dict]) -> None:
    """pretrain/parallel/memory.py's per-rank parameters + optimizer state is within 10% of what the
    busiest rank really holds."""
    measured = max(r["state_bytes"] for r in ranks)
    estimated = ranks[0]["estimated_state_bytes"]
    assert abs(estimated / measured - 1) < 0.10, (estimated, measured)


def test_two_processes_match_one(tiny_data, tmp_path, one_process):
    one, one_dir = one_process
    runs = str(tmp_path)
    two = run_distributed(_train, tiny_data, runs, "two", [], world_size=2)

    assert one["world"] == 1 and [r["world"] for r in two] == [2, 2]
    _assert_estimate([one])
    _assert_estimate(two)
    assert one["grad_accum"] == 4 and two[0]["grad_accum"] == 2  # same global batch

    # Each step, the ranks read disjoint samples whose union is the 1-process global batch.
    for step, ref in enumerate(one["indices"]):
        a, b = set(two[0]["indices"][step]), set(two[1]["indices"][step])
        assert not a & b, f"step {step}: ranks read the same samples"
        assert a | b == set(ref), f"step {step}: union differs from the 1-process batch"

    # Replicas are identical (bitwise) and equal the 1-process model (fp32, tight).
    for k, v in two[0]["params"].items():
        assert torch.equal(v, two[1]["params"][k]), f"{k} differs across ranks"
        torch.testing.assert_close(v, one["params"][k], rtol=1e-5, atol=1e-6)
    _assert_same_curve(os.path.join(runs, "two"), one_dir)


def _assert_same_curve(
    run_dir: str,
    ref_dir: str,
    *,
    rtol: float = 1e-5,
    weight_atol: float = 1e-6,
    weight_rel_norm: float | None = None,
) -> None:
    l1, l2 = _losses(ref_dir, "train", "loss"), _losses(run_dir, "train", "loss")
    assert len(l1) == len(l2) == SMALL_STEPS
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=rtol, atol=1e-6)
    v1, v2 = _losses(ref_dir, "eval", "val_loss"), _losses(run_dir, "eval", "val_loss")
    torch.testing.assert_close(torch.tensor(v2), torch.tensor(v1), rtol=rtol, atol=1e-6)
    # ... and so is each source's (the data mixes four plays): every rank agrees on the sums
    last = [r for r in read_metrics(ref_dir) if r["kind"] == "eval"][-1]
    sources = [k for k in last if k.startswith("val_loss/")]
    assert len(sources) == 4
    for key in sources:
        s1, s2 = _losses(ref_dir, "eval", key), _losses(run_dir, "eval", key)
        torch.testing.assert_close(torch.tensor(s2), torch.tensor(s1), rtol=rtol, atol=1e-6)
    assert l1[-1] < l1[0]  # it learns
    # The consolidated weights of the final checkpoints agree.
    a, b = checkpoint_weights(run_dir, SMALL_STEPS), checkpoint_weights(ref_dir, SMALL_STEPS)
    assert a.keys() == b.keys()
    for k in a:
        if weight_rel_norm is None:
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=weight_atol)
        else:  # bf16: Adam's sign-like steps amplify rounding in a few elements; compare norms
            rel = (a[k] - b[k]).norm() / b[k].norm()
            assert rel < weight_rel_norm, f"{k}: relative difference {rel:.2e}"


def test_fsdp_two_processes_match_one(tiny_data, tmp_path, one_process):
    """FSDP2 on 2 ranks: sharded parameters, same losses and (gathered) weights as 1 process."""
    one, one_dir = one_process
    runs = str(tmp_path)
    two = run_distributed(_train, tiny_data, runs, "fsdp", ["parallel.strategy=fsdp"], world_size=2)
    assert [r["world"] for r in two] == [2, 2]
    # Each rank holds half of the weights and optimizer state that a DDP replica holds.
    ratio = two[0]["state_bytes"] / one["state_bytes"]
    print(f"FSDP per-rank / DDP replica bytes of weights + optimizer state: {ratio:.3f}")
    assert 0.45 < ratio < 0.55
    _assert_estimate(two)
    # Each rank holds half of every sharded parameter (dim 0 split over 2 ranks).
    for name, local in two[0]["local_shapes"].items():
        full = two[0]["full_shapes"][name]
        assert local[0] == -(-full[0] // 2), f"{name}: local {local} of {full}"
    _assert_same_curve(os.path.join(runs, "fsdp"), one_dir)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_activation_checkpointing_changes_nothing_but_memory(
    tiny_data, tmp_path, one_process, strategy
):
    """Recomputing block activations in backward gives the same training run (1 process)."""
    _, one_dir = one_process
    extra = [f"parallel.strategy={strategy}", "parallel.activation_checkpointing=true"]
    (ac,) = run_distributed(_train, tiny_data, str(tmp_path), "ac", extra, world_size=1)
    one, _ = one_process
    # 4 micro-batches: the attention runs 4 times without checkpointing, 8 with (recomputed).
    assert one["attention_calls_step1"] == 4 and ac["attention_calls_step1"] == 8
    _assert_same_curve(os.path.join(tmp_path, "ac"), one_dir)


@pytest.mark.parametrize(
    "zero",
    [
        ["parallel.zero_stage=1"],
        ["parallel.zero_stage=2"],
        ["parallel.zero_stage=3"],
        # transformers' documented ZeRO-3 JSON: "auto" values, AdamW and WarmupLR blocks,
        # optimizer and parameter offload, the stage taken from it (tests/data/README.md)
        [f"parallel.deepspeed_config={os.path.join(DATA, 'ds_config_zero3_auto.json')}"],
    ],
    ids=["zero1", "zero2", "zero3", "zero3-offload-auto-json"],
)
def test_deepspeed_two_processes_match_one(tiny_data, tmp_path, one_process, zero):
    """A real DeepSpeed engine on 2 gloo ranks: the 1-process DDP losses and final weights."""
    _, one_dir = one_process
    runs = str(tmp_path)
    two = run_distributed(
        _train, tiny_data, runs, "ds", ["parallel.strategy=deepspeed", *zero], world_size=2
    )
    assert [r["world"] for r in two] == [2, 2]
    _assert_estimate(two)
    # ZeRO reduces in flat buckets (another summation order): weights agree to 1e-5.
    _assert_same_curve(os.path.join(runs, "ds"), one_dir, weight_atol=1e-5)
    _assert_consolidates(os.path.join(runs, "ds"), one_dir, tmp_path)


@pytest.mark.parametrize(
    ("extra", "world"),
    [
        (["parallel.tensor_parallel=2"], 2),
        (["parallel.pipeline_parallel=2"], 2),
        (["parallel.pipeline_parallel=2", "parallel.pipeline_schedule=gpipe"], 2),
        (["parallel.strategy=fsdp", "parallel.tensor_parallel=2"], 4),
        (["parallel.tensor_parallel=2"], 4),
        (["parallel.pipeline_parallel=2"], 4),
    ],
    ids=["tp2", "pp2-1f1b", "pp2-gpipe", "fsdp2xtp2", "dp2xtp2", "pp2xdp2"],
)
def test_model_parallel_matches_one(tiny_data, tmp_path, one_process, extra, world):
    """Tensor parallel (heads and MLP units split), pipeline stages, and their 2-D meshes with
    data parallel: the 1-process losses, validation losses and final weights."""
    one, one_dir = one_process
    runs = str(tmp_path)
    ranks = run_distributed(_train, tiny_data, runs, "mp", extra, world_size=world)
    assert [r["world"] for r in ranks] == [world] * world
    tp = 2 if "parallel.tensor_parallel=2" in extra else 1
    pp = 2 if "parallel.pipeline_parallel=2" in extra else 1
    dp = world // (tp * pp)
    # Gradient accumulation (or pipeline micro-batches) keep the 1-process global batch.
    assert ranks[0]["grad_accum"] == one["grad_accum"] // dp
    if tp > 1:  # each rank holds half of every attention/MLP projection
        shapes, full = ranks[0]["local_shapes"], one["local_shapes"]
        fsdp = dp if "parallel.strategy=fsdp" in extra else 1  # FSDP splits dim 0 further
        assert shapes["layers.0.attention.wq.weight"] == [64 // tp // fsdp, 64]  # output rows
        w2, w2_full = (
            shapes["layers.0.feed_forward.w2.weight"],
            full["layers.0.feed_forward.w2.weight"],
        )
        assert w2 == [w2_full[0] // fsdp, w2_full[1] // tp]  # input columns
    if pp > 1:  # stage 0: embeddings + block 0; stage 1: block 1 + norm + head
        first, last = set(ranks[0]["params"]), set(ranks[dp]["params"])
        assert "tok_embeddings.weight" in first and "output.weight" not in first
        assert "output.weight" in last and not any(k.startswith("layers.0.") for k in last)
        assert first | last == set(one["params"]) and not first & last
    if dp > 1 and "parallel.strategy=fsdp" not in extra:  # replicas hold identical weights
        twin = ranks[1] if pp > 1 else ranks[tp]
        for k, v in ranks[0]["params"].items():
            assert torch.equal(v, twin["params"][k]), f"{k} differs across replicas"
    _assert_estimate(ranks)
    # Other reduction orders than one process (tensor parallel sums partial matmuls in another
    # order): Adam scales each element's step by its own gradient history, so an element whose
    # gradient is near zero can end a few 1e-5 apart (a diverging layout would be off by the
    # learning rate, 3e-3)
    _assert_same_curve(os.path.join(runs, "mp"), one_dir, weight_atol=5e-5)
    _assert_consolidates(os.path.join(runs, "mp"), one_dir, tmp_path, atol=5e-5)


def _assert_consolidates(run_dir: str, ref_dir: str, tmp_path, *, atol: float = 1e-5) -> None:
    """`lmforge consolidate`'s function: the sharded state of any layout -> a model directory
    whose weights load strictly into a plain GPT and equal the 1-process run's (to ``atol``,
    as the run's own checkpoint does)."""
    from omegaconf import OmegaConf

    from lmforge.pretrain.checkpoint.consolidate import consolidate
    from lmforge.pretrain.config.schema import ModelConfig
    from lmforge.pretrain.model.transformer import GPT

    out = consolidate(run_dir, out=str(tmp_path / "model"))
    assert sorted(os.listdir(out)) == [
        "config.yaml",
        "consolidated.json",
        "model.safetensors",
        "tokenizer.model",
    ]
    weights = load_file(os.path.join(out, "model.safetensors"))
    model_cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(out, "config.yaml")).model)
    GPT(ModelConfig(**model_cfg)).load_state_dict(weights, strict=True)
    ref = checkpoint_weights(ref_dir, SMALL_STEPS)
    for k, v in ref.items():
        torch.testing.assert_close(weights[k], v, rtol=1e-5, atol=atol)


@pytest.fixture(scope="module")
def one_process_bf16(tiny_data, tmp_path_factory):
    runs = str(tmp_path_factory.mktemp("one_bf16"))
    (one,) = run_distributed(_train, tiny_data, runs, "one", ["train.precision=bf16"], world_size=1)
    return one, os.path.join(runs, "one")


# bf16 tolerance: matmuls round to 8 mantissa bits (relative 2^-8 = 0.4%) and the strategies
# round at different places (FSDP casts gathered weights, DeepSpeed keeps bf16 weights and fp32
# masters, Accelerate autocasts fp32 weights per op): per-step losses agree to 2%, and each final
# weight tensor to 2% in relative Frobenius norm (single elements can differ by a few Adam steps,
# whose size barely depends on the gradient's magnitude).
BF16_RTOL, BF16_WEIGHT_REL = 2e-2, 2e-2


@pytest.mark.parametrize(
    "extra",
    [[], ["parallel.strategy=fsdp"], ["parallel.strategy=deepspeed", "parallel.zero_stage=3"]],
    ids=["ddp", "fsdp", "zero3"],
)
def test_bf16_two_processes_match_one(tiny_data, tmp_path, one_process_bf16, extra):
    """bf16 mixed precision on 2 ranks: the 1-process bf16 losses within the stated tolerance;
    FSDP and ZeRO-3 hold half of the parameters and optimizer state that a replica holds."""
    one, one_dir = one_process_bf16
    runs = str(tmp_path)
    two = run_distributed(
        _train, tiny_data, runs, "bf16", ["train.precision=bf16", *extra], world_size=2
    )
    _assert_estimate(two)
    if extra:
        # Per rank vs a 1-process replica (fp32 weights + 2 fp32 moments = 12 bytes/param):
        # FSDP halves those 12; DeepSpeed holds bf16 weights + an fp32 master + 2 moments = 14,
        # halved = 7/12. (With gradients, fp32 for DDP and bf16 shards for ZeRO-3, both are 1/2.)
        ratio = max(r["state_bytes"] for r in two) / one["state_bytes"]
        print(f"{extra[0]}: per-rank / 1-process bytes of weights + optimizer state: {ratio:.3f}")
        expected = 7 / 12 if "deepspeed" in extra[0] else 1 / 2
        assert abs(ratio / expected - 1) < 0.05, (ratio, expected)
    _assert_same_curve(
        os.path.join(runs, "bf16"), one_dir, rtol=BF16_RTOL, weight_rel_norm=BF16_WEIGHT_REL
    )


def _close_alone(rank: int, port: int, queue) -> None:
    """Rank 0 leaves the group while rank 1 never comes to the closing barrier (it sleeps,
    then exits): rank 0's close gives up after its timeout, says so, and returns."""
    import time

    import torch.distributed as dist

    from lmforge.pretrain.parallel.common import close_process_group

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if rank == 1:
        time.sleep(7)
        os._exit(0)
    started = time.monotonic()
    close_process_group(timeout_s=3)
    queue.put(time.monotonic() - started)
    queue.close()
    queue.join_thread()
    os._exit(0)


def test_leaving_the_group_is_bounded_when_a_peer_never_comes(capfd):
    """Leaving a gloo group at the end of a run waits at most its timeout for the others (an
    intermittent hang of torch's destroy_process_group must not hold a finished job): then
    every thread's stack and one line on stderr, and the rank goes on."""
    import torch.multiprocessing as mp

    from lmforge.pretrain.core.dist import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_close_alone, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        waited = queue.get(timeout=60)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert 3 <= waited < 6, waited
    err = capfd.readouterr().err
    assert "[rank 0] warning: leaving the process group took over 3 s" in err
    assert "close_process_group" in err  # the stacks say where it waited
