"""Seeds needed for the rule the report actually uses: :func:`seeds_for_rule`.

The rule claims a difference when the sign-flip test's p-value, adjusted for the family, is
below ``alpha`` and the paired intervals exclude 0. Its power at n seeds, for a true mean
paired difference ``diff`` with paired-difference sd ``sd`` (normal paired differences):

* n <= :data:`EXACT_SEEDS`: by simulation (:data:`STUDIES` seeded studies): the exact
  sign-flip p-value over all 2^n sign flips at level ``alpha / family_size``, and the paired
  t-interval excluding 0.
* larger n: the sign-flip test is then close to the paired t-test, whose power at level
  ``alpha / family_size`` is exact from the noncentral t distribution.

``alpha / family_size`` is Bonferroni's level. The report's step-down minP procedure is never
stricter, so the seeds found here are enough for it (an upper estimate, by at most a few seeds
with many comparisons). The bootstrap interval, also required by the rule, is left out of the
power: it excludes 0 whenever the t-interval and the sign-flip test agree, except at the fewest
seeds.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import stats

EXACT_SEEDS = 12
STUDIES = 1000
MAX_SEEDS = 1000
"""Beyond this the search stops: the gap is negligible next to the spread."""


def rule_power(n: int, effect: float, level: float, confidence: float = 0.95) -> float:
    """Probability that the rule claims a true standardised effect ``effect`` (= diff / sd)
    with ``n`` seeds at sign-flip level ``level`` (see the module docstring)."""
    if n < 2:
        return 0.0
    if n > EXACT_SEEDS:
        df = n - 1
        crit = stats.t.ppf(1 - level / 2, df)
        nc = effect * math.sqrt(n)
        return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
    return _simulated_power(n, round(effect, 4), level, confidence)


@functools.cache
def _signs(n: int) -> np.ndarray:
    grid = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1
    return 1.0 - 2.0 * grid  # (2^n, n) of +-1, the identity (all +1) first


@functools.cache
def _simulated_power(n: int, effect: float, level: float, confidence: float) -> float:
    rng = np.random.default_rng(12345 + n)
    d = rng.normal(effect, 1.0, size=(STUDIES, n))
    means = d.mean(axis=1)
    flipped = np.abs(_signs(n) @ d.T) / n  # (2^n, studies)
    obs = np.abs(means)
    p = np.mean(flipped >= obs[None, :] * (1 - 1e-12), axis=0)
    sd = d.std(axis=1, ddof=1)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    excludes = (means - half > 0) | (means + half < 0)
    return float(np.mean((p < level) & excludes))


def seeds_for_rule(
    diff: float,
    sd: float,
    *,
    family_size: int = 1,
    alpha: float = 0.05,
    power: float = 0.8,
    confidence: float = 0.95,
) -> int | None:
    """The fewest seeds with which the rule claims a true gap ``diff`` (paired-difference sd
    ``sd``) with probability at least ``power``; None when either is unknown or ``diff`` is 0;
    ``MAX_SEEDS + 1`` when more than :data:`MAX_SEEDS` would be needed."""
    if not (math.isfinite(diff) and math.isfinite(sd)) or diff == 0:
        return None
    if sd == 0:
        return None
    effect = abs(diff) / sd
    level = alpha / max(1, family_size)
    n = 2
    while 2.0 / 2.0**n >= level:  # too few pairs for the sign-flip test to reach the level
        n += 1
    while n <= EXACT_SEEDS:
        if rule_power(n, effect, level, confidence) >= power:
            return n
        n += 1
    lo, hi = EXACT_SEEDS, EXACT_SEEDS + 1  # the t-based power grows with n: bisect
    while rule_power(hi, effect, level, confidence) < power:
        lo, hi = hi, 2 * hi
        if lo > MAX_SEEDS:
            return MAX_SEEDS + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if rule_power(mid, effect, level, confidence) >= power:
            hi = mid
        else:
            lo = mid
    return hi
