"""The report's figures (matplotlib, written as PNG files next to report.md):

- loss_vs_flops.png: every run's final loss against its compute, coloured by N, the IsoFLOP
  minima, the fitted frontier L(C) and the held-out budgets with their predictions;
- isoflop.png: loss against N per budget with each budget's parabola, and N_opt(C), D_opt(C)
  with their power laws;
- surface.png: the fitted L(N, D) along each budget (D = C / FLOPs-per-token(N)) against the
  points, with the compute-optimal path;
- residuals.png: log(measured / fitted) of every point for L(N, D), and of the minima for L(C);
- finetune.png (with --finetune runs): downstream metric against pretrain + finetune compute.

Colour stands for the budget on a colorbar (any number of budgets stays readable), and each
figure's legend sits below its axes, outside them: no legend covers data.
"""

from __future__ import annotations

import os

import numpy as np

from lmforge.scaling.grid import format_flops


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(ncols: int, size: tuple[float, float]):
    """A figure laid out by matplotlib's constrained layout, which keeps room for what sits
    outside the axes (colorbars, the legend below)."""
    return _pyplot().subplots(1, ncols, figsize=size, layout="constrained")


def _legend(fig, axes, *, before=(), after=(), ncols: int = 2) -> None:
    """The entries of `axes` (each label once), between the entries `before` and `after`, as
    one legend below the axes, outside them."""
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    handles = [*before, *handles, *after]
    labels = [*(h.get_label() for h in before), *labels, *(h.get_label() for h in after)]
    if handles:
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncols=min(ncols, len(handles)),
            fontsize=7,
            frameon=False,
        )


def _marker(marker: str, label: str, **kw):
    """A legend entry for a kind of mark (its colour is explained elsewhere)."""
    from matplotlib.lines import Line2D

    style = {"color": "tab:gray", "markersize": 6, **kw}
    return Line2D([], [], linestyle="none", marker=marker, label=label, **style)


def _budget_scale(budgets: list[float]):
    """Each budget's colour (by log10 C) and the colorbar's mappable."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    cmap = ListedColormap(_pyplot().get_cmap("plasma")(np.linspace(0.0, 0.85, 256)))
    logs = np.log10(budgets) if budgets else np.array([0.0])
    lo, hi = float(logs.min()), float(logs.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    norm = Normalize(lo, hi)
    colours = {c: cmap(norm(np.log10(c))) for c in budgets}
    return colours, ScalarMappable(norm=norm, cmap=cmap)


def _budget_colorbar(fig, mappable, ax, budgets: list[float]) -> None:
    """A colorbar of the budgets: a tick at each, labelled where the labels do not crowd."""
    bar = fig.colorbar(mappable, ax=ax, label="compute budget C (FLOPs)")
    logs = [float(np.log10(c)) for c in budgets]
    lo, hi = mappable.norm.vmin, mappable.norm.vmax
    shown: list[float] = []
    for x in logs:
        if not shown or x - shown[-1] >= (hi - lo) / 12:
            shown.append(x)
    bar.set_ticks(shown, labels=[format_flops(10**x) for x in shown])
    bar.ax.set_yticks(logs, minor=True)
    bar.ax.tick_params(labelsize=7)


def _save(fig, out: str, name: str) -> str:
    from matplotlib.ticker import NullFormatter

    for ax in fig.axes:  # decades only: minor labels on a log axis overlap
        if ax.get_xscale() == "log":
            ax.xaxis.set_minor_formatter(NullFormatter())
    fig.savefig(os.path.join(out, name), dpi=110)
    _pyplot().close(fig)
    return name


def plot_all(src, analysis: dict, out: str, *, finetune: list[dict]) -> list[str]:
    """Write the report's figures into `out`; return their file names."""
    return [_save(fig, out, name) for name, fig in build_figures(src, analysis, finetune)]


def build_figures(src, analysis: dict, finetune: list[dict]) -> list[tuple[str, object]]:
    """The report's figures as (file name, matplotlib figure), not yet written."""
    r, o = analysis["result"], analysis["objects"]
    pts, budgets, held = src.points, o["budgets"], o["held"]
    fpt = src.fpt or (lambda n: 6.0 * n)
    ubudgets = sorted(set(budgets[np.isfinite(budgets)].tolist()))
    colours, budget_scale = _budget_scale(ubudgets)
    figures = []

    # loss vs FLOPs with the frontier
    fig, ax = _figure(1, (7, 5.6))
    sc = ax.scatter(
        pts.C[~held],
        pts.L[~held],
        c=np.log10(pts.N[~held]),
        cmap="viridis",
        s=28,
        label="runs (fitted)",
    )
    if held.any():
        ax.scatter(
            pts.C[held],
            pts.L[held],
            c=np.log10(pts.N[held]),
            cmap="viridis",
            s=40,
            marker="D",
            edgecolors="red",
            linewidths=1.2,
            label="runs (held out)",
        )
    fig.colorbar(sc, ax=ax, label="log10 N")
    if o["minima"]:
        ax.scatter(
            [m.C for m in o["minima"]],
            [m.L_opt for m in o["minima"]],
            marker="*",
            s=140,
            c="black",
            label="IsoFLOP minima",
        )
    cmax = max([pts.C.max()] + [t["C"] for t in r["targets"]])
    grid = np.geomspace(pts.C.min() / 1.5, cmax * 1.5, 200)
    if "frontier" in o:
        fr = o["frontier"]
        ax.plot(
            grid,
            fr.predict(grid),
            "k--",
            lw=1.2,
            label=f"L(C) = {fr.E:.2f} + {fr.A:.3g}·C^-{fr.alpha:.3f}",
        )
    if "power" in o:
        pw = o["power"]
        ax.plot(
            grid,
            pw.predict(grid),
            ":",
            color="tab:gray",
            lw=1.2,
            label=f"L(C) = {pw.A:.3g}·C^-{pw.alpha:.3f} (E = 0)",
        )
    if "surface" in o:
        opt = [o["surface"].optimal(c, flops_per_token=src.fpt)[2] for c in grid]
        ax.plot(grid, opt, color="tab:orange", lw=1.2, label="L(N, D) at its optimum N*")
    for c in r["holdout"]:
        for form, m, col in (
            ("frontier", "x", "black"),
            ("power", "x", "tab:gray"),
            ("surface", "+", "tab:orange"),
        ):
            if form in c["loss"]:
                size = 200 if form == r["choice"] else 120
                ax.scatter([c["C"]], [c["loss"][form]], marker=m, s=size, c=col, zorder=5)
    ax.set(
        xscale="log",
        xlabel="training FLOPs C",
        ylabel="final validation loss",
        title="loss vs compute",
    )
    held_marks = [_marker("x", "held-out predictions (x: L(C), +: L(N, D); largest: chosen)")]
    _legend(fig, (ax,), after=held_marks if r["holdout"] else [])
    figures.append(("loss_vs_flops.png", fig))

    # IsoFLOP curves and the allocation
    fig, (ax1, ax2) = _figure(2, (12, 5.2))
    for c in ubudgets:
        idx = np.flatnonzero(budgets == c)
        ax1.scatter(
            pts.N[idx],
            pts.L[idx],
            color=colours[c],
            s=24,
            marker="D" if held[idx].any() else "o",
        )
        m = next((m for m in o["parabolas"] if m.C == c), None)
        if m is not None:
            x = np.linspace(np.log(pts.N[idx].min()) - 0.3, np.log(pts.N[idx].max()) + 0.3, 80)
            ax1.plot(
                np.exp(x),
                m.L_opt + m.curvature * (x - np.log(m.N_opt)) ** 2,
                color=colours[c],
                lw=1,
            )
        u = next((u for u in o["minima"] + o["held_minima"] if u.C == c), None)
        if u is not None:
            ax1.scatter(
                [u.N_opt],
                [u.L_opt],
                color=colours[c],
                marker="*",
                s=110,
                edgecolors="black",
                linewidths=0.5,
            )
    marks = [
        _marker("o", "run (colour: its budget)"),
        *([_marker("D", "run of a held-out budget")] if held.any() else []),
    ]
    method = r.get("minima_method") or "parabola"
    minimum = _marker(
        "*", f"{method} minimum (lines: parabolas)", markersize=9, markeredgecolor="black"
    )
    ax1.set(
        xscale="log",
        xlabel="N (parameters)",
        ylabel="final validation loss",
        title=f"IsoFLOP profiles ({len(ubudgets)} budgets)",
    )
    if ubudgets:
        _budget_colorbar(fig, budget_scale, ax1, ubudgets)
    every = sorted(o["minima"] + o["held_minima"], key=lambda m: m.C)
    if every:
        cs = np.array([m.C for m in every])
        out_of_fit = np.array([c in r["holdout_budgets"] for c in cs], dtype=bool)
        for values, colour, name in (
            (np.array([m.N_opt for m in every]), "tab:blue", "N_opt"),
            (np.array([m.D_opt for m in every]), "tab:green", "D_opt"),
        ):
            ax2.scatter(cs[~out_of_fit], values[~out_of_fit], color=colour, label=name)
            if out_of_fit.any():
                ax2.scatter(
                    cs[out_of_fit],
                    values[out_of_fit],
                    facecolors="none",
                    edgecolors=colour,
                    s=60,
                    label=f"{name} (held out)",
                )
        if "allocation" in o:
            al = o["allocation"]
            g = np.geomspace(cs.min() / 2, cmax * 2, 50)
            ax2.plot(g, al.N_opt(g), color="tab:blue", lw=1, label=f"N_opt ∝ C^{al.a:.2f}")
            ax2.plot(g, al.D_opt(g), color="tab:green", lw=1, label=f"D_opt ∝ C^{al.b:.2f}")
        ax2.set(
            xscale="log",
            yscale="log",
            xlabel="training FLOPs C",
            ylabel="parameters / tokens",
            title="compute-optimal allocation",
        )
    else:
        ax2.set_axis_off()
    _legend(fig, (ax1, ax2), before=[*marks, minimum], ncols=4)
    figures.append(("isoflop.png", fig))

    if "surface" in o:
        s = o["surface"]
        fig, ax = _figure(1, (7, 5.4))
        n_grid = np.geomspace(pts.N.min() / 2, pts.N.max() * 2, 120)
        for c in ubudgets:
            idx = np.flatnonzero(budgets == c)
            d = np.array([c / fpt(n) for n in n_grid])
            ax.plot(n_grid, s.predict(n_grid, d), color=colours[c], lw=1)
            ax.scatter(
                pts.N[idx],
                pts.L[idx],
                color=colours[c],
                s=24,
                marker="D" if held[idx].any() else "o",
            )
        ax.plot([], [], color="tab:gray", lw=1, label="L(N, D) along each budget")
        path = [s.optimal(c, flops_per_token=src.fpt) for c in ubudgets]
        ax.plot([p[0] for p in path], [p[2] for p in path], "k:", lw=1.2, label="optimum N*")
        ax.set(
            xscale="log",
            xlabel="N (parameters)",
            ylabel="final validation loss",
            ylim=(pts.L.min() - 0.1, pts.L.max() + 0.15),
            title=f"L(N, D) = {s.E:.2f} + {s.A:.3g}/N^{s.alpha:.3f} + {s.B:.3g}/D^{s.beta:.3f}",
        )
        if ubudgets:
            _budget_colorbar(fig, budget_scale, ax, ubudgets)
        _legend(fig, (ax,), before=marks, ncols=4)
        figures.append(("surface.png", fig))

    if "surface" in o or "frontier" in o:
        fig, (ax1, ax2) = _figure(2, (12, 4.6))
        if "surface" in o:
            res = np.log(pts.L / o["surface"].predict(pts.N, pts.D))
            sc = ax1.scatter(pts.C, res, c=np.log10(pts.N), cmap="viridis", s=24)
            if held.any():
                ax1.scatter(
                    pts.C[held],
                    res[held],
                    facecolors="none",
                    edgecolors="red",
                    s=70,
                    label="held out",
                )
            fig.colorbar(sc, ax=ax1, label="log10 N")
        ax1.axhline(0, color="gray", lw=0.8)
        ax1.set(
            xscale="log",
            xlabel="training FLOPs C",
            ylabel="log(measured / fitted)",
            title="L(N, D) residuals",
        )
        if "frontier" in o and o["minima"]:
            cs = np.array([m.C for m in o["minima"]])
            lo = np.array([m.L_opt for m in o["minima"]])
            ax2.scatter(cs, np.log(lo / o["frontier"].predict(cs)), color="black", marker="*")
        ax2.axhline(0, color="gray", lw=0.8)
        ax2.set(
            xscale="log",
            xlabel="training FLOPs C",
            ylabel="log(minimum / fitted)",
            title="L(C) residuals at the IsoFLOP minima",
        )
        _legend(fig, (ax1, ax2))
        figures.append(("residuals.png", fig))

    if finetune:
        figures.append(("finetune.png", finetune_figure(finetune)))
    return figures


def finetune_figure(rows: list[dict]):
    fig, ax = _figure(1, (7, 4.5))
    for r in rows:
        ax.scatter(
            [r["total_flops"]],
            [r["value"]],
            marker="s" if r["from_scratch"] else "o",
            color="tab:gray" if r["from_scratch"] else "tab:blue",
        )
        ax.annotate(
            r["run"],
            (r["total_flops"], r["value"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    metrics = sorted({r["metric"] for r in rows})
    ax.set(
        xscale="log",
        xlabel="total FLOPs (pretraining + finetuning)",
        ylabel=" / ".join(metrics),
        title="downstream metric vs total compute (squares: from scratch)",
    )
    return fig


def plot_finetune(rows: list[dict], out: str) -> str:
    return _save(finetune_figure(rows), out, "finetune.png")
