"""The report's statistics against closed forms, exact enumeration and scipy on fixed data; the
verdicts, including seed 000's single runs (106/128 vs 105/128)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from normlab.report.power import seeds_for_rule
from normlab.report.stats import (
    compare,
    min_seeds_for,
    min_sign_flip_p,
    paired_bootstrap_ci,
    paired_t_ci,
    seeds_needed,
    sign_flip_p,
    summarize,
    two_proportions,
)

BASE = [0.801, 0.812, 0.795, 0.820, 0.808, 0.799]
OTHER = [0.806, 0.806, 0.803, 0.816, 0.809, 0.801]  # paired gaps +0.5 -0.6 +0.8 -0.4 +0.1 +0.2


def test_summary_matches_the_closed_form_t_interval():
    x = np.asarray(BASE)
    s = summarize(BASE)
    n = len(x)
    sd = math.sqrt(((x - x.mean()) ** 2).sum() / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    assert s.n == n and s.mean == pytest.approx(x.mean(), abs=1e-15)
    assert s.sd == pytest.approx(sd, rel=1e-12)
    assert (s.ci_low, s.ci_high) == pytest.approx((x.mean() - half, x.mean() + half), rel=1e-12)
    one = summarize([0.5])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.sd) and math.isnan(one.ci_low)
    assert summarize([]).n == 0 and math.isnan(summarize([]).mean)
    flat = summarize([0.3, 0.3, 0.3])
    # no spread: no interval (issue 12: a zero-width interval claims a precision seeds cannot give)
    assert flat.sd == 0 and flat.constant and math.isnan(flat.ci_low) and math.isnan(flat.ci_high)
    assert summarize([0.2, float("nan"), None, 0.4]).n == 2  # type: ignore[list-item]


def _enumerated_sign_flip_p(d: np.ndarray) -> float:
    observed = abs(d.mean())
    flips = [
        abs((d * np.asarray(signs)).mean()) for signs in itertools.product((1, -1), repeat=d.size)
    ]
    return float(np.mean([f >= observed - 1e-12 for f in flips]))


def test_sign_flip_p_equals_exact_enumeration():
    v, b = np.asarray(OTHER), np.asarray(BASE)
    assert sign_flip_p(v, b) == pytest.approx(_enumerated_sign_flip_p(v - b), abs=1e-12)
    rng = np.random.default_rng(3)
    for n in (3, 4, 7):
        x, y = rng.normal(size=n), rng.normal(size=n)
        assert sign_flip_p(x, y) == pytest.approx(_enumerated_sign_flip_p(x - y), abs=1e-12)


def test_the_smallest_possible_p_is_two_over_two_to_the_n():
    for n in (2, 5, 6, 8):
        b = np.zeros(n)
        v = np.arange(1, n + 1) / 100  # every seed favours the variant
        assert sign_flip_p(v, b) == pytest.approx(2 / 2**n)
        assert min_sign_flip_p(n) == pytest.approx(2 / 2**n)
    assert min_seeds_for(0.05) == 6  # 5 seeds can never reach p < 0.05
    assert sign_flip_p([0.5, 0.6], [0.5, 0.6]) == 1.0


def test_intervals_match_scipy_called_directly():
    v, b = np.asarray(OTHER), np.asarray(BASE)
    d = v - b
    lo, hi = paired_t_ci(v, b)
    half = stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
    assert (lo, hi) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-10)
    ref = stats.bootstrap(
        (v, b),
        lambda x, y, axis=-1: np.mean(x - y, axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=9999,
        method="BCa",
        rng=np.random.default_rng(0),
    ).confidence_interval
    assert paired_bootstrap_ci(v, b) == pytest.approx((ref.low, ref.high), rel=1e-12)
    # equal differences on every pair: no spread, no interval (not a zero-width one)
    assert all(math.isnan(x) for x in paired_bootstrap_ci([0.6, 0.7], [0.5, 0.6]))
    assert all(math.isnan(x) for x in paired_bootstrap_ci([0.6], [0.5]))


def test_seeds_needed_is_the_normal_approximation():
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert seeds_needed(0.01, 0.02) == math.ceil((z * 2) ** 2) == 32
    assert seeds_needed(0.1, 0.001) == 6  # never below what the sign-flip test can detect
    assert seeds_needed(0.0, 0.02) is None
    assert seeds_needed(0.01, float("nan")) is None


def test_the_binomial_view_of_two_accuracies():
    b = two_proportions(0.8281, 128, 0.8203, 128)
    assert (b.correct_a, b.correct_b) == (106, 105)
    assert b.p_value == pytest.approx(stats.fisher_exact([[106, 22], [105, 23]]).pvalue)
    assert b.p_value == pytest.approx(1.0)
    # a pooled two-proportion z-test agrees that one image in 128 is noise
    p = (106 + 105) / 256
    z = (106 / 128 - 105 / 128) / math.sqrt(p * (1 - p) * (2 / 128))
    assert 2 * stats.norm.sf(abs(z)) > 0.8
    # ... and Barnard's exact test too
    assert stats.barnard_exact([[106, 105], [22, 23]]).pvalue > 0.8


def test_seed_000_verdict_is_no_detectable_difference():
    # Seed 000: BN before ReLU 0.8281, BN after 0.8203: single runs, 106 vs 105 of 128 images.
    c = compare({0: 0.8281}, {0: 0.8203}, names=("pre", "post"), n_val=128)
    assert c.n == 1 and not c.detected
    assert c.verdict.startswith("no detectable difference")
    assert "no estimate of the seed-to-seed variation" in c.verdict
    assert "1 of 128 validation images (105 vs 106 correct)" in c.verdict
    assert "Fisher's exact test p = 1.00" in c.verdict
    assert "at least 6 seeds" in c.verdict
    assert c.diff == pytest.approx(0.8203 - 0.8281)
    assert math.isnan(c.p_value) and c.seeds_needed is None
    # without the validation-set size the verdict is the same, minus the binomial view
    plain = compare({0: 0.8281}, {0: 0.8203})
    assert plain.verdict.startswith("no detectable difference") and "Fisher" not in plain.verdict


def test_a_single_pair_is_never_declared_a_winner_even_far_apart():
    c = compare({0: 0.50}, {0: 0.90}, n_val=128)
    assert not c.detected and c.verdict.startswith("no detectable difference")
    assert "more than validation sampling alone explains" in c.verdict


def test_a_consistent_gap_over_enough_seeds_is_detected():
    b = {s: 0.80 + 0.01 * (s % 3) for s in range(8)}
    v = {s: b[s] + 0.02 + 0.002 * (s % 2) for s in range(8)}
    c = compare(b, v, names=("bn", "gn"))
    assert c.detected and c.p_value == pytest.approx(2 / 2**8)
    assert c.verdict.startswith("gn is higher than bn by 2.1 points (8/8 seeds agree")
    lower = compare(v, b, names=("gn", "bn"))
    assert lower.detected and lower.verdict.startswith("bn is lower than gn")


def test_five_consistent_seeds_cannot_be_significant_and_the_verdict_says_so():
    b = {s: 0.80 for s in range(5)}
    v = {s: 0.83 + 0.001 * s for s in range(5)}
    c = compare(b, v)
    assert not c.detected and c.p_value == pytest.approx(0.0625)
    assert c.verdict.startswith("no detectable difference with 5 seeds")
    assert "cannot reach p < 0.05 at all (smallest possible p = 0.0625)" in c.verdict


def test_noise_smaller_than_the_spread_gets_a_seeds_needed_estimate():
    c = compare(dict(enumerate(BASE)), dict(enumerate(OTHER)), names=("pre", "post"))
    d = np.asarray(OTHER) - np.asarray(BASE)
    assert c.diff == pytest.approx(d.mean()) and c.sd_diff == pytest.approx(d.std(ddof=1))
    assert c.wins == 4 and c.losses == 2 and not c.detected
    assert c.verdict.startswith(
        "no detectable difference with 6 seeds: the observed gap, 0.1 points, is smaller than "
        "the seed-to-seed spread (sd of the paired differences 0.5 points)"
    )
    assert c.seeds_needed == seeds_for_rule(d.mean(), d.std(ddof=1)) > 100
    assert c.seeds_needed >= seeds_needed(
        d.mean(), d.std(ddof=1)
    )  # the normal approximation is optimistic
    assert f"about {c.seeds_needed} seeds would be needed" in c.verdict


def test_identical_results_and_missing_pairs():
    same = compare({0: 0.7, 1: 0.8}, {0: 0.7, 1: 0.8})
    assert same.verdict == "no difference: identical val/acc on all 2 seeds"
    assert compare({0: 0.7}, {1: 0.8}).verdict.startswith("not compared")
    # only the seeds both arms finished are paired
    assert compare({0: 0.7, 1: 0.8, 2: 0.9}, {1: 0.8, 2: 0.9, 3: 0.1}).seeds == (1, 2)


def test_pure_noise_is_rarely_called_a_difference():
    rng = np.random.default_rng(0)
    false_alarms = 0
    trials = 150
    for _ in range(trials):
        n = int(rng.integers(6, 11))
        b = dict(enumerate(rng.normal(0.8, 0.01, n)))
        v = dict(enumerate(rng.normal(0.8, 0.01, n)))
        false_alarms += compare(b, v, n_resamples=999).detected
    assert false_alarms / trials <= 0.08  # alpha = 0.05, plus sampling slack


def test_a_consistent_gap_that_is_not_claimed_is_not_called_noise():
    # three seeds, all 30 points apart: the t-interval excludes 0, the sign-flip test cannot
    # reach p < 0.05; the verdict must say the gap is consistent and why it is not claimed
    b = {0: 0.40, 1: 0.43, 2: 0.38}
    v = {0: 0.10, 1: 0.11, 2: 0.10}
    c = compare(b, v, names=("correct", "stale"))
    assert not c.detected and c.t_ci[1] < 0
    assert c.verdict.startswith("no detectable difference with 3 seeds by the study's rule")
    assert "stale is lower by 30.0 points, 3/3 seeds agree" in c.verdict
    assert "smallest possible p = 0.25): run at least 6 seeds" in c.verdict
    assert "noise" not in c.verdict
    # six seeds, five agreeing: t-interval excludes 0 but p = 4/64 -> borderline, not noise
    b6 = {s: 0.30 for s in range(6)}
    v6 = {s: 0.30 - d for s, d in enumerate((0.03, 0.02, 0.04, 0.025, 0.035, -0.001))}
    c6 = compare(b6, v6)
    hi = c6.t_ci[1]
    assert not c6.detected and hi < 0 and c6.p_value >= 0.05
    assert "borderline" in c6.verdict and "noise" not in c6.verdict


def test_a_negligible_gap_does_not_quote_a_huge_seed_count():
    b = {s: 0.30 + 0.02 * (-1) ** s for s in range(6)}
    v = {s: b[s] + 0.02 * (-1) ** s + 0.0001 for s in range(6)}
    c = compare(b, v)
    assert not c.detected and c.seeds_needed is not None and c.seeds_needed > 1000
    assert "more than 1,000 seeds would be needed" in c.verdict
    assert str(c.seeds_needed) not in c.verdict


def test_a_verdict_writes_differences_in_the_metrics_own_unit():
    from normlab.report.stats import Unit

    base = {s: 0.020 + 0.001 * s for s in range(8)}
    shifted = {s: v + 0.015 + 0.0005 * (s % 3) for s, v in base.items()}
    shift = compare(base, shifted, metric="estimation shift", names=("bn", "xbn"), unit=Unit(""))
    assert shift.detected and shift.verdict.startswith("xbn is higher than bn by 0.0154 (8/8")
    assert "points" not in shift.verdict
    acc = compare(base, shifted, names=("bn", "xbn"))  # accuracies: points
    assert acc.verdict.startswith("xbn is higher than bn by 1.5 points")


def test_a_constant_gap_gets_no_zero_width_interval():
    b = {s: 0.40 + 0.01 * s for s in range(6)}
    v = {s: x + 0.05 for s, x in b.items()}  # exactly 5 points better on every seed
    c = compare(b, v, names=("bn", "gn"))
    assert math.isnan(c.t_ci[0]) and math.isnan(c.bootstrap_ci[0]) and not c.detected
    assert c.verdict.startswith("not claimed: gn is higher by exactly 5.0 points on every one")
