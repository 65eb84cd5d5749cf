"""`lmforge scaling sweep`: write the grid's run configs into the sweep directory and train the
runs that are not finished, one after another here or as one SLURM job array (submitted through
a `JobArrays`, which the launcher provides); when every run is finished, fit and report
(scaling/report.py).

Sweep directory (``<runs_dir>/<name>``):

    sweep.yaml          the resolved sweep config
    plan.json           every point: budget, shape, N, D, FLOPs, passes over the data
    points/<i>.yaml     point i's pretrain config (an ordinary `lmforge pretrain` config)
    <run>/              point i's run directory (metrics.jsonl, checkpoints/, ...)
    logs/<run>.log      console output of local runs
    slurm/              array job scripts, logs and jobs.json
    report/             report.md, fit.json, points.csv and the figures

Resumable: a finished run (an eval row at its last step) is skipped, an interrupted one resumes
from its latest checkpoint (`resume=auto`). A run whose config differs from the one it was
started with is an error: change the sweep's name instead of its grid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Protocol

from omegaconf import OmegaConf

from lmforge.pretrain.config.schema import to_yaml
from lmforge.pretrain.core.durable import check_writable, replace_durable
from lmforge.pretrain.core.errors import ConfigurationError, DataError, LMForgeError
from lmforge.pretrain.core.launch_env import threads_per_rank
from lmforge.pretrain.forecast.curve import finished_runs, load_curve
from lmforge.pretrain.train.metrics import final_eval
from lmforge.scaling.config import ScalingConfig
from lmforge.scaling.early import brackets_best, judge, live_prediction
from lmforge.scaling.grid import Point, SweepGrid, describe_grid, make_grid
from lmforge.scaling.report import report_sweep
from lmforge.scaling.runs import Verdict, read_verdict, write_verdict
from lmforge.scaling.transfer import check_transfer, transfer, transfer_lines


def point_status(sweep_dir: str, point: Point) -> str:
    run_dir = os.path.join(sweep_dir, point.name)
    if final_eval(run_dir, point.steps) is not None:
        return "done"
    verdict = read_verdict(run_dir)
    if verdict is not None and verdict.stop:
        return "stopped"
    if os.path.isdir(os.path.join(run_dir, "checkpoints")):
        return "partial"
    return "pending"


def write_plan(cfg: ScalingConfig, plan: SweepGrid) -> None:
    """sweep.yaml, plan.json and points/<i>.yaml; refuse to change the config of a started run."""
    root = cfg.sweep_dir
    os.makedirs(os.path.join(root, "points"), exist_ok=True)
    for p in plan.points:
        path = os.path.join(root, "points", f"{p.index}.yaml")
        started = os.path.isdir(os.path.join(root, p.name))
        if started and os.path.isfile(path):
            # the same config, whatever the order its keys were written in
            if OmegaConf.to_container(OmegaConf.load(path)) != OmegaConf.to_container(
                OmegaConf.create(p.config)
            ):
                raise ConfigurationError(
                    f"run {root}/{p.name} was started with another config than the sweep "
                    f"now gives it ({path}); keep the sweep's grid and pretrain settings, or "
                    "start a new sweep with another name=..."
                )
        elif started:
            raise ConfigurationError(
                f"{root}/{p.name} exists but is not point {p.index} of this sweep; use another "
                "name=... for a different grid"
            )
        replace_durable(path, p.config.encode())
    replace_durable(os.path.join(root, "sweep.yaml"), to_yaml(cfg).encode())
    doc = {
        "points": [p.row() for p in plan.points],
        "skipped": plan.skipped,
        "train_tokens": plan.train_tokens,
        "batch_tokens": plan.batch_tokens,
    }
    replace_durable(os.path.join(root, "plan.json"), (json.dumps(doc, indent=1) + "\n").encode())


def _lmforge() -> list[str]:
    return [sys.executable, "-m", "launcher"]


def _judge_running(
    cfg: ScalingConfig, running: dict, judged: dict[str, Verdict], every: list[Point]
) -> None:
    """cfg.early_stop: judge each running point once it has trained that fraction of its
    steps (scaling/early.py), and stop it when it cannot be its budget's minimum."""
    root = cfg.sweep_dir
    for proc, (p, _, _) in running.items():
        if p.name in judged:
            continue
        run_dir = os.path.join(root, p.name)
        try:
            steps_done = int(load_curve(run_dir).steps[-1])
        except DataError:  # no rows yet
            continue
        if steps_done < cfg.early_stop * p.steps:
            continue
        pred = live_prediction(run_dir, finished_runs(root))
        if pred is None:
            continue
        siblings = {}
        for q in every:
            if q.budget != p.budget or q.name == p.name:
                continue
            if point_status(root, q) == "done":
                final = float(load_curve(os.path.join(root, q.name)).loss[-1])
                siblings[q.name] = (final, final)
            elif q.name in judged:
                siblings[q.name] = (judged[q.name].low, judged[q.name].high)
        live = [
            q
            for q in every
            if q.budget == p.budget and q.name != p.name and point_status(root, q) != "stopped"
        ]
        best = min(siblings, key=lambda n: siblings[n][1]) if siblings else None
        verdict = judge(
            p.name, p.budget, pred, siblings, p.flops / p.steps, others_left=len(live),
            brackets=brackets_best(p.params, {q.name: q.params for q in live}, best),
        )  # fmt: skip
        judged[p.name] = verdict
        print(f"early stop check: {verdict.describe()}")
        if verdict.stop:
            write_verdict(run_dir, verdict)
            proc.terminate()


def run_local(
    cfg: ScalingConfig, points: list[Point], every: list[Point] | None = None
) -> list[str]:
    """Train ``points`` here, `cfg.parallel` runs at a time (largest first, so that the last
    ones to finish are small), each run's ranks sharing the CPUs; return the names of those
    that failed. With cfg.early_stop, a point that cannot be its budget's minimum is stopped
    (``every``: all the sweep's points, its siblings among them)."""
    root = cfg.sweep_dir
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    env = dict(os.environ)
    # Tiny models run far faster on one thread each than on threads that contend for cores.
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(cfg.nproc * cfg.parallel)))
    queue = sorted(points, key=lambda p: -p.flops)
    running: dict[subprocess.Popen, tuple[Point, float, object]] = {}
    failed: list[str] = []
    finished = 0
    judged: dict[str, Verdict] = {}
    checked = 0.0
    try:
        while queue or running:
            while queue and len(running) < cfg.parallel:
                p = queue.pop(0)
                log = open(os.path.join(root, "logs", f"{p.name}.log"), "a")
                cmd = [*_lmforge(), "pretrain", os.path.join(root, "points", f"{p.index}.yaml")]
                cmd += ["resume=auto", "--nproc", str(cfg.nproc)]
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[proc] = (p, time.time(), log)
            time.sleep(0.2)
            if cfg.early_stop and time.time() - checked > 2:
                _judge_running(cfg, running, judged, every or points)
                checked = time.time()
            for proc in [q for q in running if q.poll() is not None]:
                p, start, log = running.pop(proc)
                log.close()
                finished += 1
                row = final_eval(os.path.join(root, p.name), p.steps)
                head = (
                    f"[{finished}/{len(points)}] {p.name}: N {p.params:,}, {p.steps} steps, "
                    f"{p.flops:.3g} FLOPs:"
                )
                if p.name in judged and judged[p.name].stop:
                    v = judged[p.name]
                    print(
                        f"{head} stopped early at step {v.step} ({v.flops_saved:.3g} FLOPs saved)"
                    )
                    continue
                if proc.returncode == 0 and row is not None:
                    print(f"{head} val_loss {row['val_loss']:.4f} in {time.time() - start:.0f} s")
                    continue
                failed.append(p.name)
                with open(log.name) as f:
                    last = [line.strip() for line in f if line.strip()][-1:]
                print(
                    f"{head} FAILED (exit {proc.returncode}): {last[0] if last else ''} "
                    f"[log {log.name}]"
                )
    except KeyboardInterrupt:
        for proc in running:  # each saves nothing more; resume=auto continues from checkpoints
            proc.terminate()
        for proc in running:
            proc.wait()
        raise
    return failed


# --- SLURM ---------------------------------------------------------------------------------------


class JobArrays(Protocol):
    """How a sweep reaches a batch scheduler (the launcher provides one for SLURM)."""

    def submit_array(
        self, *, command: list[str], job_name: str, indices: str, out_dir: str, dry_run: bool
    ) -> str:
        """Submit `lmforge <command>` as one job array over ``indices`` (``{index}`` in the
        command is the task's index), its script and logs in ``out_dir``; return the job id
        ("" with dry_run, which prints the batch script instead)."""
        ...

    def active(self, jobs: list[str]) -> list[str]:
        """Those of the array ``jobs`` that still have tasks waiting or running."""
        ...


def _jobs_file(cfg: ScalingConfig) -> str:
    return os.path.join(cfg.sweep_dir, "slurm", "jobs.json")


def active_jobs(cfg: ScalingConfig, jobs: JobArrays) -> list[str]:
    """The sweep's array jobs that still have tasks waiting or running."""
    path = _jobs_file(cfg)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        submitted = json.load(f)
    return jobs.active([str(job["job"]) for job in submitted])


def submit_array(
    cfg: ScalingConfig, points: list[Point], jobs: JobArrays, *, dry_run: bool = False
) -> str:
    """One job array over ``points`` (array index = point index)."""
    indices = ",".join(str(p.index) for p in points)
    if cfg.slurm_parallel:
        indices += f"%{cfg.slurm_parallel}"
    points_dir = os.path.abspath(os.path.join(cfg.sweep_dir, "points"))
    job = jobs.submit_array(
        command=["pretrain", os.path.join(points_dir, "{index}.yaml")],
        job_name=cfg.name,
        indices=indices,
        out_dir=os.path.join(cfg.sweep_dir, "slurm"),
        dry_run=dry_run,
    )
    if job:
        path = _jobs_file(cfg)
        submitted = []
        if os.path.isfile(path):
            with open(path) as f:
                submitted = json.load(f)
        submitted.append({"job": job, "points": [p.index for p in points], "time": time.time()})
        replace_durable(path, (json.dumps(submitted, indent=1) + "\n").encode())
    return job


def wait_for(cfg: ScalingConfig, jobs: JobArrays, *, poll: float = 5.0) -> None:
    while active_jobs(cfg, jobs):
        time.sleep(poll)


# --- the command -----------------------------------------------------------------------------


def sweep(
    cfg: ScalingConfig, *, dry_run: bool = False, wait: bool = False, jobs: JobArrays | None = None
) -> int:
    """Plan, train what is missing, then fit and report when the grid is complete; with
    launcher=slurm the runs are submitted through ``jobs``."""
    if cfg.launcher == "slurm" and jobs is None:
        raise ConfigurationError("launcher=slurm: give the sweep a JobArrays to submit through")
    check_transfer(cfg)
    plan = make_grid(cfg)
    root = cfg.sweep_dir
    status = {p.name: point_status(root, p) for p in plan.points}
    if dry_run:
        print(describe_grid(plan, status))
        todo = [p for p in plan.points if status[p.name] != "done"]
        if cfg.launcher == "slurm" and todo:  # the array job that would be submitted
            if os.path.isfile(os.path.join(root, "points", "0.yaml")):
                submit_array(cfg, todo, jobs, dry_run=True)  # its batch script
            else:
                print(
                    f"launcher=slurm: one job array of {len(todo)} task(s) (index = point), "
                    f"each `lmforge pretrain {root}/points/<index>.yaml resume=auto`"
                )
        return 0
    check_writable(root, "sweep directory ")
    write_plan(cfg, plan)
    todo = [p for p in plan.points if status[p.name] not in ("done", "stopped")]
    done = sum(status[p.name] == "done" for p in plan.points)
    stopped = sum(status[p.name] == "stopped" for p in plan.points)
    print(
        f"lmforge scaling sweep: {root}: {len(plan.points)} runs over {len(cfg.budgets)} budgets; "
        f"{done} finished, {sum(status[p.name] == 'partial' for p in todo)} to resume, "
        f"{sum(status[p.name] == 'pending' for p in todo)} to start"
        + (f", {stopped} stopped early" if stopped else "")
    )
    if todo and cfg.launcher == "slurm":
        active = active_jobs(cfg, jobs)
        if active:
            print(f"SLURM job(s) {', '.join(active)} of this sweep are still queued or running")
        else:
            submit_array(cfg, todo, jobs)
        if not wait:
            print("run this command again (or add --wait) to fit once the jobs are done")
            return 0
        wait_for(cfg, jobs)
        todo = [p for p in plan.points if point_status(root, p) not in ("done", "stopped")]
        if todo:
            raise LMForgeError(
                f"{len(todo)} run(s) did not finish (e.g. {todo[0].name}); see "
                f"{root}/slurm/ and run the sweep again to resume them"
            )
    elif todo:
        failed = run_local(cfg, todo, plan.points)
        if failed:
            raise LMForgeError(
                f"{len(failed)} run(s) failed ({', '.join(failed[:3])}); see {root}/logs/ and run "
                "the sweep again to resume them"
            )
    report_sweep(root)
    if cfg.transfer.finetune is not None:
        print("\n".join(["", *transfer_lines(transfer(cfg))]))
        print(f"transfer: {root}/transfer/ (transfer.json, transfer.png, a label curve per budget)")
    return 0
