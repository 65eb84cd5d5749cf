"""report.md: the fits, their checks and predictions as markdown tables, from the result of
`analyse` (scaling/analysis.py); and the report of finetuned runs alone."""

from __future__ import annotations

from lmforge.scaling.config import SweepFitConfig
from lmforge.scaling.forms import LOSS_FORMS, SIZE_FORMS
from lmforge.scaling.grid import format_count, format_flops
from lmforge.scaling.sources import PointSet


def _ci(ci: dict, key: str, fmt: str) -> str:
    if key not in ci:
        return ""
    lo, hi = ci[key]
    return f" [{format(lo, fmt)}, {format(hi, fmt)}]"


def _interval(iv, fmt: str) -> str:
    if not iv:
        return "—"
    if fmt == "count":
        return f"[{format_count(iv[0])}, {format_count(iv[1])}]"
    return f"[{format(iv[0], fmt)}, {format(iv[1], fmt)}]"


def _form_tables(r: dict) -> list[str]:
    """The backtest: each form's error predicting each fitted budget from those below it."""
    bt = r["backtest"]
    if not bt["steps"]:
        return []
    lines = [
        "## Which form predicts: the backtest",
        "",
        "Each form fitted to the budgets below a fitted budget predicts that budget's minimum "
        "(the held-out budgets are not used). Score: mean |ln(predicted / measured)| over the "
        "budgets every form predicted; the lowest predicts.",
        "",
    ]
    for kind, forms, chosen, what in (
        ("loss", LOSS_FORMS, r["choice"], "loss"),
        ("size", SIZE_FORMS, r["choice_size"], "N_opt"),
    ):
        lines += [
            f"| form ({what}) | "
            + " | ".join(format_flops(s["C"]) for s in bt["steps"])
            + " | score | |",
            "|---|" + "---|" * (len(bt["steps"]) + 2),
        ]
        for form, label in forms.items():
            cells = [f"{s[kind][form]:+.2%}" if form in s[kind] else "—" for s in bt["steps"]]
            score = bt[f"{kind}_score"].get(form)
            lines.append(
                f"| {label} | "
                + " | ".join(cells)
                + f" | {'—' if score is None else f'{score:.4f}'} | "
                + ("chosen |" if form == chosen else " |")
            )
        lines += [""]
    return lines


def render_markdown(src: PointSet, analysis: dict, figures: list[str], fit: SweepFitConfig) -> str:
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
        "pretrain/model/flops.py, for runs; as given for a CSV); loss = final validation loss "
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
    if src.stopped:
        saved = sum(v.flops_saved for v in src.stopped)
        lines += [
            f"Stopped early (`early_stop`), {saved:.3g} FLOPs saved: "
            + "; ".join(v.describe() for v in src.stopped)
            + ".",
            "",
        ]
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
    lines += _form_tables(r)
    checks = r["holdout"]
    if checks:
        lines += [
            "## Prediction of the held-out budgets",
            "",
            f"Each form fitted without the held-out budgets; intervals: {level} bootstrap. "
            "**Bold**: the form the backtest chose.",
            "",
            "| budget | measured best loss (run) | its minimum | form | predicted | interval | "
            "error |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in checks:
            for form, label in LOSS_FORMS.items():
                if form not in c["loss"]:
                    continue
                bold = "**" if form == r["choice"] else ""
                minimum = f"{c['measured_minimum']:.4f}" if "measured_minimum" in c else "—"
                lines.append(
                    f"| {format_flops(c['C'])} | {c['measured_best']:.4f} ({c['measured_run']}) "
                    f"| {minimum} | {bold}{label}{bold} | {bold}{c['loss'][form]:.4f}{bold} | "
                    f"{_interval(c['loss_interval'].get(form), '.4f')} | "
                    f"{bold}{c['error'][form]:+.2%}{bold} |"
                )
        lines += [""]
        sized = [c for c in checks if "best_N" in c]
        if sized:
            lines += [
                "Loss-optimal N at the held-out budgets: "
                + "; ".join(
                    f"{format_flops(c['C'])}: predicted {format_count(c['best_N'])} "
                    f"({SIZE_FORMS[r['choice_size']]}), measured best run "
                    f"{format_count(c['measured_N'])}"
                    + (f", its minimum {format_count(c['minimum_N'])}" if "minimum_N" in c else "")
                    for c in sized
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
        method = r.get("minima_method") or "parabola"
        lines += [
            "## Budget minima",
            "",
            f"The frontier and the allocation are fitted through the {method} minima "
            "(`fit.minima`): profile = the budget's runs fitted by c0 + c1·N^-α + c2·D^-β with "
            "α, β of L(N, D), which is not symmetric in ln N as a parabola is.",
            "",
            "| budget | runs | parabola N_opt | parabola loss | profile N_opt | profile loss | "
            "D/N | |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m in r["minima"]:
            p, q = m["parabola"], m.get("profile")
            used = q if (q is not None and method == "profile") else p
            flag = "; ".join(
                x
                for x in (
                    "held out" if m["held_out"] else "",
                    "outside the sizes trained" if not used["inside"] else "",
                    m["flag"],
                )
                if x
            )
            lines.append(
                f"| {format_flops(m['C'])} | {m['n']} | {format_count(p['N_opt'])} | "
                f"{p['L_opt']:.4f} | "
                + (f"{format_count(q['N_opt'])} | {q['L_opt']:.4f} | " if q else "— | — | ")
                + f"{used['D_opt'] / used['N_opt']:.1f} | {flag} |"
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
        chosen = LOSS_FORMS[r["choice"]]
        lines += [
            "## Predictions for target budgets",
            "",
            f"Loss by the chosen form ({chosen}), N* by {SIZE_FORMS[r['choice_size']]} "
            f"(D* = C / FLOPs per token of N*); {level} bootstrap intervals.",
            "",
            "| C | loss | interval | N* | interval | D* | D*/N* | "
            + " | ".join(LOSS_FORMS.values())
            + " |",
            "|---|---|---|---|---|---|---|" + "---|" * len(LOSS_FORMS),
        ]
        for t in r["targets"]:
            row = f"| {format_flops(t['C'])} | "
            row += (
                f"{t['best_loss']:.4f} | {_interval(t['best_interval'], '.4f')} | "
                if "best_loss" in t
                else "— | — | "
            )
            row += (
                f"{format_count(t['best_N'])} | {_interval(t['best_N_interval'], 'count')} | "
                f"{format_count(t['best_D'])} | {t['best_D'] / t['best_N']:.1f} | "
                if "best_N" in t
                else "— | — | — | — | "
            )
            row += " | ".join(f"{t['loss'][f]:.4f}" if f in t["loss"] else "—" for f in LOSS_FORMS)
            lines.append(row + " |")
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
