"""The report's figures, drawn with matplotlib's object API (no pyplot state, no display).

* :func:`learning_curves`: train/val loss and accuracy per epoch; per variant the mean over
  seeds as a line and the min-max range over seeds as a band.
* :func:`paired_seeds`: each seed's accuracy per variant, the seeds joined by lines (the
  pairing the comparisons use), the mean as a black tick.
* :func:`ladder_figures`: each comparison's effect with its interval at every rung of a budget
  ladder (:mod:`normlab.report.budgets`), filled where claimed.
* :func:`mechanism_figures`: whatever :func:`normlab.probes.plots.probe_figures` draws from
  the runs' probe metrics (an empty list when that module or the metrics are absent).
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from normlab.report.analysis import METRICS, Analysis
from normlab.report.budgets import Ladder
from normlab.report.data import RunRecord, StudyData

PANELS = (
    ("train/loss", "train loss"),
    ("val/loss", "validation loss"),
    ("train/acc", "train accuracy"),
    ("val/acc", "validation accuracy"),
)
_COLORS = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
)


def variant_colors(variants: Sequence[str]) -> dict[str, str]:
    """A stable colour per variant (the same in every figure of a report)."""
    return {v: _COLORS[i % len(_COLORS)] for i, v in enumerate(variants)}


def _curve(
    runs: Sequence[RunRecord], key: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, and the mean / min / max over runs of ``key`` at each epoch (finite values)."""
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for row in run.rows:
            value = row.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                by_epoch.setdefault(int(row["epoch"]), []).append(float(value))
    epochs = np.asarray(sorted(by_epoch), dtype=np.int64)
    mean = np.asarray([np.mean(by_epoch[e]) for e in epochs])
    low = np.asarray([np.min(by_epoch[e]) for e in epochs])
    high = np.asarray([np.max(by_epoch[e]) for e in epochs])
    return epochs, mean, low, high


def learning_curves(study: StudyData, group: str | None) -> Figure:
    """2 x 2 panels of training curves for the variants of ``group``."""
    variants = study.spec.variant_names
    colors = variant_colors(variants)
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        for variant in variants:
            runs = [r for r in study.arm_runs(group, variant) if r.rows]
            if not runs:
                continue
            epochs, mean, low, high = _curve(runs, key)
            if epochs.size == 0:
                continue
            label = f"{variant} (n={len(runs)})"
            ax.plot(
                epochs,
                mean,
                color=colors[variant],
                label=label,
                linewidth=1.8,
                marker="o" if epochs.size < 4 else None,
            )
            if len(runs) > 1:
                ax.fill_between(epochs, low, high, color=colors[variant], alpha=0.2, linewidth=0)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        if key.endswith("/loss"):
            ymin, ymax = ax.get_ylim()
            if ymax > 0 and ymin > 0 and ymax / ymin > 20:
                ax.set_yscale("log")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5))
    fig.suptitle(
        (f"{group}: " if group else "") + "mean over seeds (line), min-max over seeds (band)"
    )
    return fig


def paired_seeds(analysis: Analysis, group: str | None) -> Figure:
    """Each seed's final- and best-epoch accuracy per variant of ``group`` (two panels), the
    same seed joined across variants; a black tick marks the mean."""
    spec = analysis.study.spec
    variants = spec.variant_names
    colors = variant_colors(variants)
    arms = [analysis.arm(group, v) for v in variants]
    fig = Figure(figsize=(2.5 + 2.4 * len(variants), 4.2), layout="constrained")
    axes = fig.subplots(1, len(METRICS), sharey=True)
    for ax, metric in zip(np.atleast_1d(axes), METRICS, strict=True):
        seeds = sorted({s for a in arms for s in a.values[metric]})
        for seed in seeds:
            xs = [i for i, a in enumerate(arms) if seed in a.values[metric]]
            ys = [100 * arms[i].values[metric][seed] for i in xs]
            ax.plot(xs, ys, color="#999999", linewidth=0.8, zorder=1)
        for i, a in enumerate(arms):
            ys = [100 * v for v in a.values[metric].values()]
            ax.scatter([i] * len(ys), ys, color=colors[a.variant], s=30, zorder=2)
            if ys:
                ax.plot(
                    [i - 0.25, i + 0.25], [np.mean(ys)] * 2, color="black", linewidth=2, zorder=3
                )
        ax.set_xticks(range(len(arms)), [a.variant for a in arms])
        ax.set_xlim(-0.5, len(arms) - 0.5)
        ax.set_title(f"{metric}-epoch val accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle((f"{group}: " if group else "") + "each seed, joined across variants")
    return fig


def across_groups(analysis: Analysis, metric: str = "final") -> Figure:
    """Mean ``metric`` accuracy of every variant in every group (error bars: sd over seeds);
    for studies whose groups form an axis (models, batch sizes)."""
    spec = analysis.study.spec
    groups = [g for g in spec.group_names if g is not None]
    colors = variant_colors(spec.variant_names)
    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) + 3), 4.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(spec.variant_names), 1)
    for j, variant in enumerate(spec.variant_names):
        xs, ys, es = [], [], []
        for i, group in enumerate(groups):
            s = getattr(analysis.arm(group, variant), metric)
            if s.n:
                xs.append(i + (j - (len(spec.variant_names) - 1) / 2) * width)
                ys.append(100 * s.mean)
                es.append(100 * s.sd if s.n > 1 else 0.0)
        ax.errorbar(xs, ys, yerr=es, fmt="o", color=colors[variant], label=variant, capsize=3)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(f"{metric}-epoch val accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    ax.set_title("mean over seeds (error bar: sd over seeds)")
    return fig


def mechanism_figures(study: StudyData) -> tuple[list[tuple[str, Figure]], str | None]:
    """Figures from :mod:`normlab.probes.plots` for the runs that recorded probe metrics, one
    set per group (variants as lines), and a note when there are none (module missing, or no
    run recorded probes)."""
    try:
        from normlab.probes.plots import ProbeRun, probe_figures
    except ImportError as exc:
        return [], f"probe figures are not available in this installation ({exc})"
    figures: list[tuple[str, Figure]] = []
    any_probes = False
    for group in study.spec.group_names:
        runs = [
            ProbeRun(variant=r.variant, seed=r.seed, rows=r.rows)
            for r in study.runs
            if r.group == group
            and any(k.split("/", 1)[0] in _PROBE_PREFIXES for row in r.rows[:1] for k in row)
        ]
        if not runs:
            continue
        any_probes = True
        for title, fig in probe_figures(runs):
            figures.append(((f"{group}: " if group else "") + str(title), fig))
    if not any_probes:
        return [], "no run recorded probe metrics (add probes with --set probes=[weights,bn])"
    return figures, None if figures else "the probes recorded nothing the probe plots draw"


_PROBE_PREFIXES = ("weights", "bn", "shift", "acts", "gap")


def to_png(fig: Any, dpi: int = 100) -> bytes:
    """The figure as PNG bytes; a pyplot-managed figure is closed afterwards."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        if plt.fignum_exists(getattr(fig, "number", -1)):
            plt.close(fig)
    return buf.getvalue()


__all__ = [
    "METRICS",
    "learning_curves",
    "mechanism_figures",
    "paired_seeds",
    "to_png",
    "variant_colors",
]


def ladder_figures(items: list[Ladder]) -> list[tuple[str, Figure]]:
    """One figure per declared group: each comparison's effect (with its paired 95%
    t-interval) at each rung, in ladder order (each rung labelled with what it multiplies:
    epochs, training images or both); filled markers where claimed."""
    groups: dict[str | None, list[Ladder]] = {}
    for lad in items:
        groups.setdefault(lad.group, []).append(lad)
    out = []
    for group, lads in groups.items():
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.subplots()
        unit = lads[0].rungs[0].comparison.unit
        for i, lad in enumerate(lads):
            color = _COLORS[i % len(_COLORS)]
            xs = [k + 0.06 * (i - (len(lads) - 1) / 2) for k in range(len(lad.rungs))]
            ys = [unit.scale * r.comparison.diff for r in lad.rungs]
            lo = [unit.scale * r.comparison.t_ci[0] for r in lad.rungs]
            hi = [unit.scale * r.comparison.t_ci[1] for r in lad.rungs]
            err = [
                [y - a if math.isfinite(a) else 0.0 for y, a in zip(ys, lo, strict=True)],
                [b - y if math.isfinite(b) else 0.0 for y, b in zip(ys, hi, strict=True)],
            ]
            ax.errorbar(
                xs, ys, yerr=err, color=color, capsize=3, label=f"{lad.variant} − {lad.reference}"
            )
            for x, y, r in zip(xs, ys, lad.rungs, strict=True):
                ax.plot([x], [y], "o", color=color, mfc=color if r.claim else "white")
        rungs = lads[0].rungs
        ax.set_xticks(
            range(len(rungs)), [r.budget.name + "\n" + r.budget.multipliers("\n") for r in rungs]
        )
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xlabel("budget rung")
        ax.set_ylabel(f"difference ({unit.name or 'metric units'})")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title("effect vs budget (filled: claimed under the family-wise rule)")
        out.append(((f"{group}: " if group else "") + "effect along the budget ladder", fig))
    return out
