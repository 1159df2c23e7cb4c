"""Family-wise error control for the comparisons of one report.

The family is every comparison the report gives a verdict on: each variant against the
baseline, and each extra ``comparisons`` pair, within every group, on the final-epoch metric.
(Best-epoch comparisons are descriptive: the epoch is picked on the validation set, so they are
reported with their raw p-value and never claimed.) Controlling the family means: where no arm
truly differs from what it is compared with, the chance that the report claims *any* difference
is at most ``alpha``.

Procedure: Westfall & Young's step-down minP test (1993), with the p-values of a within-block
permutation test. A *block* is one group and one seed: the runs that share a seed (same data
split, initialisation seed and batch order) are paired. Under the hypothesis that some arms are
equal, their runs within a block are exchangeable, so the arm labels can be permuted within
each block without changing the distribution of anything. Each comparison's statistic is the
absolute mean paired difference over the seeds both arms finished; its p-value is the fraction
of permutations (the identity included) whose statistic is at least the observed one, which for
one pair of arms is exactly the two-sided sign-flip test the per-comparison verdict uses.

Step-down: the hypotheses still in question say that the arms they connect are equal, so
labels are permuted only among those arms (per connected component, per block); the smallest
observed p-value among them is tested against the distribution of the smallest p-value over
them, the comparison that attains it is settled with that adjusted p-value (made monotone, and
never below its own p), and the step repeats on the rest. Restricting the permutations to the arms still in question keeps the control strong
(a truly different arm is never permuted with the others), not only under the global null.

Exact enumeration when the permutations are few (at most ``exact_limit``), otherwise
``n_resamples`` seeded random permutations plus the identity (still an exact-level test: a
Monte Carlo randomization test). ``tests/test_report_family.py`` checks the family-wise error by
simulation; ``benchmarks/family_error.py`` prints the full table and the power.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

EXACT_LIMIT = 20_000
"""Enumerate every permutation when there are at most this many (else sample)."""
N_RESAMPLES = 9999


@dataclass(frozen=True)
class Member:
    """One comparison of the family: ``variant`` against ``reference`` within ``group``."""

    group: str | None
    variant: str
    reference: str


Values = Mapping[tuple[str | None, str], Mapping[int, float]]
"""(group, arm) -> seed -> value."""


@dataclass(frozen=True)
class FamilyResult:
    members: tuple[Member, ...]
    p_values: tuple[float, ...]  # each comparison's own permutation p-value (unadjusted)
    adjusted: tuple[float, ...]  # step-down minP adjusted p-values
    permutations: int  # permutations per step (identity included)
    exact: bool  # every step enumerated all permutations

    @property
    def size(self) -> int:
        """The comparisons actually in the family: those with an adjusted p-value (at least 2
        common seeds); the others can never be claimed and do not count."""
        return sum(1 for p in self.adjusted if math.isfinite(p))


def adjust(
    values: Values,
    members: Sequence[Member],
    *,
    n_resamples: int = N_RESAMPLES,
    exact_limit: int = EXACT_LIMIT,
    seed: int = 0,
) -> FamilyResult:
    """Raw and family-wise adjusted p-values of ``members`` (see the module docstring).

    A comparison with fewer than 2 common seeds gets NaN for both and takes no part in the
    family (it can never be claimed). The result does not depend on the order of ``members``.
    """
    members = tuple(members)
    if not members:
        return FamilyResult((), (), (), 0, True)
    # computed in one canonical order, so that the random permutations drawn (and hence the
    # Monte Carlo p-values) do not depend on the order the caller lists the comparisons in
    order = sorted(
        range(len(members)),
        key=lambda i: (str(members[i].group), members[i].variant, members[i].reference),
    )
    res = _adjust([members[i] for i in order], values, n_resamples, exact_limit, seed)
    back = {j: i for i, j in enumerate(order)}
    pick = [back[j] for j in range(len(members))]
    return FamilyResult(
        members,
        tuple(res.p_values[i] for i in pick),
        tuple(res.adjusted[i] for i in pick),
        res.permutations,
        res.exact,
    )


def _adjust(
    members: Sequence[Member], values: Values, n_resamples: int, exact_limit: int, seed: int
) -> FamilyResult:
    members = tuple(members)
    nan = float("nan")
    layout = _Layout(values, members)
    live = [i for i, m in enumerate(members) if layout.pairs(m) >= 2]
    raw = [nan] * len(members)
    adjusted = [nan] * len(members)
    if not live:
        return FamilyResult(members, tuple(raw), tuple(adjusted), 0, True)
    rng = np.random.default_rng(seed)
    exact = True
    count = 0
    # raw p: each comparison on its own (its two arms permuted: the sign-flip test)
    for i in live:
        stats, is_exact = layout.null(members[i : i + 1], rng, n_resamples, exact_limit)
        raw[i] = _p_of(stats[:, 0], stats[0, 0])
        exact &= is_exact
    remaining = list(live)
    running = 0.0
    while remaining:
        stats, is_exact = layout.null(
            [members[j] for j in remaining], rng, n_resamples, exact_limit
        )
        exact &= is_exact
        count = stats.shape[0]
        marginal = _marginal_p(stats)  # (P, len(remaining)): each permuted statistic's p
        observed = marginal[0]
        first = int(np.argmin(observed))  # the most significant comparison still in question
        # the minP test of "every remaining comparison is null", with permutations among the
        # arms those comparisons connect: how often is the smallest p at least this small?
        q = float(np.mean(marginal.min(axis=1) <= observed[first] * (1 + 1e-12)))
        # (never below the comparison's own p: a larger p only makes the procedure stricter)
        running = max(running, q, raw[remaining[first]])
        adjusted[remaining[first]] = min(1.0, running)
        del remaining[first]
    return FamilyResult(members, tuple(raw), tuple(adjusted), count, exact)


def _p_of(null: np.ndarray, observed: float) -> float:
    """The fraction of the null (identity included) at least ``observed`` (ties count)."""
    return float(np.mean(null >= observed - _tolerance(observed)))


def _tolerance(x: float | np.ndarray) -> float | np.ndarray:
    # two equal statistics computed in different summation orders may differ in the last bits
    return np.abs(x) * 1e-12 + 1e-15


def _marginal_p(stats: np.ndarray) -> np.ndarray:
    """For every row (permutation) and column (comparison): the fraction of rows whose value in
    that column is at least this row's, i.e. the permutation p-value the row would have."""
    p = np.empty_like(stats)
    total = stats.shape[0]
    for col in range(stats.shape[1]):
        column = stats[:, col]
        ordered = np.sort(column)
        # count of values >= x, with the same tolerance for ties as _p_of
        below = np.searchsorted(ordered, column - _tolerance(column), side="left")
        p[:, col] = (total - below) / total
    return p


class _Layout:
    """The values as one matrix per group (arms x seeds, NaN where a run is missing)."""

    def __init__(self, values: Values, members: Sequence[Member]) -> None:
        self.groups: dict[str | None, tuple[list[str], list[int], np.ndarray]] = {}
        for g in dict.fromkeys(m.group for m in members):
            arms = list(
                dict.fromkeys(a for m in members if m.group == g for a in (m.variant, m.reference))
            )
            seeds = sorted({s for a in arms for s in values.get((g, a), {})})
            x = np.full((len(arms), len(seeds)), np.nan)
            for ai, a in enumerate(arms):
                for si, s in enumerate(seeds):
                    v = values.get((g, a), {}).get(s)
                    if v is not None:
                        x[ai, si] = float(v)
            self.groups[g] = (arms, seeds, x)

    def pairs(self, m: Member) -> int:
        arms, _, x = self.groups[m.group]
        a, r = arms.index(m.variant), arms.index(m.reference)
        return int(np.sum(np.isfinite(x[a]) & np.isfinite(x[r])))

    def null(
        self, members: Sequence[Member], rng: np.random.Generator, n_resamples: int, limit: int
    ) -> tuple[np.ndarray, bool]:
        """The statistics of ``members`` (columns) under every permutation (rows; row 0 is the
        identity) of arm labels within each block, among the arms ``members`` connect."""
        units: list[tuple[str | None, int, list[int]]] = []  # (group, seed column, arms)
        for g in dict.fromkeys(m.group for m in members):
            arms, seeds, x = self.groups[g]
            edges = [
                (arms.index(m.variant), arms.index(m.reference)) for m in members if m.group == g
            ]
            for comp in _components(len(arms), edges):
                for si in range(len(seeds)):
                    present = [a for a in comp if math.isfinite(x[a, si])]
                    if len(present) >= 2:
                        units.append((g, si, present))
        sizes = [math.factorial(len(u[2])) for u in units]
        total = math.prod(sizes)
        exact = total <= limit
        rows = total if exact else n_resamples + 1
        idx = {
            g: np.broadcast_to(
                np.arange(len(arms))[None, :, None], (rows, len(arms), len(seeds))
            ).copy()
            for g, (arms, seeds, _) in self.groups.items()
            if any(m.group == g for m in members)
        }
        if exact:  # mixed-radix enumeration: row r picks permutation (r // stride) % size
            strides = np.cumprod([1, *sizes[:-1]]) if sizes else np.ones(0, dtype=np.int64)
            choice = (np.arange(rows)[:, None] // strides[None, :]) % np.asarray(sizes)[None, :]
            for u, (g, si, arms_u) in enumerate(units):
                table = np.asarray(list(itertools.permutations(arms_u)))  # identity first
                idx[g][:, arms_u, si] = table[choice[:, u]]
        else:
            for g, si, arms_u in units:
                keys = rng.random((rows - 1, len(arms_u)))
                idx[g][1:, arms_u, si] = np.asarray(arms_u)[np.argsort(keys, axis=1)]
        out = np.empty((rows, len(members)))
        for g, ix in idx.items():
            arms, _, x = self.groups[g]
            xp = np.take_along_axis(np.broadcast_to(x, ix.shape), ix, axis=1)
            for col, m in enumerate(members):
                if m.group == g:
                    d = xp[:, arms.index(m.variant), :] - xp[:, arms.index(m.reference), :]
                    out[:, col] = np.abs(np.nanmean(d, axis=1))
        return out, exact


def _components(n: int, edges: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Connected components (of size >= 2) of the arms joined by ``edges``."""
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in edges:
        parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for a in range(n):
        if any(a in e for e in edges):
            groups.setdefault(find(a), []).append(a)
    return [sorted(c) for c in groups.values() if len(c) >= 2]
