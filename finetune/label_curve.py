"""`lmforge finetune CONFIG --label-curve`: what a base model is worth in labels.

The config's task is trained at several numbers of labelled examples (``label_curve.sizes``:
nested, stratified, seeded subsets; finetune/subsets.py) from two starts, the config's base
(``init_from``) and ``label_curve.against`` (the same shape from random weights, or another
base). At each size both arms train the same fixed number of optimizer steps at every learning
rate of one grid, and each keeps the rate with the best validation accuracy; the kept models are
then scored on the test file example by example, and compared with the paired standard error.

Curve directory (``label_curve.out``, default ``<runs_dir>/<name>-curve``):

    configs/<point>.yaml       each point's config (an ordinary `lmforge finetune` config)
    <point>/                   its run directory; test_predictions.jsonl for the kept ones
    label_curve.json           the protocol, every point's validation figures, the comparison
    label_efficiency.png       test accuracy against labels, both arms, the majority class

A point is named ``n<size>-<arm>-lr<lr>``. Running the curve again skips finished points and
resumes interrupted ones (``resume=auto``); a point whose config changed is an error.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from omegaconf import OmegaConf

from lmforge.finetune.config import FinetuneConfig
from lmforge.finetune.data import steps_for
from lmforge.finetune.subsets import subset
from lmforge.pretrain.config.schema import to_yaml
from lmforge.pretrain.core.durable import replace_durable
from lmforge.pretrain.core.errors import ConfigurationError, DataError
from lmforge.pretrain.train.metrics import final_eval

Z_CLEAR = 2.0  # a difference of at least this many standard errors is not noise (~95%)
REPORT, FIGURE = "label_curve.json", "label_efficiency.png"


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """The mean of the per-example differences a_i - b_i and its standard error, the sample
    standard deviation of the differences over sqrt(n): the paired SE of the difference between
    two models scored on the same n examples (their shared easy and hard examples cancel)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same examples: {len(a)} vs {len(b)} scores")
    n = len(a)
    if n < 2:
        raise ValueError(f"a standard error needs at least 2 examples, got {n}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)


def verdict(diff: float, se: float, *, differ: bool = True) -> tuple[str, float]:
    """What a difference ``diff`` with standard error ``se`` says, and its z: ``helps`` or
    ``hurts`` at Z_CLEAR standard errors or more, else ``within noise``; ``no difference`` when
    the two models are right on exactly the same examples (``differ`` False)."""
    if not differ:
        return "no difference", 0.0
    z = diff / se if se > 0 else math.copysign(math.inf, diff)
    if abs(z) >= Z_CLEAR:
        return ("helps" if diff > 0 else "hurts"), z
    return "within noise", z


def labels_to_match(sizes: list[int], first: list[float], second: list[float]) -> dict | None:
    """How many labels the second arm needs to reach the first arm's accuracy at the smallest
    size: the first size where it does, and the count interpolated on log(labels) between that
    size and the one before. None when the first arm is not ahead at the smallest size; a dict
    without ``labels`` when the second arm never gets there."""
    target = first[0]
    if not target > second[0]:
        return None
    for i in range(1, len(sizes)):
        if second[i] >= target:
            lo, hi = math.log(sizes[i - 1]), math.log(sizes[i])
            t = (target - second[i - 1]) / (second[i] - second[i - 1])
            return {"target": target, "at": sizes[i], "labels": math.exp(lo + t * (hi - lo))}
    return {"target": target, "at": None}


# --------------------------------------------------------------------------------------------
# the points
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurvePoint:
    """One finetuning run of the curve."""

    size: int  # training examples
    label: str  # the size as configured ("100", "all")
    arm: str  # "base" (init_from) or "against"
    lr: float
    steps: int

    @property
    def name(self) -> str:
        return f"n{self.label}-{self.arm}-lr{self.lr:g}"


def curve_dir(cfg: FinetuneConfig) -> str:
    return cfg.label_curve.out or f"{cfg.run_dir}-curve"


def arm_names(cfg: FinetuneConfig) -> dict[str, str]:
    """Each arm's words in the report."""
    against = cfg.label_curve.against
    other = "from scratch" if against == "scratch" else f"from {against}"
    return {"base": f"from {cfg.init_from}", "against": other}


def check_curve(cfg: FinetuneConfig) -> None:
    """What a label curve needs of the config, in one line each."""
    lc = cfg.label_curve
    if cfg.task.type != "classification":
        raise ConfigurationError(
            f"--label-curve compares accuracy example by example: it needs task.type="
            f"classification, not {cfg.task.type}"
        )
    if cfg.init_from is None:
        raise ConfigurationError("--label-curve needs init_from: the base model it measures")
    if cfg.from_scratch:
        raise ConfigurationError(
            "--label-curve trains the scratch arm itself (label_curve.against=scratch); drop "
            "from_scratch=true"
        )
    if cfg.task.train_examples is not None:
        raise ConfigurationError(
            f"task.train_examples={cfg.task.train_examples}: the label curve sets it per point "
            "(label_curve.sizes); leave it null"
        )
    if cfg.early_stopping.patience or cfg.early_stopping.keep_best:
        raise ConfigurationError(
            "the label curve trains every point for its fixed steps (label_curve.steps); set "
            "early_stopping.patience=0 and early_stopping.keep_best=false"
        )
    if cfg.resume is not None:
        raise ConfigurationError(
            f"resume={cfg.resume}: the label curve resumes its own points; leave resume unset"
        )
    if lc.test is None and cfg.task.val is None:
        raise ConfigurationError(
            "--label-curve compares the arms on labelled examples no run trained on: set "
            "label_curve.test=<the test split> (or task.val)"
        )
    local = lc.test is not None and "://" not in lc.test and os.path.splitext(lc.test)[1]
    if local and not os.path.exists(lc.test):
        raise ConfigurationError(f"label_curve.test={lc.test}: no such file")


def plan_points(cfg: FinetuneConfig, n_train: int, classes: list | None) -> list[CurvePoint]:
    """Every point of the curve, smallest size first; each size checked against the
    ``n_train`` training examples (and their ``classes``) before anything trains."""
    lc, t = cfg.label_curve, cfg.train
    lrs = list(lc.lrs) if lc.lrs is not None else [cfg.optim.lr]
    points = []
    for i, label in enumerate(map(str, lc.sizes)):
        size = n_train if label == "all" else int(label)
        if label != "all":  # refused here, in one line: too many, or a label short of 2
            subset(classes, n_train, size=size, seed=cfg.task.subset_seed,
                   what="label_curve.sizes")  # fmt: skip
        if lc.steps is not None:
            steps = lc.steps[i]
        else:
            steps = t.max_steps or steps_for(t.epochs or 1.0, size, t.global_batch_size)
        for arm in ("base", "against"):
            points += [CurvePoint(size, label, arm, float(lr), steps) for lr in lrs]
    if len({p.size for p in points}) < len(lc.sizes):
        raise ConfigurationError(
            f"`label_curve.sizes`={list(lc.sizes)}: all is {n_train:,} examples here, a size "
            "already listed; drop one"
        )
    return points


def plan(cfg: FinetuneConfig) -> tuple[list[CurvePoint], list[str]]:
    """The curve's points and the label of every training example, after every check a point's
    start makes of the config, base, tokenizer and data (made once, here)."""
    from lmforge.finetune.run import prepare_run

    check_curve(cfg)
    _, _, data = prepare_run(copy.deepcopy(cfg))
    if cfg.label_curve.against != "scratch":  # the other base: its shape, tokenizer, data
        other = copy.deepcopy(cfg)
        other.init_from = cfg.label_curve.against
        prepare_run(other)
    classes = [data.labels[i] for i in data.train_label_ids]
    return plan_points(cfg, len(data.train), classes), classes


def describe_plan(cfg: FinetuneConfig) -> list[str]:
    """`--label-curve --dry-run`: the points the curve would train, and where."""
    points, classes = plan(cfg)
    root, batch = curve_dir(cfg), cfg.train.global_batch_size
    done = sum(final_eval(os.path.join(root, p.name), p.steps) is not None for p in points)
    lines = [
        f"label curve: {root}/, {len(points)} runs ({done} finished); "
        + "; ".join(f"{arm}: {words}" for arm, words in arm_names(cfg).items()),
        f"training examples: {len(classes):,} ("
        + ", ".join(f"{k} {v:,}" for k, v in sorted(Counter(classes).items()))
        + f"), subsets stratified and nested, task.subset_seed={cfg.task.subset_seed}",
    ]
    for label in map(str, cfg.label_curve.sizes):
        at = [p for p in points if p.label == label]
        p = at[0]
        lines.append(
            f"  {p.size:>7,} examples: {p.steps:,} steps of {batch} = "
            f"{p.steps * batch / p.size:.1f} epochs; lr {', '.join(f'{q.lr:g}' for q in at if q.arm == 'base')} "
            "for each arm"
        )
    return lines


def point_config(cfg: FinetuneConfig, p: CurvePoint, root: str) -> FinetuneConfig:
    """The finetune config of one point: the curve's config at that size, start, rate and
    number of steps, run in ``root``."""
    c = copy.deepcopy(cfg)
    c.runs_dir, c.name, c.resume = root, p.name, "auto"
    c.task.train_examples = None if p.label == "all" else p.size
    c.optim.lr = p.lr
    c.train.max_steps, c.train.epochs = p.steps, None
    if p.arm == "against":
        if cfg.label_curve.against == "scratch":
            c.from_scratch = True
        else:
            c.init_from = cfg.label_curve.against
    return c


def write_point(root: str, p: CurvePoint, c: FinetuneConfig) -> str:
    """configs/<point>.yaml; refuses to change the config of a point that has started."""
    path = os.path.join(root, "configs", f"{p.name}.yaml")
    text = to_yaml(c)
    started = os.path.isdir(os.path.join(root, p.name))
    if started and os.path.isfile(path):
        if OmegaConf.to_container(OmegaConf.load(path)) != OmegaConf.to_container(
            OmegaConf.create(text)
        ):
            raise ConfigurationError(
                f"{root}/{p.name} was started with another config than the curve now gives it "
                f"({path}); keep the curve's config, or set label_curve.out to a new directory"
            )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    replace_durable(path, text.encode())
    return path


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def pick(root: str, points: list[CurvePoint]) -> tuple[CurvePoint, dict[float, dict]]:
    """The point of ``points`` (one size and arm, every rate) whose last evaluation has the best
    validation accuracy, then macro-F1, then comes first; and each rate's evaluation."""
    evals = {p.lr: final_eval(os.path.join(root, p.name), p.steps) for p in points}
    missing = [p.name for p in points if evals[p.lr] is None]
    if missing:
        raise DataError(f"{root}/{missing[0]} has no final evaluation; run the curve again")
    best = max(points, key=lambda p: (evals[p.lr]["accuracy"], evals[p.lr]["macro_f1"]))
    return best, evals


def test_scores(root: str, p: CurvePoint, data: str) -> tuple[dict, dict[int, int]]:
    """A kept point's metrics on ``data`` and each example's score (row -> 1 if right), from its
    test_predictions.jsonl (written by the first call)."""
    from lmforge.finetune.inference import evaluate_examples, write_predictions

    run = os.path.join(root, p.name)
    path, metrics_path = (os.path.join(run, f) for f in ("test_predictions.jsonl", "test.json"))
    if os.path.isfile(metrics_path) and os.path.isfile(path):
        with open(metrics_path) as f:
            metrics = json.load(f)
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
    else:
        scored = evaluate_examples(run, data=data)
        metrics, rows = scored.metrics, scored.rows
        write_predictions(path, rows)
        replace_durable(metrics_path, (json.dumps(metrics, indent=1) + "\n").encode())
    return metrics, {int(r["row"]): int(r["correct"]) for r in rows}


def compare(root: str, cfg: FinetuneConfig, points: list[CurvePoint], test: str) -> list[dict]:
    """Per size: each arm's kept rate, validation and test figures, and the paired
    difference of their test scores with its verdict."""
    rows = []
    for label in map(str, cfg.label_curve.sizes):
        at = [p for p in points if p.label == label]
        arms = {}
        scores = {}
        for arm in ("base", "against"):
            kept, evals = pick(root, [p for p in at if p.arm == arm])
            metrics, scores[arm] = test_scores(root, kept, test)
            arms[arm] = {
                "lr": kept.lr,
                "run": kept.name,
                "val_accuracy": {f"{lr:g}": e["accuracy"] for lr, e in evals.items()},
                "test_accuracy": metrics["accuracy"],
                "test_macro_f1": metrics["macro_f1"],
                "test_dtype": metrics["dtype"],
            }
        common = sorted(set(scores["base"]) & set(scores["against"]))
        a = [scores["base"][i] for i in common]
        b = [scores["against"][i] for i in common]
        diff, se = paired_difference(a, b)
        only_a = sum(x > y for x, y in zip(a, b, strict=True))
        only_b = sum(y > x for x, y in zip(a, b, strict=True))
        word, z = verdict(diff, se, differ=bool(only_a or only_b))
        rows.append({
            "size": at[0].size, "label": label, "steps": at[0].steps, "arms": arms,
            "test_examples": len(common), "difference": diff, "se": se,
            "z": z if math.isfinite(z) else None,  # None: every disagreement goes one way
            "verdict": word, "right_only_base": only_a, "right_only_against": only_b,
        })  # fmt: skip
    return rows


def majority(train_labels: list[str], test_rows: dict[int, str]) -> tuple[str, float]:
    """The most common training label and its accuracy on the test examples."""
    label = Counter(train_labels).most_common(1)[0][0]
    return label, sum(v == label for v in test_rows.values()) / max(len(test_rows), 1)


def run_in_process(config: str) -> int:
    """One point in this process (a run on a few hundred examples trains in seconds: starting
    processes for it would cost as much)."""
    from lmforge.finetune.run import Finetuning
    from lmforge.pretrain.config.schema import load_config
    from lmforge.pretrain.run.session import run_session

    return run_session(Finetuning(load_config(FinetuneConfig, [config])))["exit_code"]


# How a curve's points are trained: their config files -> the names of those that failed.
Runner = Callable[[list[str]], list[str]]


def one_after_another(configs: list[str], run_point: Callable[[str], int] = run_in_process,
                      say: Callable[[str], None] = print) -> list[str]:  # fmt: skip
    """Each point after the last (``run_point(config)`` -> exit code): stops at the first that
    fails."""
    for i, config in enumerate(configs, 1):
        name = os.path.splitext(os.path.basename(config))[0]
        say(f"\n=== label curve {i}/{len(configs)}: {name}")
        if run_point(config):
            return [name]
    return []


def run_curve(cfg: FinetuneConfig, runner: Runner = one_after_another, *, say=print) -> dict:
    """Train every point that is not finished (``runner``), then compare the arms; write
    label_curve.json and label_efficiency.png. Returns the report."""
    points, classes = plan(cfg)
    root = curve_dir(cfg)
    os.makedirs(root, exist_ok=True)
    paths = {p: write_point(root, p, point_config(cfg, p, root)) for p in points}
    todo = [p for p in points if final_eval(os.path.join(root, p.name), p.steps) is None]
    say(
        f"label curve: {root}: {len(points)} runs ({len(cfg.label_curve.sizes)} sizes x 2 arms x "
        f"{len(points) // len(cfg.label_curve.sizes) // 2} learning rates), "
        f"{len(points) - len(todo)} finished"
    )
    # the longest first: runs side by side then end close together
    failed = runner([paths[p] for p in sorted(todo, key=lambda p: -p.steps)])
    if failed:
        raise DataError(
            f"label curve: {len(failed)} run(s) failed ({', '.join(failed[:3])}); see "
            f"{root}/{failed[0]}/ (and {root}/logs/), and run the curve again to resume them"
        )
    test = cfg.label_curve.test or cfg.task.val
    rows = compare(root, cfg, points, test)
    gold = _gold_labels(root, rows[0]["arms"]["base"]["run"])
    maj_label, maj_acc = majority(classes, gold)
    sizes = [r["size"] for r in rows]
    acc = {arm: [r["arms"][arm]["test_accuracy"] for r in rows] for arm in ("base", "against")}
    report = {
        "protocol": {
            "init_from": cfg.init_from,
            "against": cfg.label_curve.against,
            "sizes": list(map(str, cfg.label_curve.sizes)),
            "steps": [r["steps"] for r in rows],
            "lrs": sorted({p.lr for p in points}),
            "subset_seed": cfg.task.subset_seed,
            "seed": cfg.seed,
            "test": test,
            "picked_on": cfg.task.val or f"held-out share of {cfg.task.train}",
        },
        "arms": arm_names(cfg),
        "majority": {"label": maj_label, "accuracy": maj_acc},
        "points": rows,
        "labels_to_match": labels_to_match(sizes, acc["base"], acc["against"]),
    }
    replace_durable(os.path.join(root, REPORT), (json.dumps(report, indent=1) + "\n").encode())
    plot_curve(report, os.path.join(root, FIGURE))
    return report


def _gold_labels(root: str, run: str) -> dict[int, str]:
    with open(os.path.join(root, run, "test_predictions.jsonl"), encoding="utf-8") as f:
        return {int(r["row"]): r["label"] for r in map(json.loads, f)}


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------


def _rate(lr: float) -> str:
    """A learning rate as people write it: 5e-4, 1.5e-3, 0.01."""
    return f"{lr:g}" if lr >= 0.01 else np.format_float_scientific(lr, trim="-", exp_digits=1)


def report_lines(report: dict) -> list[str]:
    """The table and what it says, as `finetune --label-curve` and `make demo` print it."""
    arms, proto, rows = report["arms"], report["protocol"], report["points"]
    n_test = rows[0]["test_examples"]
    same = proto["test"] == proto["picked_on"]
    lines = [
        f"label curve: test accuracy on {proto['test']} ({n_test:,} examples"
        + ("; the same split picked the learning rates" if same else "")
        + "), ± one standard error; each arm's learning rate picked on validation from "
        + ", ".join(_rate(x) for x in proto["lrs"]),
        f"  A = {arms['base']}",
        f"  B = {arms['against']}",
        f"  {'labels':>7} {'steps':>5}  {'A (lr)':<24} {'B (lr)':<24} {'A - B (points)':<15} "
        "verdict (paired)",
    ]
    for r in rows:
        cells = []
        for arm in ("base", "against"):
            a = r["arms"][arm]
            p = a["test_accuracy"]
            se = math.sqrt(p * (1 - p) / n_test)
            cells.append(f"{p:.4f} ± {se:.4f} ({_rate(a['lr'])})")
        word = r["verdict"]
        if word in ("helps", "hurts"):
            z = f"{abs(r['z']):.1f} SE" if r["z"] is not None else "every disagreement one way"
            word = f"A {word} ({z})"
        elif word == "within noise":
            word = f"within noise ({abs(r['z']):.1f} SE < {Z_CLEAR:g})"
        lines.append(
            f"  {r['size']:>7,} {r['steps']:>5}  {cells[0]:<24} {cells[1]:<24} "
            f"{100 * r['difference']:+6.2f} ± {100 * r['se']:<5.2f}  {word}"
        )
    maj = report["majority"]
    lines.append(f"  majority class: accuracy {maj['accuracy']:.4f} (always {maj['label']!r})")
    lines.append("  " + _match_line(report["labels_to_match"], rows))
    return lines


def _match_line(match: dict | None, rows: list[dict]) -> str:
    first = rows[0]["size"]
    if match is None:
        return f"at {first:,} labels A is not ahead of B: no labels saved to report"
    if match.get("at") is None:
        return (
            f"B does not reach A's {match['target']:.4f} at {first:,} labels with up to "
            f"{rows[-1]['size']:,} labels"
        )
    return (
        f"B needs ~{match['labels']:,.0f} labels to match A at {first:,} (first reached at "
        f"{match['at']:,}; interpolated on log labels)"
    )


def plot_curve(report: dict, path: str) -> None:
    """label_efficiency.png: test accuracy against labels (log x), both arms with one standard
    error bars, and the majority class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, n = report["points"], report["points"][0]["test_examples"]
    sizes = [r["size"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.4), layout="constrained")
    for arm, colour, marker in (("base", "tab:blue", "o"), ("against", "tab:gray", "s")):
        acc = [r["arms"][arm]["test_accuracy"] for r in rows]
        err = [math.sqrt(p * (1 - p) / n) for p in acc]
        ax.errorbar(sizes, acc, yerr=err, color=colour, marker=marker, capsize=3,
                    label=report["arms"][arm])  # fmt: skip
    ax.axhline(
        report["majority"]["accuracy"], color="tab:red", linestyle=":", label="majority class"
    )
    for r in rows:
        if r["verdict"] in ("helps", "hurts"):
            top = max(r["arms"][a]["test_accuracy"] for a in ("base", "against"))
            top += math.sqrt(top * (1 - top) / n)  # above the error bar
            ax.annotate(f"{100 * r['difference']:+.1f}", (r["size"], top), fontsize=7,
                        xytext=(0, 4), textcoords="offset points", ha="center")  # fmt: skip
    ax.set(xscale="log", xlabel="labelled training examples", ylabel="test accuracy",
           title="label efficiency\n(bars: one SE; numbers: A - B in points, where 2 paired SE "
                 "or more)")  # fmt: skip
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=110)
    plt.close(fig)
