"""The commands that take a trained model (a run, a checkpoint or a model directory):
`lmforge consolidate`, `export`, `generate` and `evaluate`."""

from __future__ import annotations

import argparse
import math
import os

from lmforge.launcher.cli.common import Handler, add_command, add_trust_checkpoint, check_out_file
from lmforge.pretrain.core.durable import check_writable
from lmforge.pretrain.core.errors import ConfigurationError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sp = add_command(
        sub,
        "consolidate",
        "Checkpoint of any parallel layout -> one model directory (safetensors, config, "
        "tokenizer).",
        config=False,
    )
    sp.add_argument(
        "path",
        metavar="RUN|CHECKPOINT",
        help="runs/<name> (its latest checkpoint, or the one it marked best) or a checkpoint "
        "directory",
    )
    sp.add_argument("--out", required=True, help="new directory to write")
    sp.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights' dtype"
    )
    add_trust_checkpoint(sp)

    sp = add_command(
        sub,
        "export",
        "Export a run, checkpoint or model directory to Hugging Face transformers format "
        "(LlamaForCausalLM / LlamaForSequenceClassification / LlamaForTokenClassification, "
        "safetensors, a tokenizer with lmforge's ids, generation config, model card).",
        config=False,
    )
    sp.add_argument(
        "path", metavar="RUN|CHECKPOINT|DIR", help="runs/<name>, a checkpoint or a model dir"
    )
    sp.add_argument("--out", required=True, help="new directory to write")
    sp.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights' dtype"
    )
    add_trust_checkpoint(sp)

    sp = add_command(
        sub,
        "generate",
        "Sample text from a run, checkpoint or exported model, streamed to the terminal "
        "(an sft model's prompt goes into its template).",
        config=False,
    )
    sp.add_argument("path", metavar="RUN|CHECKPOINT|DIR")
    sp.add_argument("--prompt", default="", help="text to continue (default: empty)")
    sp.add_argument("--max-new-tokens", type=int, default=100, help="default 100")
    sp.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    sp.add_argument("--top-k", type=int, default=50, help="keep the k most likely (default 50)")
    sp.add_argument("--top-p", type=float, help="nucleus sampling: keep probability mass p")
    sp.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    sp.add_argument("--raw", action="store_true", help="do not apply an sft model's template")
    add_trust_checkpoint(sp)

    _add_evaluate(sub)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    sp = add_command(
        sub,
        "evaluate",
        "Perplexity of a model on text files (--text: a row per file and the total, scored in "
        "the precision the run trained in), a finetuned model's task metrics on a labelled file "
        "(--data; --predictions: each example's), or EleutherAI's lm-evaluation-harness tasks "
        "(--lm-eval, with the lmeval extra: results saved beside the run, or in an export's "
        "model card); docs/evaluation.md; prints JSON.",
        config=False,
    )
    sp.add_argument("path", metavar="RUN|CHECKPOINT|DIR")
    sp.add_argument(
        "--text",
        nargs="+",
        metavar="FILE",
        help="text files for perplexity, each one stream (progress on stderr: a bar on a "
        "terminal, else a line at each tenth of a long input)",
    )
    sp.add_argument("--data", help="labelled CSV/TSV/JSONL/Parquet file (or datasets name)")
    sp.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="KEY=NAME",
        help="override a task column, e.g. text_column=review (repeatable)",
    )
    sp.add_argument("--seq-len", type=int, help="perplexity window (default: model context)")
    sp.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="windows (--text) or examples (--data) per forward pass (default: --text as many "
        "windows as 16 MiB of logits hold on a CPU, about 8,192 tokens on a GPU; --data 32)",
    )
    sp.add_argument(
        "--predictions",
        metavar="FILE.jsonl",
        help="with --data: also write one JSON line per example, to compare models example "
        "by example: its row in the file, the file's id column if it has one, its loss, and "
        "(classification) gold label, prediction, the prediction's probability and every "
        "label's, or (token classification) the gold and predicted tag of each word; written "
        "whole or not at all",
    )
    sp.add_argument("--out", help="also write the JSON result to this file")
    _add_lm_eval_options(sp)
    add_trust_checkpoint(sp)


def _add_lm_eval_options(sp: argparse.ArgumentParser) -> None:
    """evaluate --lm-eval and its options (EleutherAI's lm-evaluation-harness)."""
    sp.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="lm-evaluation-harness tasks, comma-separated (e.g. hellaswag,arc_easy, or the "
        "names of your task YAMLs in --lm-eval-include); needs pip install 'lmforge[lmeval]'. "
        "A run or checkpoint is exported to a temporary directory first; results go to "
        "<run>/eval/lm_eval_<step>.json, or for an exported directory to <dir>/lm_eval.json "
        "and its README.md's model-index",
    )
    sp.add_argument(
        "--lm-eval-include",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory of task YAML files for --lm-eval (repeatable): local tasks, offline",
    )
    sp.add_argument(
        "--lm-eval-batch-size",
        default="1",
        metavar="N",
        help="--lm-eval batch size or auto (default 1)",
    )
    sp.add_argument(
        "--lm-eval-device",
        metavar="DEVICE",
        help="--lm-eval device, e.g. cpu, cuda:0 (default: cuda if any, else cpu)",
    )
    sp.add_argument(
        "--lm-eval-dtype",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="--lm-eval weights' dtype (default fp32)",
    )
    sp.add_argument(
        "--lm-eval-limit",
        type=float,
        metavar="N",
        help="--lm-eval: only the first N examples of each task (a fraction if < 1), for a quick "
        "look; not comparable with published scores",
    )
    sp.add_argument(
        "--lm-eval-fewshot",
        type=int,
        metavar="K",
        help="--lm-eval few-shot examples (default: the task's)",
    )


def _consolidate(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.pretrain.checkpoint.consolidate import consolidate
    from lmforge.pretrain.checkpoint.store import check_outside_checkpoints

    check_writable(args.out, "--out ")  # before the checkpoint is read
    check_outside_checkpoints(args.out)
    consolidate(args.path, out=args.out, dtype=args.dtype)
    return 0


def _export(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.finetune.export import export
    from lmforge.pretrain.checkpoint.store import check_outside_checkpoints

    check_outside_checkpoints(args.out)
    export(args.path, out=args.out, dtype=args.dtype)
    return 0


def _generate(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.finetune.inference import generate

    if args.max_new_tokens < 1:
        raise ConfigurationError(f"--max-new-tokens {args.max_new_tokens}: give at least 1")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise ConfigurationError(
            f"--temperature {args.temperature}: give a number >= 0 (0 = greedy)"
        )
    if args.top_k < 0:
        raise ConfigurationError(f"--top-k {args.top_k}: give a number >= 0 (0 = no limit)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigurationError(f"--top-p {args.top_p}: give a probability mass in (0, 1]")

    generate(
        args.path,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        raw=args.raw,
    )
    return 0


def _check_evaluate(args: argparse.Namespace) -> None:
    """evaluate's options, and its output places, before anything is read or scored."""
    if sum(map(bool, (args.text, args.data, args.lm_eval))) != 1:
        raise ConfigurationError(
            "give one of --text FILE ... (perplexity), --data FILE (task metrics) or "
            "--lm-eval TASKS (lm-evaluation-harness)"
        )
    if args.predictions is not None and not args.data:
        raise ConfigurationError(
            f"--predictions {args.predictions} needs --data FILE: it holds one line per "
            "labelled example"
        )
    if args.seq_len is not None and args.seq_len < 1:
        raise ConfigurationError(f"--seq-len {args.seq_len}: give a window of at least 1 token")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigurationError(f"--batch-size {args.batch_size}: give at least 1")
    check_out_file(args.out)  # say so before the evaluation, not after
    _check_predictions_file(args.predictions, args.out)
    bad = [c for c in args.column if "=" not in c or not c.split("=", 1)[0]]
    if bad:
        raise ConfigurationError(f"--column {bad[0]}: write KEY=NAME, e.g. text_column=review")


def _check_predictions_file(path: str | None, out: str | None) -> None:
    """--predictions FILE: a new file, or one to replace, through a temp file beside it (its
    directory must be writable too), and not the --out file."""
    if path is None:
        return
    check_out_file(path, "--predictions")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"--predictions {path}: {parent} is not writable (the file is replaced through a "
            "new one beside it); choose a directory you can write to"
        )
    if out is not None and os.path.abspath(out) == os.path.abspath(path):
        raise ConfigurationError(f"--out and --predictions both name {path}; give two files")


def _evaluate(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.finetune.inference import (
        evaluate_examples,
        perplexity,
        print_json,
        write_predictions,
    )

    _check_evaluate(args)
    if args.lm_eval:
        from lmforge.finetune.harness import run_lm_eval

        result = run_lm_eval(
            args.path,
            tasks=[t.strip() for t in args.lm_eval.split(",")],
            include=args.lm_eval_include,
            batch_size=args.lm_eval_batch_size,
            device=args.lm_eval_device,
            dtype=args.lm_eval_dtype,
            limit=args.lm_eval_limit,
            num_fewshot=args.lm_eval_fewshot,
        )
    elif args.text:
        result = perplexity(
            args.path, files=args.text, seq_len=args.seq_len, batch_size=args.batch_size
        )
    else:
        columns = dict(c.split("=", 1) for c in args.column)
        scores = evaluate_examples(
            args.path, data=args.data, columns=columns, batch_size=args.batch_size
        )
        if args.predictions:
            write_predictions(args.predictions, scores.rows)
        result = scores.metrics
    print_json(result, args.out)
    return 0


HANDLERS: dict[str, Handler] = {
    "consolidate": _consolidate,
    "export": _export,
    "generate": _generate,
    "evaluate": _evaluate,
}
