"""The parts of a run's forecast that the command line adds before any worker starts: the
forecast of `--dry-run`, the law of `--law FIT.json|SWEEP_DIR` and the measured steps of
`--probe` (pretrain/forecast/ has the forecast itself)."""

from __future__ import annotations

import json
import os

from lmforge.pretrain.core.errors import ConfigurationError
from lmforge.pretrain.forecast.forecast import to_level


def dry_run_forecast(work, plan, *, nproc: int) -> dict:
    """The forecast the run would make before its first step (the matmul peak measured here with
    the threads one of its ranks will have), written to <run>/forecast.json marked as a dry run
    (the run replaces it)."""
    import torch

    from lmforge.pretrain.core.launch_env import threads_per_rank
    from lmforge.pretrain.forecast.forecast import make_forecast, write_forecast
    from lmforge.pretrain.model.flops import flops_per_token, peak_flops
    from lmforge.pretrain.parallel.common import DTYPES, resolve_precision, use_cuda
    from lmforge.pretrain.parallel.memory import current_memory
    from lmforge.pretrain.run.session import forecast_facts

    cfg = work.cfg
    device = torch.device("cuda" if use_cuda() else "cpu")
    threads = int(os.environ.get("OMP_NUM_THREADS") or threads_per_rank(nproc))
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    precision = resolve_precision(cfg.train.precision, device_type=device.type)
    try:
        peak = peak_flops(
            device, DTYPES.get(precision, torch.bfloat16), override=cfg.train.peak_flops
        )
    finally:
        torch.set_num_threads(before)
    facts = forecast_facts(
        work,
        plan,
        device=device,
        peak=peak,
        # the whole model's (the run counts only what trains: a task head, LoRA)
        flops_per_token=flops_per_token(cfg.model, work.seq_len),
        runtime_bytes=current_memory(device),
        from_step=0,
        threads=threads,
    )
    fc = make_forecast(facts, cfg.forecast, dry_run=True)
    write_forecast(cfg.run_dir, fc)
    return fc


def law_overrides(path: str, work) -> list[str]:
    """``forecast.law.*`` overrides for the prepared run ``work`` from the fit at ``path`` (a
    sweep directory, its report/fit.json, a points CSV or run directories, as `lmforge plan
    --fit` takes them): the loss the fit's chosen form predicts at the run's compute, moved by
    the L(N, D) surface from the law's N* and D* to the run's own N and D where the fit has
    one; its interval brought to 80%."""
    from lmforge.pretrain.model.flops import flops_per_token
    from lmforge.scaling.grid import fit_params, format_flops
    from lmforge.scaling.planner import fitted_law

    cfg = work.cfg
    if os.path.isfile(path) and os.path.basename(path) == "fit.json":
        path = os.path.dirname(os.path.dirname(os.path.abspath(path)))  # <sweep>/report/fit.json
    if not os.path.exists(path):
        raise ConfigurationError(
            f"--law {path}: no such file or directory; give a sweep (runs/<sweep>), its "
            "report/fit.json, a points CSV or run directories"
        )
    if not (os.path.isdir(path) or path.endswith((".csv", ".CSV"))):
        raise ConfigurationError(
            f"--law {path}: not a sweep (runs/<sweep>), its report/fit.json, a points CSV or a "
            "run directory"
        )
    tokens = work.total_steps() * (work.tokens_per_step or 0)
    if not tokens:
        raise ConfigurationError(
            f"--law {path}: a scaling law predicts pretraining losses; `{work.command}` runs "
            "have no fixed tokens per step (drop --law)"
        )
    compute = tokens * flops_per_token(cfg.model, work.seq_len)
    law, sweep_cfg, level = fitted_law(path, compute)
    if law.loss is None or not law.loss_interval:
        raise ConfigurationError(f"--law {path}: the fit predicts no loss at {compute:.3g} FLOPs")
    loss, (low, high) = law.loss, law.loss_interval
    moved = ""
    if law.surface is not None:
        n = fit_params(cfg.model, sweep_cfg.fit.params if sweep_cfg else "non_embedding")
        shift = float(law.surface.predict(n, tokens) - law.surface.predict(law.N, law.D))
        loss, low, high = loss + shift, low + shift, high + shift
        moved = f", {shift:+.4f} by L(N, D) for this run's N and D"
    low, high = to_level(loss, low, high, level)
    source = f"{law.source} at {format_flops(compute)} FLOPs{moved}"
    return [
        f"forecast.law.loss={loss:.6g}",
        f"forecast.law.low={low:.6g}",
        f"forecast.law.high={high:.6g}",
        f"forecast.law.source={json.dumps(source)}",
    ]


def probe_into_ledger(command: str, config: list[str], *, nproc: int, steps: int, cfg) -> str:
    """Run ``steps`` real steps of this run (pretrain/forecast/ledger.py: ``probe_steps``) and
    add what they measured to the run's ledger as a probe; return a line saying so."""
    from lmforge.pretrain.forecast.ledger import append_ledger, ledger_path, probe_steps

    row = probe_steps(command, config, nproc=nproc, steps=steps, what="--probe")
    row["run"] = f"probe of {cfg.name}"
    os.makedirs(cfg.runs_dir, exist_ok=True)
    append_ledger(ledger_path(cfg.runs_dir), row)
    return (
        f"probe: {steps} steps of {row['step_seconds']:.3g} s each (median after the first), "
        f"added to {ledger_path(cfg.runs_dir)}"
    )
