"""Figures of what the probes recorded, for study reports: one line per variant, seed bands.

``probe_figures(runs)`` takes the metric rows of several runs (:class:`ProbeRun`: variant,
seed, rows as read from ``metrics.jsonl``) and returns ``(name, Figure)`` pairs for whatever
probe keys are present; a figure whose keys no run has is left out, so the list may be empty.
Every line is the mean over the seeds of one variant, with a band from the lowest to the
highest seed (omitted where a variant has a single seed). Figures are
``matplotlib.figure.Figure`` objects made without pyplot (no global state, no display needed);
save them with ``fig.savefig(path)`` (Agg).

==================  ==========================================================================
name                content
==================  ==========================================================================
weights             per epoch: total weight norm ``sqrt(sum_layers ||w||^2)``; mean effective
                    learning rate over the scale-invariant layers (log scale); mean angular
                    update over layers
estimation_shift    final epoch: ``bn/shift/mean`` and ``bn/shift/var`` per BN layer, layers in
                    model (execution) order
recalibration       per epoch: validation accuracy with running vs precise BN statistics
activations         final epoch: skewness and zero fraction at each norm layer's input
train_eval_gap      per epoch: accuracy and loss on a fixed batch, train vs eval mode
bn_init_fraction    per epoch: largest fraction of the initial value left in a BN running stat
==================  ==========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from normlab.probes.rows import key_getter, layer_values, nanmean

__all__ = ["ProbeRun", "layer_order", "probe_figures"]


@dataclass
class ProbeRun:
    """One run's metric rows (``metrics.jsonl``), labelled with its variant and seed."""

    variant: str
    seed: int
    rows: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# extraction


def _has(runs: Sequence[ProbeRun], prefix: str) -> bool:
    return any(k.startswith(prefix) for r in runs for row in r.rows for k in row)


def layer_order(lists: Iterable[Sequence[str]]) -> list[str]:
    """Merge per-run layer lists (each in model order) into one order: a layer missing from
    some runs (e.g. an XBN variant's GroupNorm positions) is placed after its predecessor in
    the run that has it."""
    order: list[str] = []
    for names in lists:
        prev: str | None = None
        for name in names:
            if name not in order:
                order.insert(order.index(prev) + 1 if prev is not None else 0, name)
            prev = name
    return order


def _variants(runs: Sequence[ProbeRun]) -> dict[str, list[ProbeRun]]:
    out: dict[str, list[ProbeRun]] = {}
    for r in runs:
        out.setdefault(r.variant, []).append(r)
    return out


def _per_epoch(run: ProbeRun, value: Callable[[dict[str, Any]], float]) -> dict[int, float]:
    out: dict[int, float] = {}
    for row in run.rows:
        if "epoch" in row:
            v = value(row)
            if math.isfinite(v):
                out[int(row["epoch"])] = v
    return out


def _last_with(run: ProbeRun, prefix: str) -> dict[str, Any] | None:
    for row in reversed(run.rows):
        if any(k.startswith(prefix) for k in row):
            return row
    return None


# --------------------------------------------------------------------------------------------
# drawing


def _band(
    ax: Axes,
    xs: Sequence[float],
    per_seed: list[list[float]],
    label: str,
    color: str,
    linestyle: str = "-",
    marker: str | None = None,
) -> None:
    """Mean over seeds (NaN-aware) with a min-max band where there are two or more seeds."""
    data = np.asarray(per_seed, dtype=float)  # [seeds, points]
    x = np.asarray(xs, dtype=float)
    finite = np.isfinite(data)
    valid = finite.sum(0)
    keep = valid > 0  # points no seed has are skipped, so the line joins its neighbours
    if not keep.any():
        return
    mean = np.where(finite, data, 0.0).sum(0)[keep] / valid[keep]
    ax.plot(x[keep], mean, linestyle=linestyle, color=color, label=label, marker=marker, ms=3)
    if data.shape[0] > 1 and (valid > 1).any():
        lo = np.where(finite, data, np.inf).min(0)[keep]
        hi = np.where(finite, data, -np.inf).max(0)[keep]
        ax.fill_between(x[keep], lo, hi, color=color, alpha=0.2, linewidth=0)


def _epoch_lines(
    ax: Axes,
    runs: Sequence[ProbeRun],
    value: Callable[[dict[str, Any]], float],
    *,
    linestyle: str = "-",
    suffix: str = "",
    colors: dict[str, str],
) -> bool:
    """One band per variant of ``value(row)`` against the epoch; False if nothing was drawn."""
    drawn = False
    for variant, group in _variants(runs).items():
        series = [_per_epoch(r, value) for r in group]
        epochs = sorted({e for s in series for e in s})
        if not epochs:
            continue
        per_seed = [[s.get(e, math.nan) for e in epochs] for s in series]
        _band(ax, epochs, per_seed, f"{variant}{suffix}", colors[variant], linestyle)
        drawn = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return drawn


def _depth_lines(
    ax: Axes, runs: Sequence[ProbeRun], prefix: str, colors: dict[str, str], lead: str
) -> bool:
    """Final-epoch values of ``prefix<layer>`` against the layer (model order), per variant.

    ``lead`` (a key prefix) picks the row: the last one of each run that has keys ``lead``."""
    finals: dict[str, list[dict[str, float]]] = {}
    for r in runs:
        row = _last_with(r, lead)
        if row is not None:
            finals.setdefault(r.variant, []).append(layer_values(row, prefix))
    order = layer_order(list(v) for vs in finals.values() for v in vs)
    if not order:
        return False
    x = list(range(len(order)))
    for variant, per_run in finals.items():
        per_seed = [[v.get(name, math.nan) for name in order] for v in per_run]
        _band(ax, x, per_seed, variant, colors[variant], marker="o")
    step = max(1, math.ceil(len(order) / 40))
    ax.set_xticks(x[::step])
    ax.set_xticklabels(order[::step], rotation=90, fontsize=6)
    return True


def _finish(fig: Figure, axes: Sequence[Axes], title: str) -> Figure:
    fig.suptitle(title)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        handles, _labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7)
    return fig


# --------------------------------------------------------------------------------------------
# the figures


def _weights_figure(runs: Sequence[ProbeRun], colors: dict[str, str]) -> Figure | None:
    if not _has(runs, "weights/norm/"):
        return None
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax_norm, ax_lr, ax_angle = fig.subplots(1, 3)

    def total_norm(row: dict[str, Any]) -> float:
        vals = [v for v in layer_values(row, "weights/norm/").values() if math.isfinite(v)]
        return math.sqrt(sum(v * v for v in vals)) if vals else math.nan

    _epoch_lines(ax_norm, runs, total_norm, colors=colors)
    ax_norm.set(
        title="Weight norm (all conv/linear layers)", xlabel="epoch", ylabel="sqrt(sum of ||w||^2)"
    )
    if _epoch_lines(
        ax_lr,
        runs,
        lambda row: nanmean(layer_values(row, "weights/eff_lr/").values()),
        colors=colors,
    ):
        ax_lr.set_yscale("log")
    ax_lr.set(
        title="Effective learning rate lr/||w||^2\n(mean over layers feeding a norm)",
        xlabel="epoch",
        ylabel="lr / ||w||^2",
    )
    _epoch_lines(
        ax_angle,
        runs,
        lambda row: nanmean(layer_values(row, "weights/angle/").values()),
        colors=colors,
    )
    ax_angle.set(
        title="Angular update per epoch (mean over layers)", xlabel="epoch", ylabel="radians"
    )
    return _finish(fig, (ax_norm, ax_lr, ax_angle), "Weights")


@dataclass(frozen=True)
class _DepthPanel:
    """One panel of per-layer values against depth: metric keys ``prefix`` + layer name."""

    prefix: str
    title: str
    xlabel: str
    ylabel: str = "mean over channels"
    zero_line: bool = False


def _depth_figure(
    runs: Sequence[ProbeRun],
    colors: dict[str, str],
    panels: Sequence[_DepthPanel],
    group: str,
    title: str,
) -> Figure | None:
    """Side-by-side depth profiles (final epoch); None when the first panel has no data.
    ``group`` is the key prefix that layer names are read relative to (e.g. ``bn/shift/``)."""
    if not _has(runs, panels[0].prefix):
        return None
    fig = Figure(figsize=(13, 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels))
    axes = list(axes) if len(panels) > 1 else [axes]
    for ax, panel in zip(axes, panels, strict=True):
        _depth_lines(ax, runs, panel.prefix, colors, group)
        if panel.zero_line:
            ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
    return _finish(fig, tuple(axes), title)


def _shift_figure(runs: Sequence[ProbeRun], colors: dict[str, str]) -> Figure | None:
    panels = (
        _DepthPanel(
            "bn/shift/mean/", "Mean shift |mu_running - mu_pop| / sigma_pop", "BN layer (depth)"
        ),
        _DepthPanel(
            "bn/shift/var/", "Variance shift |log(var_running / var_pop)|", "BN layer (depth)"
        ),
    )
    return _depth_figure(
        runs, colors, panels, "bn/shift/", "Estimation shift vs depth (final epoch)"
    )


def _recalibration_figure(runs: Sequence[ProbeRun], colors: dict[str, str]) -> Figure | None:
    if not _has(runs, "shift/val/acc_precise"):
        return None
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    _epoch_lines(ax, runs, key_getter("shift/val/acc_precise"), colors=colors, suffix=" precise")
    _epoch_lines(
        ax,
        runs,
        key_getter("shift/val/acc_running"),
        colors=colors,
        linestyle="--",
        suffix=" running",
    )
    ax.set(
        title="Validation accuracy: running (EMA) vs precise BN statistics",
        xlabel="epoch",
        ylabel="accuracy (same validation sample)",
    )
    return _finish(fig, (ax,), "What recalibration would buy")


def _acts_figure(runs: Sequence[ProbeRun], colors: dict[str, str]) -> Figure | None:
    panels = (
        _DepthPanel(
            "acts/skew/", "Skewness of the norm's input", "norm layer (depth)", zero_line=True
        ),
        _DepthPanel(
            "acts/zeros/",
            "Fraction of exact zeros in the norm's input",
            "norm layer (depth)",
            ylabel="fraction",
        ),
    )
    return _depth_figure(runs, colors, panels, "acts/", "Activations before the norm (final epoch)")


def _gap_figure(runs: Sequence[ProbeRun], colors: dict[str, str]) -> Figure | None:
    if not _has(runs, "gap/"):
        return None
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    for ax, stat in ((ax_acc, "acc"), (ax_loss, "loss")):
        for mode, style in (("train", "-"), ("eval", "--")):
            _epoch_lines(
                ax,
                runs,
                key_getter(f"gap/{mode}/{stat}"),
                colors=colors,
                linestyle=style,
                suffix=f" {mode} mode",
            )
    ax_acc.set(title="Accuracy on a fixed training batch", xlabel="epoch", ylabel="accuracy")
    ax_loss.set(title="Loss on a fixed training batch", xlabel="epoch", ylabel="cross-entropy")
    return _finish(fig, (ax_acc, ax_loss), "Train-mode vs eval-mode gap")


def _init_fraction_figure(runs: Sequence[ProbeRun], colors: dict[str, str]) -> Figure | None:
    if not _has(runs, "bn/init_fraction/"):
        return None
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()

    def worst(row: dict[str, Any]) -> float:
        vals = [v for v in layer_values(row, "bn/init_fraction/").values() if math.isfinite(v)]
        return max(vals) if vals else math.nan

    _epoch_lines(ax, runs, worst, colors=colors)
    ax.set_ylim(-0.02, 1.02)
    ax.set(
        title="Initial value left in BN running statistics\n(largest over layers; (1-m)^k)",
        xlabel="epoch",
        ylabel="fraction",
    )
    return _finish(fig, (ax,), "BN running statistics")


_FIGURES = (
    ("weights", _weights_figure),
    ("estimation_shift", _shift_figure),
    ("recalibration", _recalibration_figure),
    ("activations", _acts_figure),
    ("train_eval_gap", _gap_figure),
    ("bn_init_fraction", _init_fraction_figure),
)


def probe_figures(runs: Sequence[ProbeRun]) -> list[tuple[str, Figure]]:
    """``(name, Figure)`` for every figure whose probe keys some run has (module docstring)."""
    runs = [r for r in runs if r.rows]
    if not runs:
        return []
    colors = {v: f"C{i % 10}" for i, v in enumerate(_variants(runs))}
    out: list[tuple[str, Figure]] = []
    for name, make in _FIGURES:
        fig = make(runs, colors)
        if fig is not None:
            out.append((name, fig))
    return out
