"""Budget ladders: does a comparison hold, shrink or reverse as training grows?

A study with ``budgets`` (:mod:`normlab.study.spec`) runs every group at every rung, and the
report judges each rung's comparisons in the one study-level family. This module reads those
judgements along the ladder, per declared group and comparison:

* the **trend** of the claims, from the family-wise verdict at each rung (claimed higher,
  claimed lower, or not claimed): *holds* (claimed in the same direction at every rung),
  *reverses* (claimed in opposite directions at two rungs), *appears* (claimed from some rung
  on, not below), *fades* (claimed up to some rung, not above), *claimed at some rungs only*,
  or *not detected at any rung*. It rests on the claims, so it inherits their family-wise
  error control; it never reads a trend into unclaimed differences;
* the **change in size** from the first to the last rung: per seed, the last rung's paired
  difference minus the first rung's (the same seeds run every rung), with its paired
  t-interval. It is descriptive, outside the tested family; the words say *grows* or
  *shrinks* only when that interval excludes 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from normlab.report.analysis import TESTED, Analysis
from normlab.report.stats import Comparison, paired_t_ci
from normlab.study.spec import Budget, rung_group


@dataclass(frozen=True)
class Rung:
    """One rung's judged comparison."""

    budget: Budget
    comparison: Comparison

    @property
    def claim(self) -> int:
        """+1 claimed higher, -1 claimed lower, 0 not claimed."""
        c = self.comparison
        return 0 if not c.detected else (1 if c.diff > 0 else -1)


@dataclass(frozen=True)
class Change:
    """The last rung's effect minus the first rung's, over the seeds both ran."""

    first: str
    last: str
    seeds: int
    diff: float
    t_ci: tuple[float, float]


@dataclass(frozen=True)
class Ladder:
    """One comparison of one declared group along the budget ladder."""

    group: str | None
    variant: str
    reference: str
    rungs: tuple[Rung, ...]
    trend: str
    change: Change | None

    @property
    def label(self) -> str:
        return (f"{self.group}: " if self.group else "") + f"{self.variant} − {self.reference}"

    def sentence(self) -> str:
        """The trend and the change in size, in words (units of the comparison's metric)."""
        unit = self.rungs[0].comparison.unit
        out = f"{self.label}: {self.trend}"
        ch = self.change
        if ch is None:
            return out + "; the change in size cannot be estimated (fewer than 2 common seeds)."
        lo, hi = ch.t_ci
        size = (
            f"the effect changes by {unit.text(ch.diff, signed=True)} from {ch.first} to {ch.last}"
        )
        if not math.isfinite(lo):
            return out + f"; {size} (no interval: fewer than 2 seeds or no spread)."
        interval = f"(95% t-interval {unit.amount(lo, True)} to {unit.amount(hi, True)}, paired by seed; descriptive)"
        first = self.rungs[0].comparison.diff
        if lo <= 0 <= hi:
            return out + f"; {size} {interval}: no detectable change in size."
        if (ch.diff < 0) != (first > 0):
            word = "grows"  # the change points away from zero
        elif abs(ch.diff) <= abs(first):
            word = "shrinks"
        else:
            word = "moves past zero"
        return out + f"; {size} {interval}: it {word} as the budget grows."


def _trend(rungs: tuple[Rung, ...]) -> str:
    claims = [r.claim for r in rungs]
    names = [r.budget.name for r in rungs]
    claimed = [n for n, c in zip(names, claims, strict=True) if c]
    if 1 in claims and -1 in claims:
        up = ", ".join(n for n, c in zip(names, claims, strict=True) if c > 0)
        down = ", ".join(n for n, c in zip(names, claims, strict=True) if c < 0)
        return f"reverses (claimed higher at {up}, lower at {down})"
    if not claimed:
        return "not detected at any rung"
    direction = "higher" if 1 in claims else "lower"
    if len(claimed) == len(rungs):
        return f"holds: claimed {direction} at every rung"
    first = claims.index(next(c for c in claims if c))
    last = len(claims) - 1 - claims[::-1].index(next(c for c in claims[::-1] if c))
    contiguous = all(claims[first : last + 1])
    if contiguous and last == len(claims) - 1:
        return f"appears as the budget grows: claimed {direction} from {names[first]} on"
    if contiguous and first == 0:
        return f"fades as the budget grows: claimed {direction} up to {names[last]} only"
    return f"claimed {direction} at {', '.join(claimed)} only"


def _change(analysis: Analysis, group: str | None, first: Rung, last: Rung) -> Change | None:
    """Per seed, (variant - reference) at the last rung minus the same at the first."""
    c0, c1 = first.comparison, last.comparison

    def per_seed(rung: Rung, c: Comparison) -> dict[int, float]:
        g = rung_group(group, rung.budget.name)
        v = analysis.arm(g, c.variant).values.get(TESTED, {})
        b = analysis.arm(g, c.baseline).values.get(TESTED, {})
        return {s: v[s] - b[s] for s in set(v) & set(b)}

    d0, d1 = per_seed(first, c0), per_seed(last, c1)
    seeds = sorted(set(d0) & set(d1))
    if len(seeds) < 2:
        return None
    late = [d1[s] for s in seeds]
    early = [d0[s] for s in seeds]
    diff = sum(a - b for a, b in zip(late, early, strict=True)) / len(seeds)
    return Change(first.budget.name, last.budget.name, len(seeds), diff, paired_t_ci(late, early))


def ladders(analysis: Analysis) -> list[Ladder]:
    """Every tested comparison of a study with ``budgets``, read along the ladder (module
    docstring); [] for a study without budgets."""
    spec = analysis.study.spec
    if not spec.budgets:
        return []
    by_key: dict[tuple[str | None, str, str], dict[str, Comparison]] = {}
    for gc in analysis.comparisons:
        if gc.metric != TESTED:
            continue
        group, rung = spec.split_group(gc.group)
        if rung is None:
            continue
        c = gc.comparison
        by_key.setdefault((group, c.variant, c.baseline), {})[rung.name] = c
    out = []
    for (group, variant, reference), per_rung in by_key.items():
        rungs = tuple(Rung(b, per_rung[b.name]) for b in spec.budgets if b.name in per_rung)
        if len(rungs) < 2:  # a group run at one rung only (budgets.RUNG.groups) has no trend
            continue
        change = _change(analysis, group, rungs[0], rungs[-1])
        out.append(Ladder(group, variant, reference, rungs, _trend(rungs), change))
    return out


def ladder_table(items: list[Ladder]) -> tuple[list[str], list[list[str]]]:
    """One row per comparison: its effect and claim at each rung, and the trend."""
    headers = ["comparison", "effect at each rung (95% t-interval)", "trend"]
    rows = []
    for lad in items:
        cells = []
        for r in lad.rungs:
            c, unit = r.comparison, r.comparison.unit
            lo, hi = c.t_ci
            ci = (
                ""
                if not math.isfinite(lo)
                else f" [{unit.amount(lo, True)}, {unit.amount(hi, True)}]"
            )
            mark = " claimed" if r.claim else ""
            cells.append(f"{r.budget.name}: {unit.amount(c.diff, True)}{ci}{mark}")
        rows.append([lad.label, "; ".join(cells), lad.trend])
    return headers, rows
