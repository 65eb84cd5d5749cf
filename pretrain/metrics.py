"""Metric sinks: metrics.jsonl (the contract), TensorBoard, W&B, and the loss-vs-FLOPs plot.

Rows, one JSON object per line: train ``{"kind":"train","step","tokens","flops","loss","lr","grad_norm",
"tokens_per_sec","mfu","time","skipped_steps","rollbacks","time_data","time_fwd_bwd","time_optim",
"time_other","time_checkpoint","peak_mem_gb"}`` (the step's time split and peak memory:
pretrain/trainer.py's StepClock); eval
``{"kind":"eval","step","tokens","flops","val_loss",...}``.
``tokens`` and ``flops`` are cumulative for the run. After a resume from step S the rows past S
that the interrupted attempt wrote are dropped, so nothing is counted twice (and so are those of
the steps a rollback to S undid).
"""

from __future__ import annotations

import json
import os

from pretrain.durable import replace_durable


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


def truncate_metrics(path: str, *, after_step: int) -> int:
    """Keep rows with step <= after_step (atomically); return how many rows were dropped."""
    rows = read_metrics(path)
    if not rows and not os.path.exists(path):
        return 0
    keep = [r for r in rows if r.get("step", 0) <= after_step]
    replace_durable(path, "".join(json.dumps(r) + "\n" for r in keep).encode())
    return len(rows) - len(keep)


class MetricsWriter:
    """Appends rows to metrics.jsonl and mirrors scalars to TensorBoard / W&B (rank 0 only)."""

    def __init__(
        self, *, run_dir: str, start_step: int, tensorboard: bool, wandb: str, config: dict
    ) -> None:
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a")
        self._tb = None
        self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events the interrupted attempt logged past the checkpoint.
            self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step + 1)
        if wandb != "off":
            try:
                import wandb as wb
            except ImportError:
                print("warning: logging.wandb is set but wandb is not installed; skipping it")
            else:
                self._wandb = wb.init(
                    project="lmforge",
                    name=os.path.basename(run_dir),
                    dir=run_dir,
                    mode=wandb,
                    config=config,
                    resume="allow",
                )

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


def plot_loss_vs_flops(*, metrics_path: str, out_path: str, title: str) -> str | None:
    """Loss (train and val) against cumulative training FLOPs, log-x; None if nothing to plot."""
    rows = read_metrics(metrics_path)
    train = [(r["flops"], r["loss"]) for r in rows if r["kind"] == "train" and r["flops"] > 0]
    val = [(r["flops"], r["val_loss"]) for r in rows if r["kind"] == "eval" and r["flops"] > 0]
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
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (6N + 12·L·d·T per token)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
