"""`lmforge bench`: lmforge's training step against a minimal PyTorch loop and transformers; or
one GPU's modes, checkpoints, parallel strategies, generation, evaluate's scoring next to
training, or prepare next to the tokenizer libraries."""

from __future__ import annotations

import argparse
import os

from lmforge.launcher.cli.common import Handler, add_command, check_nproc, check_out_file
from lmforge.pretrain.config.presets import names as preset_names
from lmforge.pretrain.core.errors import ConfigurationError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sp = add_command(
        sub,
        "bench",
        "Benchmark lmforge's training step against a minimal PyTorch loop on the same model "
        "(the floor) and, with --peers, against transformers' own class of the same shape "
        "(LlamaForCausalLM, or --family's), interleaved in one process (CPU/GPU).",
        config=False,
    )
    sp.add_argument(
        "--models",
        help="comma-separated presets of configs/model (default tiny,small; with --strategies "
        "the demo model of configs/pretrain/demo.yaml)",
    )
    sp.add_argument(
        "--precisions", help="comma-separated (default fp32,bf16; with --strategies bf16)"
    )
    sp.add_argument(
        "--steps",
        type=int,
        help="timed steps per window of each candidate (default 4; with --gpu 5); with "
        "--strategies, the steps of each run (default 20); with --evaluate, the training "
        "steps per window (default 20)",
    )
    sp.add_argument(
        "--windows",
        type=int,
        default=5,
        help="timed windows per candidate, taken in turns; the table gives their median and "
        "spread (default 5)",
    )
    _add_candidate_options(sp)
    _add_gpu_and_checkpoint_options(sp)
    _add_strategy_options(sp)
    sp.add_argument(
        "--generate",
        action="store_true",
        help="instead: greedy decoding tokens/s of `generate` (KV cache) against re-running "
        "the whole context for each token, for --models and --precisions",
    )
    sp.add_argument(
        "--evaluate",
        metavar="RUN|CHECKPOINT|DIR",
        help="instead: `lmforge evaluate --text` on this model next to training it, in one "
        "process: the trainer's tokens/s (same shape, --micro-batch, in the precision evaluate "
        "scores in) against scoring --text one window per forward pass in fp32 (as evaluate did "
        "before), --batch-size windows per pass in fp32, and batched in the run's precision",
    )
    _add_prepare_options(sp)
    sp.add_argument(
        "--text",
        nargs="+",
        metavar="FILE",
        help="--evaluate: the text files scored; --prepare: the corpus",
    )
    sp.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="--evaluate: windows per forward pass (default: evaluate's)",
    )
    sp.add_argument(
        "--new-tokens",
        type=int,
        default=192,
        help="tokens generated per case with --generate, after a prompt of 256 minus this "
        "(default 192)",
    )


def _add_prepare_options(sp: argparse.ArgumentParser) -> None:
    """bench --prepare and its corpus options (--text is shared with --evaluate)."""
    sp.add_argument(
        "--prepare",
        action="store_true",
        help="instead: `lmforge prepare`'s tokens/s next to the tokenizer library's own batch "
        "encoder on the same documents and cores, for SentencePiece and byte-level BPE "
        "(tokenizer.kind=bpe_bytes): the paragraphs of --text, else the bundled plays and "
        "reviews repeated up to --megabytes",
    )
    sp.add_argument(
        "--megabytes",
        type=float,
        default=32.0,
        help="--prepare: the size of the bundled corpus (default 32)",
    )
    sp.add_argument(
        "--vocab",
        type=int,
        default=8000,
        help="--prepare: the tokenizers' vocabulary (default 8000)",
    )


def _add_gpu_and_checkpoint_options(sp: argparse.ArgumentParser) -> None:
    """bench --gpu (and --modes), bench --checkpoint, and --out for every kind."""
    sp.add_argument(
        "--gpu",
        action="store_true",
        help="instead: one CUDA GPU, sequence 2048, vocab 32000, the largest micro-batch that "
        "fits: lmforge in eager bf16, with compile, and with compile and float8 (--modes), for "
        "--models (default base-125m,350m,llama-1b): tokens/s, MFU against the datasheet peak, "
        "peak memory next to the estimate",
    )
    sp.add_argument(
        "--modes",
        default="eager,compile,compile+fp8",
        help="--gpu: which of eager, compile, compile+fp8 (default all three)",
    )
    sp.add_argument(
        "--checkpoint",
        action="store_true",
        help="instead: checkpoints of --models (default 350m) with AdamW state, in one process, "
        "written under the current directory: synchronous save against a raw write + fsync of "
        "the same bytes, load, and how long an asynchronous save blocks training",
    )
    sp.add_argument("--out", help="also write the results table (markdown) to this file")


# model.family's values (written out: importing the model mapping would slow `--help`)
FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def _add_candidate_options(sp: argparse.ArgumentParser) -> None:
    """The training bench's other candidates: transformers' class, a family, compile."""
    sp.add_argument(
        "--peers",
        action="store_true",
        help="add transformers' own class of the family, LlamaForCausalLM by default (same "
        "shape, same initial weights, a plain loop with the loss from labels=, AdamW, clipping)",
    )
    sp.add_argument(
        "--family",
        choices=FAMILIES,
        default="llama",
        help="the presets with a Hub family's switches: qwen2 adds q/k/v biases, qwen3 "
        "qk-norm, mistral only its class (default llama: the presets as they are); with "
        "--peers, transformers' class of that family",
    )
    sp.add_argument(
        "--compile",
        action="store_true",
        help="add lmforge with torch.compile per transformer block (train.compile=true)",
    )


def _add_strategy_options(sp: argparse.ArgumentParser) -> None:
    """bench --strategies and its options."""
    sp.add_argument(
        "--strategies",
        help="instead: these configs/parallel presets, each NAME or NAME:PROCESSES (e.g. "
        "ddp:1,fsdp,zero2,zero3), each a real `lmforge pretrain` of --steps steps per model "
        "and precision: tokens/s, MFU, the step's time split, and the measured peak memory per "
        "rank next to the estimate; needs --data",
    )
    sp.add_argument("--data", help="prepared data for --strategies (e.g. data/demo/pretrain)")
    sp.add_argument(
        "--nproc",
        type=int,
        default=2,
        help="processes of a --strategies preset without :N (default 2)",
    )
    sp.add_argument(
        "--seq-len",
        type=int,
        help="--strategies: sequence length (default: the config's); --evaluate: the window "
        "(default: the model's context)",
    )
    sp.add_argument(
        "--micro-batch",
        type=int,
        help="--strategies: samples per micro-batch and rank, one micro-batch per rank and step "
        "(default: the config's); --evaluate: the training step's samples (default 8)",
    )
    sp.add_argument(
        "--tensor-peak",
        action="store_true",
        help="--strategies on a CPU: peak memory of live tensors, not of the heap glibc keeps "
        "(allocations of 1 MiB or more are mapped and unmapped one by one); steps are slower, so "
        "tokens/s are not comparable with a run without it",
    )


def _check_presets(kind: str, names: str, flag: str) -> None:
    """Each of the comma-separated ``names`` is a shipped preset of ``kind``."""
    for name in names.split(","):
        have = preset_names(kind)  # the shipped presets (lmforge print-config --presets)
        if name not in have:
            raise ConfigurationError(
                f"{flag} {names}: no preset {name!r} in configs/{kind}/ ({', '.join(have)})"
            )


def _check_gpu_bench(args: argparse.Namespace) -> None:
    bad = [m for m in args.modes.split(",") if m not in ("eager", "compile", "compile+fp8")]
    if bad:
        raise ConfigurationError(
            f"--modes {args.modes}: {bad[0]!r} is not one of eager, compile, compile+fp8"
        )
    _check_presets("model", args.models, "--models")
    check_out_file(args.out)
    from lmforge.launcher.bench import require_cuda

    require_cuda()


def _check_strategy_bench(args: argparse.Namespace) -> None:
    if not args.data:
        raise ConfigurationError("--strategies needs --data DIR (run `make demo` for one)")
    check_nproc(args.nproc)
    names = []
    for item in args.strategies.split(","):
        name, _, count = item.partition(":")
        if count and not (count.isdigit() and int(count) >= 1):
            raise ConfigurationError(
                f"--strategies {args.strategies}: {item!r} needs a process count >= 1 "
                "after the colon, e.g. ddp:1"
            )
        names.append(name)
    _check_presets("parallel", ",".join(names), "--strategies")
    if args.models:
        _check_presets("model", args.models, "--models")
    for flag, value in (("--seq-len", args.seq_len), ("--micro-batch", args.micro_batch)):
        if value is not None and value < 1:
            raise ConfigurationError(f"{flag} {value}: give at least 1")
    from lmforge.pretrain.data.prepare import load_manifest

    load_manifest(args.data)


def _check_evaluate_bench(args: argparse.Namespace) -> None:
    if not args.text:
        raise ConfigurationError(
            "--evaluate needs --text FILE ... (the text to score, e.g. a few hundred KB)"
        )
    for flag in ("--seq-len", "--micro-batch", "--batch-size"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < 1:
            raise ConfigurationError(f"{flag} {value}: give at least 1")
    check_out_file(args.out)


def _check_prepare_bench(args: argparse.Namespace) -> None:
    if args.megabytes <= 0:
        raise ConfigurationError(f"--megabytes {args.megabytes}: give a positive size")
    if args.vocab < 300:
        raise ConfigurationError(f"--vocab {args.vocab}: give at least 300")
    for file in args.text or ():
        if not os.path.isfile(file):
            raise ConfigurationError(f"--text {file}: no such file")
    check_out_file(args.out)


def _check_bench(args: argparse.Namespace, seq_len: int) -> None:
    """Every value bench uses, before anything is timed (and the defaults that depend on the
    kind of bench)."""
    if args.steps is not None and args.steps < 1:
        raise ConfigurationError(f"--steps {args.steps}: give at least 1")
    if args.windows < 1:
        raise ConfigurationError(f"--windows {args.windows}: give at least 1")
    other = [
        f"--{m}"
        for m in ("gpu", "strategies", "generate", "evaluate", "prepare", "checkpoint")
        if getattr(args, m)
    ]
    if args.family != "llama" and other:
        raise ConfigurationError(
            f"--family {args.family} applies to the training bench (with or without --peers), "
            f"not to {other[0]}; drop one of them"
        )
    if args.evaluate:
        _check_evaluate_bench(args)
        return
    if args.prepare:
        _check_prepare_bench(args)
        return
    precisions = ("fp32", "bf16", "fp16") if args.strategies else ("fp32", "bf16")
    if args.precisions is None:
        args.precisions = "bf16" if args.strategies else "fp32,bf16"
    if args.models is None and not args.strategies:
        args.models = "base-125m,350m,llama-1b" if args.gpu else "tiny,small"
    if args.gpu:
        _check_gpu_bench(args)
        return
    bad = [p for p in args.precisions.split(",") if p not in precisions]
    if bad:
        raise ConfigurationError(
            f"--precisions {args.precisions}: {bad[0]!r} is not one of {', '.join(precisions)}"
        )
    check_out_file(args.out)
    if args.strategies:
        _check_strategy_bench(args)
        return
    _check_presets("model", args.models, "--models")
    if args.generate and not 0 < args.new_tokens < seq_len:
        raise ConfigurationError(
            f"--new-tokens {args.new_tokens}: give 1..{seq_len - 1} (the prompt is {seq_len} "
            "tokens minus these)"
        )


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.launcher import bench

    if args.checkpoint and args.models is None:
        args.models = "350m"
    _check_bench(args, bench.SEQ_LEN)
    if args.evaluate:
        bench.run_evaluate_bench(
            path=args.evaluate,
            files=args.text,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            micro_batch=args.micro_batch or bench.MICRO_BATCH,
            steps=args.steps or 20,
            windows=args.windows,
            out=args.out,
        )
    elif args.prepare:
        from lmforge.launcher.prepare_bench import run_prepare_bench

        run_prepare_bench(
            files=args.text,
            megabytes=args.megabytes,
            vocab=args.vocab,
            windows=args.windows,
            out=args.out,
        )
    elif args.checkpoint:
        from lmforge.pretrain.run.checkpoint_bench import run_checkpoint_bench

        run_checkpoint_bench(models=args.models.split(","), out=args.out)
    elif args.strategies:
        bench.run_strategy_bench(
            data=args.data,
            strategies=bench.parse_strategies(args.strategies, args.nproc),
            models=args.models.split(",") if args.models else None,
            precisions=args.precisions.split(","),
            steps=args.steps or 20,
            seq_len=args.seq_len,
            micro_batch=args.micro_batch,
            tensor_peak=args.tensor_peak,
            out=args.out,
        )
    elif args.gpu:
        bench.run_gpu_bench(
            models=args.models.split(","),
            modes=args.modes.split(","),
            windows=args.windows,
            steps=args.steps or 5,
            out=args.out,
        )
    elif args.generate:
        bench.run_generate_bench(
            models=args.models.split(","),
            precisions=args.precisions.split(","),
            new_tokens=args.new_tokens,
            out=args.out,
        )
    else:
        bench.run_bench(
            models=args.models.split(","),
            precisions=args.precisions.split(","),
            steps=args.steps or 4,
            windows=args.windows,
            peers=args.peers,
            compile=args.compile,
            out=args.out,
            family=args.family,
        )
    return 0


HANDLERS: dict[str, Handler] = {"bench": _bench}
