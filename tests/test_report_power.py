"""Seeds needed for the report's rule (normlab.report.power), checked against the rule's own
functions on simulated studies rather than against the formula that produced it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from normlab.report.power import rule_power, seeds_for_rule
from normlab.report.stats import paired_t_ci, seeds_needed, sign_flip_p


def _claims(n: int, effect: float, level: float, studies: int, rng: np.random.Generator) -> float:
    hits = 0
    for _ in range(studies):
        d = rng.normal(effect, 1.0, size=n)
        lo, hi = paired_t_ci(d, np.zeros(n))
        hits += sign_flip_p(d, np.zeros(n)) < level and (lo > 0 or hi < 0)
    return hits / studies


@pytest.mark.slow
@pytest.mark.parametrize(("effect", "family"), [(1.2, 1), (1.5, 4)])
def test_the_seeds_found_give_the_power_with_the_reports_own_test(effect, family):
    n = seeds_for_rule(effect, 1.0, family_size=family)
    assert n is not None and 6 <= n <= 12
    rng = np.random.default_rng(0)
    studies = 300
    slack = 3 * math.sqrt(0.8 * 0.2 / studies)
    assert _claims(n, effect, 0.05 / family, studies, rng) >= 0.8 - slack
    assert _claims(n - 1, effect, 0.05 / family, studies, rng) < 0.8 + slack


def test_more_comparisons_need_more_seeds_and_the_normal_formula_is_optimistic():
    alone = seeds_for_rule(0.01, 0.02)
    assert alone is not None and alone >= seeds_needed(0.01, 0.02)
    twelve = seeds_for_rule(0.01, 0.02, family_size=12)
    assert twelve is not None and twelve > alone
    assert seeds_for_rule(0.0, 0.02) is None and seeds_for_rule(0.01, float("nan")) is None
    assert seeds_for_rule(1e-6, 0.02) == 1001  # beyond the search: "more than 1,000"


def test_power_is_monotone_in_seeds_and_effect():
    p = [rule_power(n, 1.0, 0.05) for n in (6, 9, 12, 20, 40)]
    assert p == sorted(p) and p[-1] > 0.99
    assert rule_power(10, 0.5, 0.05) < rule_power(10, 1.0, 0.05) < rule_power(10, 2.0, 0.05)
    assert rule_power(5, 5.0, 0.05) == 0.0  # 5 seeds: the sign-flip test cannot reach 0.05
