"""What the scaling commands read from run directories: the final evaluation of a pretrain run
(a sweep's point, or a run given to `lmforge scaling fit`) and the result of a finetune run
(`lmforge scaling fit --finetune`)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from lmforge.pretrain.checkpoint.store import best_checkpoint, read_trainer_state
from lmforge.pretrain.config.schema import PretrainConfig, load_config
from lmforge.pretrain.core.durable import replace_durable
from lmforge.pretrain.core.errors import DataError
from lmforge.pretrain.train.metrics import final_eval, read_metrics


def read_run(run_dir: str) -> tuple[dict | None, PretrainConfig]:
    """(final eval row or None, the run's PretrainConfig) of a pretrain run directory."""
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise DataError(f"{run_dir} is not a run directory (no config.yaml); give a sweep or run")
    cfg = load_config(PretrainConfig, [cfg_path])
    return final_eval(run_dir, cfg.train.total_steps()), cfg


def finetune_points(runs: list[str]) -> list[dict]:
    """Per finetuned run: the metrics of its model (the evaluation of the checkpoint marked
    best, with early_stopping.keep_best; else the last) and the total compute behind it
    (pretraining + finetuning up to that step)."""
    rows = []
    for run in runs:
        evals = [
            r for r in read_metrics(os.path.join(run, "metrics.jsonl")) if r.get("kind") == "eval"
        ]
        base_path = os.path.join(run, "base.json")
        if not evals or not os.path.isfile(base_path):
            raise DataError(f"{run}: not a finished finetune run (no eval row or base.json)")
        with open(base_path) as f:
            base = json.load(f)
        best = best_checkpoint(os.path.join(run, "checkpoints"))
        step = read_trainer_state(best)["step"] if best else evals[-1]["step"]
        last = next(r for r in reversed(evals) if r["step"] == step)
        metric = next((k for k in ("accuracy", "f1", "val_loss") if k in last), None)
        pre = float(base.get("pretrain_flops") or 0.0)
        rows.append(
            {
                "run": os.path.basename(run.rstrip("/")),
                "metric": metric,
                "value": last[metric],
                "step": step,
                "pretrain_flops": pre,
                "finetune_flops": float(last["flops"]),
                "total_flops": pre + float(last["flops"]),
                "from_scratch": bool(base.get("from_scratch")),
            }
        )
    return rows


# --- early stopping's verdict on a sweep's point (scaling/early.py) ---

STOP_FILE = "early_stop.json"  # in a stopped point's run directory


@dataclass
class Verdict:
    run: str
    budget: float
    step: int  # the step it was judged at
    total_steps: int
    predicted: float  # final train loss
    low: float
    high: float
    sibling: str | None  # the sibling it was compared with (the lowest high end)
    sibling_high: float | None
    stop: bool
    flops_saved: float  # the FLOPs of the steps it did not train (0 unless stopped)
    kept_for_minimum: bool = False  # out of reach, but its budget needs it for a minimum

    def describe(self) -> str:
        head = (
            f"{self.run}: at step {self.step} of {self.total_steps}, final train loss predicted "
            f"{self.predicted:.4f} [{self.low:.4f}, {self.high:.4f}]"
        )
        if self.sibling is None:
            return head + "; no sibling to compare with yet: continues"
        if self.stop:
            return head + f" > {self.sibling}'s {self.sibling_high:.4f}: stopped"
        if self.kept_for_minimum:
            return head + (
                f" > {self.sibling}'s {self.sibling_high:.4f}, but its budget needs it for its "
                "minimum (three runs, and a size either side of the best): continues"
            )
        return head + f", within reach of {self.sibling}'s {self.sibling_high:.4f}: continues"


def write_verdict(run_dir: str, verdict: Verdict) -> None:
    replace_durable(
        os.path.join(run_dir, STOP_FILE), (json.dumps(asdict(verdict), indent=1) + "\n").encode()
    )


def read_verdict(run_dir: str) -> Verdict | None:
    path = os.path.join(run_dir, STOP_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return Verdict(**json.load(f))
