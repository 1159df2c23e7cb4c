"""Family-wise error control of a report's comparisons (normlab.report.family): oracles for
the single comparison, and simulated null studies for the family (the full table is
benchmarks/family_error.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from normlab.report.family import Member, adjust
from normlab.report.stats import min_sign_flip_p, sign_flip_p

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from family_error import study


@pytest.mark.parametrize("n", [3, 6, 10])
def test_one_comparison_is_exactly_the_sign_flip_test(n):
    rng = np.random.default_rng(n)
    b = rng.normal(size=n)
    v = b + rng.normal(0.7, 1.0, size=n)
    values = {(None, "b"): dict(enumerate(b)), (None, "v"): dict(enumerate(v))}
    res = adjust(values, [Member(None, "v", "b")])
    assert res.exact and res.permutations == 2**n
    assert res.p_values[0] == res.adjusted[0] == pytest.approx(sign_flip_p(v, b), abs=1e-12)


def test_adjusted_p_values_are_at_least_the_raw_ones_and_ignore_member_order():
    rng = np.random.default_rng(3)
    values, members = study(5, 8, "normal", rng, effect=1.5)
    res = adjust(values, members, n_resamples=999)
    assert all(a >= r - 1e-12 for a, r in zip(res.adjusted, res.p_values, strict=True))
    flipped = adjust(values, members[::-1], n_resamples=999)
    assert flipped.adjusted == res.adjusted[::-1]
    # the truly different arm (a1) is the most significant, and survives the adjustment
    assert res.adjusted[0] == min(res.adjusted) and res.adjusted[0] < 0.05


def test_groups_missing_seeds_and_too_few_pairs():
    values = {
        ("g1", "b"): {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0},
        ("g1", "v"): {0: 1.5, 1: 2.6, 3: 4.4},  # seed 2 failed
        ("g2", "b"): {0: 0.0},
        ("g2", "v"): {0: 1.0},  # one common seed: never in the family
    }
    res = adjust(values, [Member("g1", "v", "b"), Member("g2", "v", "b")])
    assert math.isnan(res.p_values[1]) and math.isnan(res.adjusted[1])
    # three common seeds, all differences positive: exact p = 2/8
    assert res.p_values[0] == pytest.approx(0.25) and res.adjusted[0] == pytest.approx(0.25)


# (k comparisons, n seeds, noise): a spread over the grid that runs in seconds
CELLS = [
    (1, 6, "normal"),
    (2, 3, "t3"),
    (4, 6, "skewed"),
    (8, 6, "t3"),
    (16, 6, "normal"),
    (3, 12, "skewed"),
]
STUDIES = 250


def resamples_for(k: int) -> int:
    """Enough random permutations that the smallest adjusted p the procedure can give (about
    k / resamples) stays well below 0.05: otherwise a null study could never claim and the
    check would prove nothing."""
    return max(199, 40 * k)


@pytest.mark.slow
@pytest.mark.parametrize(("k", "n", "kind"), CELLS)
def test_null_studies_claim_a_difference_at_most_5_percent_of_the_time(k, n, kind):
    rng = np.random.default_rng(17 * k + n)
    claims = raw_claims = 0
    for r in range(STUDIES):
        values, members = study(k, n, kind, rng)
        res = adjust(values, members, n_resamples=resamples_for(k), seed=r)
        claims += min(res.adjusted) < 0.05
        raw_claims += min(res.p_values) < 0.05
    bound = 0.05 + 3 * math.sqrt(0.05 * 0.95 / STUDIES)  # 3 Monte Carlo sd above alpha
    assert claims / STUDIES <= bound
    if k >= 8 and min_sign_flip_p(n) < 0.05:  # unadjusted, the same studies claim far more
        assert raw_claims / STUDIES > bound


@pytest.mark.slow
def test_a_true_effect_does_not_inflate_claims_among_the_null_arms():
    # strong control: one variant truly better, the others null; claims among the null ones
    rng = np.random.default_rng(5)
    false_claims = true_claims = 0
    for r in range(STUDIES):
        values, members = study(6, 8, "skewed", rng, effect=3.0)
        res = adjust(values, members, n_resamples=199, seed=r)
        true_claims += res.adjusted[0] < 0.05
        false_claims += min(res.adjusted[1:]) < 0.05
    assert false_claims / STUDIES <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / STUDIES)
    assert true_claims / STUDIES > 0.5  # and the real effect is still found


@pytest.mark.slow
def test_power_grows_with_the_effect():
    rng = np.random.default_rng(11)
    power = []
    for effect in (0.5, 1.0, 2.0):
        hits = 0
        for r in range(120):
            values, members = study(4, 12, "normal", rng, effect=effect)
            hits += adjust(values, members, n_resamples=199, seed=r).adjusted[0] < 0.05
        power.append(hits / 120)
    assert power[0] < power[1] < power[2] and power[2] > 0.8


def test_the_claim_rests_on_the_adjusted_p_and_best_epoch_is_descriptive():
    from normlab.report.stats import as_descriptive, compare, in_family

    base = {s: 0.40 + 0.01 * s for s in range(6)}
    better = {s: v + 0.02 + 0.001 * s for s, v in base.items()}  # higher on all 6 seeds
    alone = compare(base, better, names=("bn", "gn"))
    assert alone.detected and alone.p_value == pytest.approx(2 / 64)
    # the same numbers as one of 4 comparisons whose adjusted p is 0.12: not claimed
    family = in_family(alone, 0.12, 4)
    assert not family.detected and family.p_adjusted == 0.12
    assert "adjusted for the 4 comparisons of this report p = 0.12" in family.verdict
    assert "borderline" in family.verdict
    kept = in_family(alone, 0.03, 4)
    assert kept.detected and "adjusted for the 4 comparisons" in kept.verdict
    best = as_descriptive(alone)
    assert not best.detected and best.verdict.startswith("descriptive, not tested")
