"""The probes' findings in numbers: one row per arm and quantity, mean ± sd over seeds.

The mechanism figures show curves; this table gives the values a text can quote. Each
quantity reduces one epoch's row of a run (``metrics.jsonl``) to a number — e.g. the mean
over layers of ``weights/norm/<layer>`` — and the table reports, per arm, its mean and sample
standard deviation (ddof = 1) over the arm's completed runs, at the first epoch and at the
final one.

Layer order is the order of the keys in a row, which the probes write in module order (input
to output), so "first third" / "last third" of the layers means shallow / deep.

Conventions: ``weights/eff_lr`` is lr / ||w||^2 (only for scale-invariant layers, i.e. those
feeding a batch-statistics norm); ``bn/init_fraction`` is the weight the initial running
statistics (mean 0, var 1) still carry; ``bn/shift/mean|var`` is the estimation shift of the
running statistics against population statistics of the training data (see
:mod:`normlab.probes.stats`); ``shift/val/acc_running`` / ``acc_precise`` are the validation
accuracy with the running statistics and after recomputing them on training batches (precise
BN, i.e. recalibration).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from normlab.probes.rows import Row, key_getter, layer_values, nanmean
from normlab.report.data import RunRecord, StudyData

Table = tuple[list[str], list[list[str]]]


def _layer_values(row: Row, prefix: str) -> list[float]:
    """The finite values under ``prefix<layer>`` keys, in the row's (module) order."""
    return [v for v in layer_values(row, prefix).values() if math.isfinite(v)]


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def _third(part: str) -> Callable[[Sequence[float]], float]:
    def reduce(xs: Sequence[float]) -> float:
        if len(xs) < 3:
            return math.nan
        k = len(xs) // 3
        return nanmean(xs[:k] if part == "first" else xs[-k:])

    return reduce


def _over_layers(prefix: str, reduce: Callable[[Sequence[float]], float]) -> Callable[[Row], float]:
    return lambda row: reduce(_layer_values(row, prefix))


@dataclass(frozen=True)
class Quantity:
    """One number per epoch row, reported at epoch 1 and at the final epoch."""

    label: str
    value: Callable[[Row], float]
    percent: bool = False


QUANTITIES: tuple[Quantity, ...] = (
    Quantity("weight norm ||w||, mean over conv/linear layers", _over_layers("weights/norm/", nanmean)),
    Quantity("effective lr lr/||w||^2, median over scale-invariant layers", _over_layers("weights/eff_lr/", _median)),
    Quantity("angular update per epoch (rad), mean over layers", _over_layers("weights/angle/", nanmean)),
    Quantity("initial-value weight in running stats, mean over BN layers", _over_layers("bn/init_fraction/", nanmean)),
    Quantity("val acc % with running statistics", key_getter("shift/val/acc_running"), percent=True),
    Quantity("val acc % after recalibration (precise BN)", key_getter("shift/val/acc_precise"), percent=True),
    Quantity("estimation shift of the mean, mean over BN layers", _over_layers("bn/shift/mean/", nanmean)),
    Quantity("estimation shift of the variance, mean over BN layers", _over_layers("bn/shift/var/", nanmean)),
    Quantity("estimation shift of the variance, first third of BN layers", _over_layers("bn/shift/var/", _third("first"))),
    Quantity("estimation shift of the variance, last third of BN layers", _over_layers("bn/shift/var/", _third("last"))),
    Quantity("skewness of the norm layers' inputs, mean over layers", _over_layers("acts/skew/", nanmean)),
    Quantity("fraction of zeros in the norm layers' inputs, mean over layers", _over_layers("acts/zeros/", nanmean)),
    Quantity("train-mode minus eval-mode acc % on one training batch", lambda r: key_getter("gap/train/acc")(r) - key_getter("gap/eval/acc")(r), percent=True),
)  # fmt: skip


def _fmt(x: float, percent: bool) -> str:
    if percent:
        return f"{100 * x:.2f}"
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.3g}"
    return f"{x:.4g}" if abs(x) >= 1 else f"{x:.3f}"


def _mean_sd(values: Sequence[float], percent: bool) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return _fmt(values[0], percent)
    return f"{_fmt(statistics.fmean(values), percent)} ± {_fmt(statistics.stdev(values), percent)}"


def _epoch_value(run: RunRecord, q: Quantity, which: str) -> float:
    rows = [r for r in run.rows if isinstance(r.get("epoch"), int)]
    if not rows:
        return math.nan
    row = (
        min(rows, key=lambda r: r["epoch"])
        if which == "first"
        else max(rows, key=lambda r: r["epoch"])
    )
    return q.value(row)


@dataclass(frozen=True)
class MechanismRow:
    """One arm's values of one quantity, one per completed run that recorded it."""

    arm: str
    quantity: Quantity
    first: list[float]  # at epoch 1
    final: list[float]  # at the run's last epoch


def mechanism_rows(study: StudyData) -> list[MechanismRow]:
    """Every (arm, quantity) that at least one completed run of the arm recorded, in spec order
    (groups, then variants, then :data:`QUANTITIES`)."""
    rows: list[MechanismRow] = []
    spec = study.spec
    for group in spec.group_names:
        for variant in spec.variant_names:
            runs = [r for r in study.arm_runs(group, variant) if r.status == "completed"]
            arm = f"{group}/{variant}" if group else variant
            for q in QUANTITIES:
                final = [_epoch_value(r, q, "final") for r in runs]
                final = [v for v in final if math.isfinite(v)]
                if not final:
                    continue
                first = [_epoch_value(r, q, "first") for r in runs]
                rows.append(MechanismRow(arm, q, [v for v in first if math.isfinite(v)], final))
    return rows


def mechanism_table(study: StudyData) -> Table:
    """:func:`mechanism_rows` as a table: arm, quantity, epoch 1 and final epoch (mean ± sd over
    seeds), seeds; no rows when no run recorded probe metrics."""
    headers = ["arm", "quantity", "epoch 1 (mean ± sd)", "final epoch (mean ± sd)", "seeds"]
    rows = []
    for r in mechanism_rows(study):
        pct = r.quantity.percent
        first = _mean_sd(r.first, pct)
        rows.append([r.arm, r.quantity.label, first, _mean_sd(r.final, pct), str(len(r.final))])
    return headers, rows
