"""`lmforge`: one console script, one subcommand per stage.

    lmforge <command> [CONFIG.yaml ...] [section=PRESET.yaml ...] [dotted.key=value ...] [--flags]

Config files and overrides apply in order, later wins. `--flags` are operational options that are
not part of the run's config. Errors a user can fix print one line and exit non-zero; `--debug`
shows the traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

from lmforge.pretrain.core.signals import hold_stop_signals

EPILOG = """\
Config arguments apply in order, later wins:
  CONFIG.yaml             merge a whole config file
  section=PRESET.yaml     merge a preset into one section, e.g. model=configs/model/tiny.yaml
  section=NAME            a shipped preset by name, e.g. model=tiny parallel=zero3
                          (lmforge print-config --presets lists them)
  dotted.key=value        set one key, e.g. train.max_steps=200 optim.lr=1e-3
See every key with its default and meaning: lmforge print-config --for {command} --keys
"""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: the value and where to look, not the usage (that
    is what --help is for). Subcommands' parsers are of this class too."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _nproc_value(text: str) -> int:
    """``--nproc`` / torchrun's ``--nproc-per-node``: a number, or gpu, cpu, auto."""
    if text in ("gpu", "cpu", "auto"):
        import torch

        gpus = torch.cuda.device_count()
        if text == "gpu" and not gpus:
            raise argparse.ArgumentTypeError("gpu: this node has no visible GPU")
        return gpus if text == "gpu" or (text == "auto" and gpus) else os.cpu_count() or 1
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number, gpu, cpu or auto") from None


def _nnodes_value(text: str) -> int:
    """``--nnodes N`` or torchrun's ``N:N``; an elastic range MIN:MAX cannot be honoured."""
    low, _, high = text.partition(":")
    try:
        n, m = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of nodes") from None
    if n != m:
        raise argparse.ArgumentTypeError(
            f"{text}: lmforge runs a fixed number of nodes, not an elastic range; give N"
        )
    return n


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="lmforge",
        description="Distributed training pipeline for GPT-style language models.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_: str, *, config: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=EPILOG.format(
                command=name if name in ("prepare", "submit", "finetune", "scaling") else "pretrain"
            )
            if config
            else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if config:
            sp.add_argument(
                "config",
                nargs="*",
                metavar="ARG",
                help="CONFIG.yaml, section=PRESET.yaml or dotted.key=value",
            )
        sp.add_argument("--debug", action="store_true", help="show tracebacks of errors")
        return sp

    sp = command("prepare", "Text -> SentencePiece tokenizer -> memmap shards with a manifest.")
    sp.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    sp.add_argument(
        "--verify",
        metavar="DIR",
        help="only check the shards of an already prepared DIR against its manifest",
    )

    sp = command("pretrain", "Pretrain a GPT-style model on prepared data (1..N processes).")
    sp.add_argument(
        "--nproc", type=int, default=1, help="local processes (data parallel); default 1"
    )
    sp.add_argument(
        "--dry-run",
        action="store_true",
        help="check the data, layout and memory, print the resolved config, parameter counts, "
        "FLOPs, layout and memory estimate, then stop",
    )

    sp = command(
        "finetune",
        "Finetune a pretrained model (init_from=RUN|CHECKPOINT|HF_DIR) on a labelled task: "
        "classification, sft or token_classification (1..N processes).",
    )
    sp.add_argument(
        "--nproc", type=int, default=1, help="local processes (data parallel); default 1"
    )
    sp.add_argument(
        "--dry-run",
        action="store_true",
        help="check the base model, the task data, layout and memory, print the resolved config, "
        "layout and memory estimate, then stop",
    )

    sp = command(
        "launch",
        "Run an lmforge command in N processes on this node, or as one node of a multi-node\n"
        "job (torch elastic underneath; `pretrain --nproc N` is sugar for it). torchrun's\n"
        "options work in both spellings (--nproc-per-node, --nproc_per_node, --node_rank, ...).\n"
        "Plain `torchrun ... $(which lmforge) pretrain ...`, `srun lmforge pretrain ...` and\n"
        "`accelerate launch --multi_gpu ... $(which lmforge) pretrain ...` work as well: each\n"
        "process joins the launcher's world as one rank (docs/launching.md).",
        config=False,
    )
    sp.add_argument(
        "--nproc",
        "--nproc-per-node",
        "--nproc_per_node",
        dest="nproc",
        metavar="N",
        type=_nproc_value,
        default=1,
        help="processes on this node (default 1); gpu = one per visible GPU, cpu = one per CPU, "
        "auto = gpu where there are GPUs, else cpu",
    )
    sp.add_argument(
        "--nnodes",
        type=_nnodes_value,
        metavar="N",
        help="nodes in the job, a fixed number (N or N:N; default: the srun step's nodes, else 1)",
    )
    sp.add_argument(
        "--node-rank",
        "--node_rank",
        dest="node_rank",
        metavar="RANK",
        type=int,
        help="this node's rank (default: $SLURM_NODEID, else 0)",
    )
    sp.add_argument(
        "--master-addr",
        "--master_addr",
        dest="master_addr",
        metavar="ADDR",
        help="address of node 0 (static rendezvous)",
    )
    sp.add_argument(
        "--master-port",
        "--master_port",
        dest="master_port",
        metavar="PORT",
        type=int,
        help="port on node 0 (default 29500)",
    )
    sp.add_argument(
        "--standalone",
        action="store_true",
        help="one node, rendezvous on a free local port (what lmforge does by default on one node)",
    )
    sp.add_argument(
        "--rdzv-backend",
        "--rdzv_backend",
        dest="rdzv_backend",
        choices=["c10d", "static"],
        help="c10d (the default with --rdzv-endpoint: node ranks dealt on arrival) or static "
        "(--node-rank; the default with --master-addr)",
    )
    sp.add_argument(
        "--rdzv-endpoint",
        "--rdzv_endpoint",
        dest="rdzv_endpoint",
        metavar="HOST:PORT",
        help="rendezvous address instead of --master-addr/--master-port",
    )
    sp.add_argument(
        "--rdzv-id",
        "--rdzv_id",
        dest="rdzv_id",
        metavar="ID",
        help="job id every node gives (default: $SLURM_JOB_ID, else lmforge)",
    )
    sp.add_argument(
        "--max-restarts",
        "--max_restarts",
        dest="max_restarts",
        type=int,
        default=0,
        metavar="N",
        help="only 0: a failed worker ends the job (resume it with resume=auto, or let "
        "`lmforge submit` requeue it)",
    )
    sp.add_argument(
        "--log-dir",
        "--log_dir",
        dest="log_dir",
        metavar="DIR",
        help="per-rank stdout/stderr files here (default for pretrain: the run's logs/)",
    )
    sp.add_argument(
        "cmd", nargs=argparse.REMAINDER, metavar="COMMAND ...", help="e.g. pretrain CONFIG.yaml"
    )

    sp = command(
        "submit",
        "Submit lmforge commands to SLURM: lmforge submit [PROFILE.yaml] [key=value ...] "
        "[--flags] -- COMMAND ARGS ... [::: COMMAND ARGS ...] (stages after ::: wait for the "
        "previous one to succeed; the batch script is saved in the run directory).",
    )
    sp.add_argument("--name", help="job name (default: the run's name, or the command)")
    sp.add_argument("--dependency", help="sbatch dependency, e.g. afterok:1234")
    sp.add_argument(
        "--array", help="job array indices, e.g. 0-7; {index} in the command is the task's index"
    )
    sp.add_argument("--out-dir", help="where the script and log go (default: <run>/slurm)")
    sp.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")

    sp = command(
        "runs",
        "List runs: progress, checkpoints, SLURM jobs and logs; --predict: a run's final loss "
        "predicted from its curve so far (docs/predict.md).",
        config=False,
    )
    sp.add_argument("names", nargs="*", metavar="RUN", help="runs to show (default: all)")
    sp.add_argument("--runs-dir", help="parent of the run directories (default runs)")
    sp.add_argument("--tail", type=int, default=10, help="lines of a single run's newest log")
    sp.add_argument(
        "--predict",
        action="store_true",
        help="predict RUN's final train loss (and val_loss when it evaluates periodically) "
        "from its loss curve so far, with an interval; writes <run>/predict.png. Other "
        "finished runs in the same directory (a sweep) supply the shared parameters",
    )
    sp.add_argument(
        "--predict-from",
        type=float,
        metavar="FRACTION",
        help="with --predict, for a finished run: predict from its first FRACTION of steps "
        "(in (0, 1), e.g. 0.3) and compare with the measured final loss",
    )
    sp.add_argument(
        "--predict-check",
        metavar="SWEEP_DIR",
        help="for every finished run of SWEEP_DIR, predict its final loss from the first "
        "--fractions of its steps (shared parameters fitted on the other runs) and print the "
        "errors and their median per fraction",
    )
    sp.add_argument(
        "--fractions",
        default="0.2,0.3,0.5",
        help="with --predict-check: comma-separated fractions of steps (default 0.2,0.3,0.5)",
    )
    sp.add_argument(
        "--no-shared",
        action="store_true",
        help="with --predict/--predict-check: fit every parameter on the run's own curve, "
        "nothing from other runs",
    )
    sp.add_argument(
        "--figure", help="with --predict: where the figure goes (default <run>/predict.png)"
    )

    sp = command(
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

    sp = command(
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

    sp = command(
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

    sp = command(
        "evaluate",
        "Perplexity of a model on text files (--text), a finetuned model's task metrics on "
        "a labelled file (--data), or EleutherAI's lm-evaluation-harness tasks (--lm-eval, "
        "with the lmeval extra: results saved beside the run, or in an export's model card; "
        "docs/evaluation.md); prints JSON.",
        config=False,
    )
    sp.add_argument("path", metavar="RUN|CHECKPOINT|DIR")
    sp.add_argument("--text", nargs="+", metavar="FILE", help="text files for perplexity")
    sp.add_argument("--data", help="labelled CSV/TSV/JSONL/Parquet file (or datasets name)")
    sp.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="KEY=NAME",
        help="override a task column, e.g. text_column=review (repeatable)",
    )
    sp.add_argument("--seq-len", type=int, help="perplexity window (default: model context)")
    sp.add_argument("--out", help="also write the JSON result to this file")
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

    sp = command(
        "scaling",
        "Scaling laws: `scaling sweep CONFIG` trains an IsoFLOP grid of runs (here or as a SLURM "
        "array); `scaling fit SOURCE` fits L(C), L(N, D) and the compute-optimal allocation, "
        "chooses the form that predicts by a backtest on the fitted budgets, and writes a "
        "report.",
        config=False,
    )
    scaling = sp.add_subparsers(dest="scaling_command", metavar="sweep|fit")
    ssp = scaling.add_parser(
        "sweep",
        help="train the grid of a sweep config (configs/scaling/), then fit and report",
        description="Train every run of an IsoFLOP grid that is not finished (finished runs "
        "are skipped, interrupted ones resume), then fit and write <runs_dir>/<name>/report/.",
        epilog="Config arguments apply in order, later wins:\n"
        "  CONFIG.yaml        merge a sweep config (configs/scaling/demo.yaml)\n"
        "  dotted.key=value   set one key, e.g. budgets=[1e12,2e12,4e12] fit.holdout=[4e12]\n"
        "                     pretrain.optim.lr=1e-3 (pretrain.* is every run's pretrain config)\n"
        "See every key with its default and meaning: lmforge print-config --for scaling --keys",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ssp.add_argument("config", nargs="*", metavar="ARG", help="CONFIG.yaml or dotted.key=value")
    ssp.add_argument(
        "--dry-run", action="store_true", help="print the grid and each run's status, then stop"
    )
    ssp.add_argument(
        "--wait", action="store_true", help="launcher=slurm: wait for the array, then fit"
    )
    ssp.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    ssp = scaling.add_parser(
        "fit",
        help="fit scaling laws to a sweep directory, run directories or a CSV",
        description="Fit L(C) = E + A·C^-alpha to the IsoFLOP minima, L(N, D) = E + A/N^alpha + "
        "B/D^beta (Huber on log-loss, L-BFGS from a grid of starts, bootstrap intervals) and "
        "N_opt, D_opt ~ C^a, C^b; predict the held-out budgets and --target-flops; write "
        "report.md, fit.json, points.csv and figures. A CSV needs a loss column and two of "
        "N/params, D/tokens, C/flops (D = C / 6N when D is missing). Budgets: a sweep's are "
        "its nominal ones; for run directories or a CSV, a budget is at least 3 points whose C "
        "lie within a factor 1 + --budget-tolerance of each other and at least twice as many "
        "as in the same width of C just below and just above them (densest first); points in "
        "no budget enter the L(N, D) fit only. The output says the budgets found.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ssp.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="a sweep directory (runs/<name>), pretrain run directories, or a CSV file",
    )
    ssp.add_argument(
        "--out", help="report directory (default: <sweep>/report, else ./scaling-report)"
    )
    ssp.add_argument(
        "--target-flops",
        type=float,
        action="append",
        default=[],
        metavar="C",
        help="predict N*, D* and the loss at this budget (repeatable)",
    )
    ssp.add_argument(
        "--holdout",
        type=float,
        action="append",
        metavar="C",
        help="leave this budget out of the fits and predict it (repeatable; default: the "
        "sweep's fit.holdout)",
    )
    ssp.add_argument(
        "--exclude-highest",
        type=int,
        metavar="K",
        help="leave the K highest-loss points out of the L(N, D) fit",
    )
    ssp.add_argument("--bootstrap", type=int, metavar="B", help="bootstrap resamples (default 200)")
    ssp.add_argument(
        "--budget-tolerance",
        type=float,
        metavar="REL",
        help="the C of one budget lie within a factor 1 + REL of each other (default 0.2; "
        "budgets closer than a factor (1 + REL)^2 need a smaller one)",
    )
    ssp.add_argument(
        "--params",
        choices=["non_embedding", "total"],
        help="which parameter count is N for runs (default non_embedding)",
    )
    ssp.add_argument(
        "--simulate-early-stop",
        type=float,
        metavar="FRACTION",
        help="on a finished sweep: which runs early stopping (sweep key early_stop) would have "
        "stopped from this fraction of their steps, the compute saved, and the fit without them",
    )
    ssp.add_argument(
        "--finetune",
        nargs="+",
        default=[],
        metavar="RUN",
        help="finetuned run directories: plot their downstream metric against total "
        "(pretrain + finetune) compute",
    )
    ssp.add_argument("--debug", action="store_true", help="show tracebacks of errors")

    sp = command(
        "plan",
        "From a compute budget to a ready pretrain config: N* and D* with intervals, the model "
        "shape, batch and learning rate, the parallel layout that fits, the predicted loss and "
        "wall time. Writes OUT/pretrain.yaml and OUT/plan.md.",
    )
    sp.add_argument("--flops", type=float, help="the budget in training FLOPs")
    sp.add_argument(
        "--gpus", help="COUNTxNAME, e.g. 8xH100: the budget is their peak × --mfu × --hours"
    )
    sp.add_argument("--hours", type=float, help="wall-clock hours on --gpus")
    sp.add_argument(
        "--mfu",
        type=float,
        help="share of the peak the run reaches (e.g. 0.4); with --probe and no --mfu, measured",
    )
    sp.add_argument(
        "--fit",
        metavar="SOURCE",
        help="the law: a sweep's fit (runs/<sweep> or runs/<sweep>/report; its held-out budgets "
        "are not read; the run starts from the sweep's pretrain config and follows its rules), "
        "or a points CSV or run directories as `scaling fit` takes them",
    )
    sp.add_argument(
        "--law",
        choices=["hoffmann", "besiroglu"],
        help="the law: published constants (only their allocation transfers to your data)",
    )
    sp.add_argument("--data", metavar="DIR", help="prepared data (default: the config's data.path)")
    sp.add_argument("--name", default=None, help="the planned run's name (default plan-<C>)")
    sp.add_argument("--out", help="directory for pretrain.yaml and plan.md (default plans/<name>)")
    sp.add_argument("--nproc", type=int, default=1, help="processes without --gpus (default 1)")
    sp.add_argument(
        "--aspect-ratio",
        type=float,
        help="width/depth rule: d_model / n_layer (default: the sweep's, else 64)",
    )
    sp.add_argument(
        "--head-dim", type=int, help="width/depth rule: head width (default: the sweep's, else 64)"
    )
    sp.add_argument(
        "--probe",
        action="store_true",
        help="measure the layouts that fit by a few real steps; the fastest is planned and its "
        "rate gives the wall time",
    )
    sp.add_argument(
        "--submit",
        nargs="+",
        metavar="PROFILE",
        help="submit the planned run through `lmforge submit` (a SLURM profile and key=value)",
    )

    sp = command("print-config", "Print the resolved config of a command.")
    sp.add_argument(
        "--keys", action="store_true", help="list every key with its default and meaning instead"
    )
    sp.add_argument(
        "--presets",
        action="store_true",
        help="list the presets shipped with lmforge (configs/<section>/<name>.yaml), by section, "
        "instead: give one as section=NAME (model=tiny parallel=zero3), by its configs/ path, or "
        "a command's config by name (lmforge pretrain demo)",
    )
    sp.add_argument(
        "--for",
        dest="target",
        choices=["prepare", "pretrain", "finetune", "submit", "scaling"],
        default="pretrain",
        help="which command's config (default pretrain; submit: the SLURM profile; scaling: "
        "a sweep)",
    )

    sp = command(
        "bench",
        "Benchmark lmforge's training step against a minimal PyTorch loop on the same model "
        "(the floor) and, with --peers, against transformers' LlamaForCausalLM of the same "
        "shape, interleaved in one process (CPU/GPU).",
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
        "--strategies, the steps of each run (default 20)",
    )
    sp.add_argument(
        "--windows",
        type=int,
        default=5,
        help="timed windows per candidate, taken in turns; the table gives their median and "
        "spread (default 5)",
    )
    sp.add_argument(
        "--peers",
        action="store_true",
        help="add transformers' LlamaForCausalLM (same shape, same initial weights, a plain "
        "loop with the loss from labels=, AdamW, clipping)",
    )
    sp.add_argument(
        "--compile",
        action="store_true",
        help="add lmforge with torch.compile per transformer block (train.compile=true)",
    )
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
        "--seq-len", type=int, help="--strategies: sequence length (default: the config's)"
    )
    sp.add_argument(
        "--micro-batch",
        type=int,
        help="--strategies: samples per micro-batch and rank, one micro-batch per rank and step "
        "(default: the config's)",
    )
    sp.add_argument(
        "--tensor-peak",
        action="store_true",
        help="--strategies on a CPU: peak memory of live tensors, not of the heap glibc keeps "
        "(allocations of 1 MiB or more are mapped and unmapped one by one); steps are slower, so "
        "tokens/s are not comparable with a run without it",
    )
    sp.add_argument(
        "--generate",
        action="store_true",
        help="instead: greedy decoding tokens/s of `generate` (KV cache) against re-running "
        "the whole context for each token, for --models and --precisions",
    )
    sp.add_argument(
        "--new-tokens",
        type=int,
        default=192,
        help="tokens generated per case with --generate, after a prompt of 256 minus this "
        "(default 192)",
    )
    # The commands that read a checkpoint (resume=, init_from=, RUN|CHECKPOINT): its pickled
    # parts are checked before anything is unpickled (pretrain/core/safeload.py).
    for name in ("pretrain", "finetune", "consolidate", "export", "generate", "evaluate"):
        sub.choices[name].add_argument(
            "--trust-checkpoint",
            action="store_true",
            help="load a checkpoint's pickled state even where it names classes lmforge's "
            "checkpoints never hold (such a file can run code): only for a checkpoint whose "
            "source you trust",
        )
    return p


def _schema(command: str):
    from lmforge.finetune.config import FinetuneConfig
    from lmforge.launcher.slurm import SlurmProfile
    from lmforge.pretrain.config.schema import PrepareConfig, PretrainConfig
    from lmforge.scaling.config import ScalingConfig

    return {
        "prepare": PrepareConfig,
        "pretrain": PretrainConfig,
        "finetune": FinetuneConfig,
        "submit": SlurmProfile,
        "scaling": ScalingConfig,
    }[command]


def _launch_workers(argv: list[str], nproc: int, run_dir: str) -> int:
    """Re-run this command line in ``nproc`` local processes (without --nproc)."""
    from lmforge.launcher.local import launch_local

    worker_argv = [a for a in argv if not a.startswith("--nproc")]
    if "--nproc" in argv:  # "--nproc N" as two words
        i = argv.index("--nproc")
        worker_argv = argv[:i] + argv[i + 2 :]
    # this launcher holds the run's lock for its workers (pretrain/core/runlock.py)
    logs = os.path.join(run_dir, "logs")
    return launch_local(worker_argv, nproc=nproc, log_dir=logs, run_dir=run_dir)


def _plan(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.pretrain.core.durable import check_writable
    from lmforge.pretrain.core.errors import ConfigurationError
    from lmforge.scaling.grid import format_flops
    from lmforge.scaling.planner import Request, make_plan, render_plan, write_plan

    if args.nproc < 1:
        raise ConfigurationError(f"--nproc {args.nproc}: give at least 1")
    budget = args.flops if args.flops is not None else 0.0
    name = args.name or (f"plan-{format_flops(budget)}" if args.flops else "plan")
    out = args.out or os.path.join("plans", name)
    if os.path.lexists(out) and not os.path.isdir(out):  # said before the fit, not after it
        raise ConfigurationError(f"--out {out} is a file; give a directory for the plan")
    check_writable(out, "--out ")
    request = Request(
        fit_path=args.fit,
        law_name=args.law,
        config_args=args.config,
        data=args.data,
        name=name,
        probe=args.probe,
        shape={
            k: v
            for k, v in (("aspect_ratio", args.aspect_ratio), ("head_dim", args.head_dim))
            if v is not None
        },
        gpus=args.gpus,
    )
    plan = make_plan(request, flops=args.flops, hours=args.hours, mfu=args.mfu, nproc=args.nproc)
    write_plan(plan, out)
    print(render_plan(plan, out))
    print(f"plan: {out}/plan.md, config: {out}/pretrain.yaml")
    if args.submit:
        from lmforge.launcher.slurm import SlurmProfile, submit_chain
        from lmforge.pretrain.config.schema import load_config

        submit_chain(
            load_config(SlurmProfile, args.submit),
            command=["pretrain", os.path.join(out, "pretrain.yaml")],
            commands=HANDLERS,
            job_name=name,
            dependency=None,
            array=None,
            out_dir=None,
            dry_run=False,
        )
    return 0


def _scaling(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.pretrain.core.errors import ConfigurationError

    if args.scaling_command == "sweep":
        from lmforge.launcher.slurm import SlurmArrays
        from lmforge.pretrain.config.schema import load_config
        from lmforge.scaling.config import ScalingConfig
        from lmforge.scaling.sweep import sweep

        cfg = load_config(ScalingConfig, args.config)
        jobs = SlurmArrays(cfg.slurm) if cfg.launcher == "slurm" else None
        return sweep(cfg, dry_run=args.dry_run, wait=args.wait, jobs=jobs)
    if args.scaling_command == "fit":
        from lmforge.scaling.report import fit_sources

        if args.simulate_early_stop is not None:
            from lmforge.scaling.early import describe_simulation, simulate

            if len(args.sources) != 1 or not os.path.isfile(
                os.path.join(args.sources[0], "sweep.yaml")
            ):
                raise ConfigurationError(
                    "--simulate-early-stop replays a finished sweep: give one sweep directory"
                )
            print(describe_simulation(simulate(args.sources[0], args.simulate_early_stop)))
            return 0
        fit_sources(
            args.sources,
            out=args.out,
            target_flops=args.target_flops,
            holdout=args.holdout,
            exclude_highest=args.exclude_highest,
            bootstrap=args.bootstrap,
            budget_tolerance=args.budget_tolerance,
            params=args.params,
            finetune=args.finetune,
        )
        return 0
    raise ConfigurationError("lmforge scaling needs a subcommand: sweep CONFIG or fit SOURCE")


def _check_nproc(nproc: int) -> None:
    from lmforge.pretrain.core.errors import ConfigurationError

    if nproc < 1:
        raise ConfigurationError(f"--nproc {nproc}: give at least one process per node")


def _print_config(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.pretrain.config.schema import describe_keys, load_config, to_yaml

    schema = _schema(args.target)
    if args.presets:
        from lmforge.pretrain.config.presets import listing

        print(listing())
    elif args.keys:
        print(describe_keys(schema))
    else:
        print(to_yaml(load_config(schema, args.config)), end="")
    return 0


def _prepare(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.pretrain.config.schema import PrepareConfig, load_config, to_yaml

    if args.verify:
        from lmforge.pretrain.data.prepare import verify_shards

        verify_shards(args.verify)
        print(f"{args.verify}: every shard matches its manifest")
        return 0
    cfg = load_config(PrepareConfig, args.config)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from lmforge.pretrain.data.prepare import prepare

    prepare(cfg)
    return 0


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    """pretrain and finetune: check everything that can fail before any process starts (config,
    data, base model, layout, memory), then run here or in ``--nproc`` local processes."""
    from lmforge.launcher.commands import check_run_dir, load_command_config, workload
    from lmforge.pretrain.config.schema import to_yaml

    _check_nproc(args.nproc)
    work = workload(args.command, load_command_config(args.command, args.config))
    if not args.dry_run and "LOCAL_RANK" not in os.environ:  # (a launcher checked for workers)
        check_run_dir(work.cfg)
    if args.dry_run:  # the config as the run would resolve it (vocabulary, base model's shape)
        plan = work.preflight(world_size=args.nproc, local_ranks=args.nproc)
        print(to_yaml(work.cfg), end="")
        for line in work.dry_run_lines():
            print(f"# {line}")
        print(f"# layout: {plan.layout.describe()}")
        print(f"# memory per rank (estimate): {plan.describe_memory()}")
        return 0
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        # bad data, base, tokenizer, layout or memory: one line here, before any worker starts
        work.preflight(world_size=args.nproc, local_ranks=args.nproc)
        return _launch_workers(argv, args.nproc, work.cfg.run_dir)
    from lmforge.pretrain.run.session import run_session

    # 0 when done; 128 + signal when SIGUSR1/SIGTERM stopped it early (after saving)
    return run_session(work)["exit_code"]


def _check_rendezvous(args: argparse.Namespace, *, nnodes: int, node_rank: int) -> None:
    """Node rank, port, rendezvous endpoint and torchrun options that can work, before anything
    waits on them."""
    from lmforge.pretrain.core.errors import ConfigurationError

    if args.max_restarts != 0:
        raise ConfigurationError(
            f"--max-restarts {args.max_restarts}: lmforge launch does not restart failed "
            "workers (a failure ends the job); give 0, and resume with resume=auto (or let "
            "`lmforge submit` requeue the job)"
        )
    if args.standalone:
        given = [
            flag
            for flag, value in (
                ("--rdzv-endpoint", args.rdzv_endpoint),
                ("--master-addr", args.master_addr),
                ("--nnodes", args.nnodes if args.nnodes not in (None, 1) else None),
            )
            if value is not None
        ]
        if given:
            raise ConfigurationError(
                f"--standalone runs one node on a local rendezvous; drop {' and '.join(given)} "
                "(or --standalone for a multi-node job)"
            )
    static = args.rdzv_backend == "static" or (args.rdzv_backend is None and not args.rdzv_endpoint)
    if static and not 0 <= node_rank < nnodes:
        raise ConfigurationError(
            f"--node-rank {node_rank}: with --nnodes {nnodes} give a node rank in 0..{nnodes - 1}"
        )
    if args.master_port is not None and not 0 < args.master_port < 65536:
        raise ConfigurationError(f"--master-port {args.master_port}: give a port in 1..65535")
    if args.rdzv_endpoint is not None:
        host, _, port = args.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigurationError(
                f"--rdzv-endpoint {args.rdzv_endpoint!r}: give HOST:PORT, e.g. 10.0.0.1:29400"
            )


def _slurm_nodes() -> tuple[int, int]:
    """(nodes, this node's index) of the srun step this launcher runs in (of the job outside a
    step; 1, 0 outside SLURM). A step with more tasks than nodes would start several launchers
    per node: refused."""
    from lmforge.pretrain.core.errors import ConfigurationError

    env = os.environ
    if "SLURM_STEP_ID" in env and "SLURM_STEP_NUM_NODES" in env:
        nodes, tasks = int(env["SLURM_STEP_NUM_NODES"]), int(env.get("SLURM_STEP_NUM_TASKS", "1"))
        if tasks > nodes:
            raise ConfigurationError(
                f"lmforge launch runs once per node, but this srun step has {tasks} tasks on "
                f"{nodes} node(s): run `srun --ntasks-per-node=1 lmforge launch --nproc N ...`, "
                "or let srun start the ranks: `srun lmforge pretrain ...`"
            )
        return nodes, int(env.get("SLURM_NODEID", "0"))
    return int(env.get("SLURM_NNODES", "1")), int(env.get("SLURM_NODEID", "0"))


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.launcher.commands import TRAINING_COMMANDS, load_command_config
    from lmforge.launcher.local import launch
    from lmforge.pretrain.core.errors import ConfigurationError

    _check_nproc(args.nproc)
    if args.nnodes is not None and args.nnodes < 1:
        raise ConfigurationError(f"--nnodes {args.nnodes}: give at least one node")
    args.cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not args.cmd or args.cmd[0] in ("launch", "submit"):
        raise ConfigurationError(
            "lmforge launch needs the command to run, e.g. "
            "`lmforge launch --nproc 2 pretrain configs/pretrain/demo.yaml`"
        )
    if args.cmd[0] not in HANDLERS:
        raise ConfigurationError(
            f"`{args.cmd[0]}` is not an lmforge command; run one of {', '.join(HANDLERS)}"
        )
    if any(a == "--nproc" or a.startswith("--nproc=") for a in args.cmd[1:]):
        raise ConfigurationError(
            f"`--nproc` after `{args.cmd[0]}`: with lmforge launch the processes per node are "
            f"launch's option; write `lmforge launch --nproc N {args.cmd[0]} ...`"
        )
    # Under srun each node's launcher finds its place in SLURM's variables.
    slurm_nodes, slurm_node = (1, 0) if args.standalone else _slurm_nodes()
    nnodes = args.nnodes or slurm_nodes
    node_rank = slurm_node if args.node_rank is None else args.node_rank
    _check_rendezvous(args, nnodes=nnodes, node_rank=node_rank)
    run_dir = None
    cfg = None
    if args.cmd[0] in TRAINING_COMMANDS:
        cfg = load_command_config(args.cmd[0], args.cmd[1:])
        run_dir = cfg.run_dir
    elif args.nproc * nnodes > 1:
        raise ConfigurationError(
            f"`lmforge {args.cmd[0]}` runs once, not once per process: run it without launch "
            f"(only {' and '.join(TRAINING_COMMANDS)} run one process per rank)"
        )
    log_dir = args.log_dir
    if log_dir is None and run_dir is not None:
        log_dir = os.path.join(run_dir, "logs")
    if cfg is not None and "--dry-run" not in args.cmd:
        # bad data, base, tokenizer, layout, memory or run directory: one line here, before any
        # process starts (each worker would otherwise print it)
        from lmforge.launcher.commands import check_run_dir, workload

        check_run_dir(cfg)
        workload(args.cmd[0], cfg).preflight(world_size=args.nproc * nnodes, local_ranks=args.nproc)
    # The launcher of rank 0's node holds the run's lock for its workers (pretrain/core/runlock.py):
    # the one node, or node rank 0 of a static rendezvous; with c10d ranks are dealt on
    # arrival, so rank 0 takes it itself. --dry-run writes nothing and takes no lock.
    static = args.rdzv_backend == "static" or (args.rdzv_backend is None and not args.rdzv_endpoint)
    if "--dry-run" in args.cmd or not (nnodes == 1 or (static and node_rank == 0)):
        run_dir = None
    return launch(
        args.cmd,
        nproc=args.nproc,
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_backend=args.rdzv_backend,
        standalone=args.standalone,
        run_id=args.rdzv_id,
        log_dir=log_dir,
        run_dir=run_dir,
    )


def _submit(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.launcher.slurm import SlurmProfile, submit_chain
    from lmforge.pretrain.config.schema import load_config

    submit_chain(
        load_config(SlurmProfile, args.config),
        command=args.cmd,
        commands=HANDLERS,
        job_name=args.name,
        dependency=args.dependency,
        array=args.array,
        out_dir=args.out_dir,
        dry_run=args.dry_run,
    )
    return 0


def _runs(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.launcher.runs import describe_runs
    from lmforge.pretrain.core.errors import ConfigurationError

    if args.tail < 0:
        raise ConfigurationError(f"--tail {args.tail}: give a number of lines >= 0")
    if args.predict_check is not None:
        from lmforge.launcher.runs import predict_check

        if args.names or args.predict:
            raise ConfigurationError(
                "--predict-check SWEEP_DIR checks a whole sweep: drop the run names and --predict"
            )
        if not os.path.isdir(args.predict_check):
            raise ConfigurationError(
                f"--predict-check {args.predict_check}: not a directory; give a sweep directory "
                "(runs/<sweep>) holding finished runs"
            )
        try:
            fractions = [float(f) for f in args.fractions.split(",")]
        except ValueError:
            fractions = []
        if not fractions or not all(0 < f < 1 for f in fractions):
            raise ConfigurationError(
                f"--fractions {args.fractions}: give fractions of steps in (0, 1), e.g. 0.2,0.3,0.5"
            )
        print(predict_check(args.predict_check, fractions, shared=not args.no_shared))
        return 0
    if args.predict_from is not None and not args.predict:
        raise ConfigurationError("--predict-from goes with --predict: add --predict")
    if args.predict_from is not None and not 0 < args.predict_from < 1:
        raise ConfigurationError(
            f"--predict-from {args.predict_from}: give a fraction of the run's steps in (0, 1), "
            "e.g. 0.3"
        )
    runs_dir = args.runs_dir or "runs"
    if args.runs_dir is not None and not os.path.isdir(runs_dir):  # (the default may be absent)
        what = "is a file" if os.path.exists(runs_dir) else "does not exist"
        raise ConfigurationError(f"--runs-dir {runs_dir} {what}; give the parent of the runs")
    missing = [n for n in args.names if not os.path.isdir(os.path.join(runs_dir, n))]
    if missing:
        raise ConfigurationError(
            f"no run {missing[0]} under {runs_dir}; `lmforge runs` lists those there"
        )
    if args.predict:
        from lmforge.launcher.runs import predict_run

        if len(args.names) != 1:
            raise ConfigurationError(
                f"--predict takes one run, got {len(args.names)}; e.g. `lmforge runs NAME "
                "--predict` (a sweep's run: <sweep>/<run>)"
            )
        run_dir = os.path.join(runs_dir, args.names[0])
        figure = args.figure or os.path.join(run_dir, "predict.png")
        if not os.path.isdir(os.path.dirname(os.path.abspath(figure))):
            raise ConfigurationError(f"--figure {figure}: its directory does not exist")
        print(
            predict_run(
                run_dir, fraction=args.predict_from, shared=not args.no_shared, figure=figure
            )
        )
        return 0
    print(describe_runs(runs_dir, args.names or None, tail=args.tail))
    return 0


def _check_out_file(out: str | None) -> None:
    """--out FILE: a file that can be written, said before the work, not after it."""
    if out is None:
        return
    from lmforge.pretrain.core.durable import check_writable
    from lmforge.pretrain.core.errors import ConfigurationError

    if os.path.isdir(out):
        raise ConfigurationError(f"--out {out} is a directory; give a file name")
    if os.path.isfile(out):  # replaced by the new results
        if not os.access(out, os.W_OK):
            raise ConfigurationError(f"--out {out} is not writable; give another file name")
        return
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.lexists(parent):
        raise ConfigurationError(f"--out {out}: no directory {parent}; create it first")
    check_writable(out, "--out ")


def _consolidate(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.pretrain.checkpoint.consolidate import consolidate
    from lmforge.pretrain.core.durable import check_writable

    check_writable(args.out, "--out ")  # before the checkpoint is read
    consolidate(args.path, out=args.out, dtype=args.dtype)
    return 0


def _export(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.finetune.export import export

    export(args.path, out=args.out, dtype=args.dtype)
    return 0


def _generate(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.finetune.inference import generate
    from lmforge.pretrain.core.errors import ConfigurationError

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


def _evaluate(args: argparse.Namespace, argv: list[str]) -> int:
    from lmforge.finetune.inference import perplexity, print_json, task_metrics
    from lmforge.pretrain.core.errors import ConfigurationError

    if sum(map(bool, (args.text, args.data, args.lm_eval))) != 1:
        raise ConfigurationError(
            "give one of --text FILE ... (perplexity), --data FILE (task metrics) or "
            "--lm-eval TASKS (lm-evaluation-harness)"
        )
    _check_out_file(args.out)  # say so before the evaluation, not after
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
        print_json(result, args.out)
        return 0
    if args.seq_len is not None and args.seq_len < 1:
        raise ConfigurationError(f"--seq-len {args.seq_len}: give a window of at least 1 token")
    bad = [c for c in args.column if "=" not in c or not c.split("=", 1)[0]]
    if bad:
        raise ConfigurationError(f"--column {bad[0]}: write KEY=NAME, e.g. text_column=review")
    if args.text:
        result = perplexity(args.path, files=args.text, seq_len=args.seq_len)
    else:
        columns = dict(c.split("=", 1) for c in args.column)
        result = task_metrics(args.path, data=args.data, columns=columns)
    print_json(result, args.out)
    return 0


def _check_bench(args: argparse.Namespace, seq_len: int) -> None:
    """Every value bench uses, before anything is timed."""
    from lmforge.pretrain.config.presets import names as preset_names
    from lmforge.pretrain.core.errors import ConfigurationError

    def presets(kind: str, names: str, flag: str) -> None:
        for name in names.split(","):
            have = preset_names(kind)  # the shipped presets (lmforge print-config --presets)
            if name not in have:
                raise ConfigurationError(
                    f"{flag} {names}: no preset {name!r} in configs/{kind}/ ({', '.join(have)})"
                )

    if args.steps is not None and args.steps < 1:
        raise ConfigurationError(f"--steps {args.steps}: give at least 1")
    if args.windows < 1:
        raise ConfigurationError(f"--windows {args.windows}: give at least 1")
    precisions = ("fp32", "bf16", "fp16") if args.strategies else ("fp32", "bf16")
    if args.precisions is None:
        args.precisions = "bf16" if args.strategies else "fp32,bf16"
    if args.models is None and not args.strategies:
        args.models = "base-125m,350m,llama-1b" if args.gpu else "tiny,small"
    if args.gpu:
        bad = [m for m in args.modes.split(",") if m not in ("eager", "compile", "compile+fp8")]
        if bad:
            raise ConfigurationError(
                f"--modes {args.modes}: {bad[0]!r} is not one of eager, compile, compile+fp8"
            )
        presets("model", args.models, "--models")
        _check_out_file(args.out)
        from lmforge.launcher.bench import require_cuda

        require_cuda()
        return
    bad = [p for p in args.precisions.split(",") if p not in precisions]
    if bad:
        raise ConfigurationError(
            f"--precisions {args.precisions}: {bad[0]!r} is not one of {', '.join(precisions)}"
        )
    _check_out_file(args.out)
    if args.strategies:
        if not args.data:
            raise ConfigurationError("--strategies needs --data DIR (run `make demo` for one)")
        _check_nproc(args.nproc)
        names = []
        for item in args.strategies.split(","):
            name, _, count = item.partition(":")
            if count and not (count.isdigit() and int(count) >= 1):
                raise ConfigurationError(
                    f"--strategies {args.strategies}: {item!r} needs a process count >= 1 "
                    "after the colon, e.g. ddp:1"
                )
            names.append(name)
        presets("parallel", ",".join(names), "--strategies")
        if args.models:
            presets("model", args.models, "--models")
        for flag, value in (("--seq-len", args.seq_len), ("--micro-batch", args.micro_batch)):
            if value is not None and value < 1:
                raise ConfigurationError(f"{flag} {value}: give at least 1")
        from lmforge.pretrain.data.prepare import load_manifest

        load_manifest(args.data)
        return
    presets("model", args.models, "--models")
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
    if args.checkpoint:
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
        )
    return 0


# command -> handler(args, argv) -> exit code; each handler imports what it needs, so that
# `lmforge --help` stays fast.
HANDLERS: dict[str, Callable[[argparse.Namespace, list[str]], int]] = {
    "print-config": _print_config,
    "prepare": _prepare,
    "pretrain": _train,
    "finetune": _train,
    "scaling": _scaling,
    "plan": _plan,
    "launch": _launch,
    "submit": _submit,
    "runs": _runs,
    "consolidate": _consolidate,
    "export": _export,
    "generate": _generate,
    "evaluate": _evaluate,
    "bench": _bench,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd: list[str] = []
    if argv[:1] == ["submit"] and "--" in argv:  # submit's own args, then the job's command
        cmd, argv = argv[argv.index("--") + 1 :], argv[: argv.index("--")]
    parser = _parser()
    # Config arguments and --flags may be interleaved: collect the positional leftovers.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-")]
    if unknown or (extra and not hasattr(args, "config")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.config = [*args.config, *extra]
    if not args.command:
        parser.print_help()
        return 2
    if args.command == "submit":
        args.cmd = cmd
    if getattr(args, "trust_checkpoint", False):
        from lmforge.pretrain.core.safeload import TRUST_ENV

        os.environ[TRUST_ENV] = "1"  # read where checkpoints are loaded, worker processes too
    if args.command in ("pretrain", "finetune", "launch"):
        # SIGUSR1/SIGTERM while starting up: stop after the first step, not die unsaved
        hold_stop_signals()
    from lmforge.pretrain.core.errors import LMForgeError

    in_worker = False
    try:
        if args.command in ("pretrain", "finetune"):
            # Started by torchrun, srun, accelerate or `lmforge launch`: join that world as one
            # rank (srun's variables become torch's), or refuse one that cannot be joined.
            from lmforge.pretrain.core.launch_env import join_launched_world

            join_launched_world(nproc=args.nproc)
        in_worker = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
        code = HANDLERS[args.command](args, argv)
    except LMForgeError as exc:
        if args.debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        from lmforge.launcher.local import record_worker_error

        if not (in_worker and record_worker_error(msg)):
            from lmforge.pretrain.core.dist import eprint

            eprint(msg)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    if in_worker:
        # gloo can abort at interpreter exit (SIGABRT in a destructor): leave without atexit
        # handlers.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
