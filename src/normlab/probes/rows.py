"""Reading probe values out of ``metrics.jsonl`` rows: plain functions, no plotting imports.

Shared by the probe figures (:mod:`normlab.probes.plots`) and the report's mechanism numbers
(:mod:`normlab.report.mechanisms`), so both read a row the same way. A row is one epoch's
``dict`` from ``metrics.jsonl``; per-layer probe keys are ``<prefix><layer>`` and appear in
module (execution) order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

Row = dict[str, Any]


def metric_value(value: Any) -> float:
    """A metric value as float; None (a NaN stored as null), bools and non-numbers as NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def layer_values(row: Row, prefix: str) -> dict[str, float]:
    """``{layer: value}`` for the keys ``prefix + layer`` of ``row``, in the row's order."""
    return {k[len(prefix) :]: metric_value(v) for k, v in row.items() if k.startswith(prefix)}


def key_getter(key: str) -> Callable[[Row], float]:
    """A function reading ``key`` of a row as :func:`metric_value` does."""

    def get(row: Row) -> float:
        return metric_value(row.get(key))

    return get


def nanmean(values: Iterable[float]) -> float:
    """Mean of the finite values; NaN when there are none."""
    vals = [v for v in values if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan
