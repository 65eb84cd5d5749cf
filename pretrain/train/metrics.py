"""Metric sinks: metrics.jsonl (the contract), TensorBoard, W&B (logging.wandb), and the
loss-vs-FLOPs plot.

Rows, one JSON object per line: train ``{"kind":"train","step","tokens","flops","loss","lr","grad_norm",
"tokens_per_sec","mfu","time","skipped_steps","rollbacks","time_data","time_fwd_bwd","time_optim",
"time_other","time_checkpoint","peak_mem_gb"}`` (the step's time split and peak memory:
pretrain/train/loop.py's StepClock); eval
``{"kind":"eval","step","tokens","flops","val_loss",...}``, with ``val_loss/<source>`` per
source of a mixed corpus and ``val_loss/<name>`` per extra held-out text (``train.extra_val``).
``tokens`` and ``flops`` are cumulative for the run. After a resume from step S the rows past S
that the interrupted attempt wrote are dropped, so nothing is counted twice (and so are those of
the steps a rollback to S undid).
"""

from __future__ import annotations

import json
import os
import uuid

from lmforge.pretrain.core.durable import replace_durable
from lmforge.pretrain.core.errors import ConfigurationError


def read_metrics(path: str) -> list[dict]:
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:  # a line torn by a crash mid-write
                        continue
    return rows


def final_eval(run_dir: str, steps: int) -> dict | None:
    """The eval row of a finished run (at its last step, ``steps``), else None."""
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    done = [r for r in rows if r.get("kind") == "eval" and r.get("step", 0) >= steps]
    return done[-1] if done else None


def truncate_metrics(path: str, *, after_step: int) -> int:
    """Keep rows with step <= after_step (atomically); return how many rows were dropped."""
    rows = read_metrics(path)
    if not rows and not os.path.exists(path):
        return 0
    keep = [r for r in rows if r.get("step", 0) <= after_step]
    replace_durable(path, "".join(json.dumps(r) + "\n" for r in keep).encode())
    return len(rows) - len(keep)


WANDB_ID = "wandb_id"  # in the run directory: the W&B run that every attempt continues


def wandb_run_id(run_dir: str) -> str:
    """The W&B run id of ``run_dir``: the one its first attempt stored, else a new one
    ($WANDB_RUN_ID, or random), stored for the attempts that follow."""
    path = os.path.join(run_dir, WANDB_ID)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            stored = f.read().strip()
        if stored:
            return stored
    run_id = os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:12]
    replace_durable(path, (run_id + "\n").encode())
    return run_id


class MetricsWriter:
    """Appends rows to metrics.jsonl and mirrors scalars to TensorBoard / W&B (rank 0 only).

    Both sinks continue across attempts: TensorBoard appends to ``<run>/tb`` and purges the
    events past the resumed step; W&B resumes the run whose id is in ``<run>/wandb_id``
    (``resume="allow"``). The W&B keys (project, entity, name, mode) are read from ``config``,
    the run's resolved config."""

    def __init__(
        self, *, run_dir: str, start_step: int, tensorboard: bool, wandb: bool, config: dict
    ) -> None:
        # W&B first: when it cannot start, nothing of this attempt is in the run directory yet
        self._wandb = _open_wandb(run_dir, config) if wandb else None
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events the interrupted attempt logged past the checkpoint.
            self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step + 1)

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        scalars = {
            f"{row['kind']}/{k}": v
            for k, v in row.items()
            if isinstance(v, (int, float)) and k not in ("step", "kind")
        }
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, row["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=row["step"])

    def rewind(self, *, after_step: int) -> None:
        """Drop the rows past ``after_step`` (a rollback undid those steps), in metrics.jsonl and
        TensorBoard (W&B keeps what it was sent)."""
        self._file.close()
        truncate_metrics(self.path, after_step=after_step)
        self._file = open(self.path, "a")
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = self._tb.log_dir
            self._tb.close()
            self._tb = SummaryWriter(log_dir, purge_step=after_step + 1)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _open_wandb(run_dir: str, config: dict):
    """Start or resume the run's W&B run (the config check made sure wandb is installed)."""
    import wandb

    keys = config.get("logging", {})
    try:
        run = wandb.init(
            project=keys.get("wandb_project") or "lmforge",
            entity=keys.get("wandb_entity"),
            name=keys.get("wandb_name") or os.path.basename(os.path.normpath(run_dir)),
            id=wandb_run_id(run_dir),
            resume="allow",
            mode=keys.get("wandb_mode"),  # None: $WANDB_MODE, else online
            dir=None if os.environ.get("WANDB_DIR") else run_dir,
        )
    except (wandb.errors.Error, ValueError) as exc:  # not logged in, unreachable, bad WANDB_MODE
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigurationError(
            f"logging.wandb=true: W&B did not start ({first}); run `wandb login`, or log "
            "offline with logging.wandb_mode=offline (or WANDB_MODE=offline; `wandb sync` later)"
        ) from None
    run.config.update(config, allow_val_change=True)  # a resume may change some keys
    return run


def plot_loss_vs_flops(*, metrics_path: str, out_path: str, title: str) -> str | None:
    """Loss (train and val, and val per source or held-out text: ``val_loss/<name>``) against
    cumulative training FLOPs, log-x; None if nothing to plot."""
    rows = read_metrics(metrics_path)
    train = [(r["flops"], r["loss"]) for r in rows if r["kind"] == "train" and r["flops"] > 0]
    evals = [r for r in rows if r["kind"] == "eval" and r["flops"] > 0]
    val = [(r["flops"], r["val_loss"]) for r in evals]
    groups: dict[str, list[tuple[float, float]]] = {}
    for r in evals:
        for key, value in r.items():
            if key.startswith("val_loss/"):
                groups.setdefault(key[len("val_loss/") :], []).append((r["flops"], value))
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=False), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val, strict=False), "o-", label="val loss", ms=4)
    for name, points in groups.items():
        ax.plot(*zip(*points, strict=False), ".--", label=f"val loss: {name}", ms=3, lw=0.9)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (6N + 12·L·d·T per token)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small" if len(groups) > 2 else None)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
