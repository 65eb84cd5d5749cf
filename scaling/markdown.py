"""report.md: the fits, their checks and predictions as markdown tables, from the result of
`analyse` (scaling/analysis.py); and the report of finetuned runs alone."""

from __future__ import annotations

from scaling.config import SweepFitConfig
from scaling.plan import format_count, format_flops
from scaling.sources import Source


def _ci(ci: dict, key: str, fmt: str) -> str:
    if key not in ci:
        return ""
    lo, hi = ci[key]
    return f" [{format(lo, fmt)}, {format(hi, fmt)}]"


def render_markdown(src: Source, analysis: dict, figures: list[str], fit: SweepFitConfig) -> str:
    r = analysis["result"]
    level = f"{fit.level:.0%}"
    lines = [
        "# Scaling-law fit",
        "",
        f"Source: {r['source']}. N = "
        + {
            "non_embedding": "parameters without the input embedding table (the LM head "
            "counts; the N of C = 6·N·D)",
            "total": "all parameters",
        }.get(src.params, "as given in the CSV")
        + "; D = training tokens; C = training FLOPs (6·N plus attention per token, "
        "pretrain/flops.py, for runs; as given for a CSV); loss = final validation loss "
        "(nats/token).",
        "",
    ]
    b = r["budgets"]
    lines += [
        f"Compute budgets: {len(b['found'])}"
        + (f" ({', '.join(format_flops(c) for c in b['found'])})" if b["found"] else "")
        + f"; {b['rule']}"
        + (
            f"; {b['points_in_none']} points are in none and enter the L(N, D) fit only."
            if b["points_in_none"]
            else "."
        ),
        "",
    ]
    if src.missing:
        lines += [f"Runs without a final loss (left out): {', '.join(src.missing)}.", ""]
    if src.epochs is not None and src.epochs.max() > 1:
        rep = int((src.epochs > 1).sum())
        lines += [
            f"Data repetition: {rep} of {len(src.epochs)} runs read the training data more than "
            f"once (at most {src.epochs.max():.2f} passes); see points.csv.",
            "",
        ]
    if fit.holdout:
        lines += [
            "Held out of every fit and predicted: "
            + ", ".join(format_flops(c) for c in fit.holdout)
            + " FLOPs.",
            "",
        ]
    checks = r["holdout"]
    if checks:
        lines += [
            "## Prediction of the held-out budgets",
            "",
            "| budget | measured best loss (run) | E + A·C^-α | error | A·C^-α | error | "
            "L(N, D) optimum | error | N* of L(N, D) | N_opt of the IsoFLOP fit | "
            "measured best N | its parabola's N_opt |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in checks:
            lines.append(
                f"| {format_flops(c['C'])} | {c['measured_best']:.4f} ({c['measured_run']}) | "
                + "".join(
                    f"{c[k + '_loss']:.4f} | {c[k + '_error']:+.2%} | "
                    if k + "_loss" in c
                    else "— | — | "
                    for k in ("frontier", "power")
                )
                + (
                    f"{c['surface_loss']:.4f} | {c['surface_error']:+.2%} | "
                    f"{format_count(c['surface_N'])} | "
                    if "surface_loss" in c
                    else "— | — | — | "
                )
                + (f"{format_count(c['alloc_N'])} | " if "alloc_N" in c else "— | ")
                + f"{format_count(c['measured_N'])} | "
                + (f"{format_count(c['parabola_N'])} |" if "parabola_N" in c else "— |")
            )
        lines += [""]
        if "frontier_choice" in r:
            form = "E + A·C^-α" if r["frontier_choice"] == "frontier" else "A·C^-α"
            lines += [
                f"The prediction of the best loss is the frontier {form}: "
                + ", ".join(
                    f"{format_flops(c['C'])}: {c['best_loss']:.4f} ({c['best_error']:+.2%})"
                    for c in checks
                    if "best_loss" in c
                )
                + " (the form is chosen on the fitted budgets alone; see the notes).",
                "",
            ]
        if any("measured_parabola" in c for c in checks):
            lines += [
                "The held-out budgets' own parabola minima: "
                + ", ".join(
                    f"{format_flops(c['C'])}: {c['measured_parabola']:.4f}"
                    for c in checks
                    if "measured_parabola" in c
                )
                + ".",
                "",
            ]
    if "surface" in r:
        s = r["surface"]
        lines += [
            "## L(N, D) = E + A / N^α + B / D^β",
            "",
            f"Huber (δ = {fit.huber_delta:g}) on log-loss, L-BFGS from a grid of starts; "
            f"{s['n_points']} points"
            + (
                f", {len(s['excluded'])} highest-loss excluded: {', '.join(s['excluded'])}"
                if s["excluded"]
                else ", none excluded"
            )
            + (f"; {level} bootstrap intervals ({fit.bootstrap} resamples)." if s["ci"] else "."),
            "",
            "| parameter | value | interval |",
            "|---|---|---|",
        ]
        for k, fmt in (
            ("E", ".4g"),
            ("A", ".4g"),
            ("B", ".4g"),
            ("alpha", ".4f"),
            ("beta", ".4f"),
            ("a", ".4f"),
            ("b", ".4f"),
        ):
            lines.append(f"| {k} | {format(s[k], fmt)} | {_ci(s['ci'], k, fmt).strip()} |")
        lines += ["", "a = β/(α+β) (N* ∝ C^a), b = α/(α+β) (D* ∝ C^b).", ""]
    if "power_law" in r:
        pw = r["power_law"]
        lines += [
            "## Compute frontier with E = 0: L(C) = A · C^-α",
            "",
            f"Least squares in log-log through the same minima: A = {pw['A']:.4g}"
            f"{_ci(pw['ci'], 'A', '.4g')}, α = {pw['alpha']:.4f}{_ci(pw['ci'], 'alpha', '.4f')}.",
            "",
        ]
    if "frontier" in r:
        fr = r["frontier"]
        lines += [
            "## Compute frontier L(C) = E + A · C^-α",
            "",
            f"Through the IsoFLOP minima of {fr['n_points']} budgets: E = {fr['E']:.4g}"
            f"{_ci(fr['ci'], 'E', '.4g')}, A = {fr['A']:.4g}{_ci(fr['ci'], 'A', '.4g')}, "
            f"α = {fr['alpha']:.4f}{_ci(fr['ci'], 'alpha', '.4f')}.",
            "",
        ]
    if r["minima"]:
        lines += [
            "## IsoFLOP minima (parabola in ln N per budget)",
            "",
            "| budget | runs | N_opt | D_opt | D/N | loss at minimum | |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in r["minima"]:
            flag = (
                "held out"
                if m["held_out"]
                else ("outside the sizes trained" if not m["inside"] else "")
            )
            lines.append(
                f"| {format_flops(m['C'])} | {m['n']} | {format_count(m['N_opt'])} | "
                f"{format_count(m['D_opt'])} | {m['D_opt'] / m['N_opt']:.1f} | {m['L_opt']:.4f} "
                f"| {flag} |"
            )
        lines += [""]
    if "allocation" in r:
        a = r["allocation"]
        lines += [
            f"N_opt ∝ C^a with a = {a['a']:.3f}{_ci(a['ci'], 'a', '.3f')}; D_opt ∝ C^b with "
            f"b = {a['b']:.3f}{_ci(a['ci'], 'b', '.3f')} ({a['n_budgets']} budgets).",
            "",
        ]
    if r["targets"]:
        lines += [
            "## Predictions for target budgets",
            "",
            "| C | N* (surface) | D* (surface) | D*/N* | loss (surface) | loss (frontier) | "
            "N_opt (IsoFLOP) | D_opt (IsoFLOP) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in r["targets"]:
            lines.append(
                f"| {format_flops(t['C'])} | "
                + (
                    f"{format_count(t['surface_N'])} | {format_count(t['surface_D'])} | "
                    f"{t['surface_D'] / t['surface_N']:.1f} | {t['surface_loss']:.4f} | "
                    if "surface_N" in t
                    else "— | — | — | — | "
                )
                + (f"{t['best_loss']:.4f} | " if "best_loss" in t else "— | ")
                + (
                    f"{format_count(t['alloc_N'])} | {format_count(t['alloc_D'])} |"
                    if "alloc_N" in t
                    else "— | — |"
                )
            )
        lines += [""]
    if r["finetune"]:
        lines += _finetune_table(r["finetune"])
    if r["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)


def _finetune_table(rows: list[dict]) -> list[str]:
    lines = [
        "## Finetuned runs: downstream metric vs total compute",
        "",
        "The metric is the evaluation of the run's model: its checkpoint marked best "
        "(early_stopping.keep_best), else its last; finetuning FLOPs are those up to that step.",
        "",
        "| run | metric | value | step | pretraining FLOPs | finetuning FLOPs | total |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in rows:
        lines.append(
            f"| {f['run']}{' (from scratch)' if f['from_scratch'] else ''} | {f['metric']} "
            f"| {f['value']:.4f} | {f['step']} | {f['pretrain_flops']:.3g} | "
            f"{f['finetune_flops']:.3g} | "
            f"{f['total_flops']:.3g} |"
        )
    return lines + [""]


def render_finetune_markdown(rows: list[dict], figure: str) -> str:
    """report.md of `lmforge scaling fit --finetune RUN ...` without points to fit."""
    return "\n".join(
        ["# Finetuning compute", "", *_finetune_table(rows), f"![{figure}]({figure})", ""]
    )
