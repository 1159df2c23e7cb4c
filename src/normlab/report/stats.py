"""The statistics of a study report, from scipy; and the verdicts that put them in words.

Conventions:

* Differences are ``variant - baseline`` in the metric's own unit (:class:`Unit`): accuracies
  are fractions in [0, 1] reported in *points* (percentage points, 100 x the fraction); any
  other metric (an estimation shift, a loss) is reported as it is, never called "points".
* No spread, no interval: an arm whose seeds all give the same value, or a comparison whose
  paired differences are all equal, gets no interval (NaN) and says so, instead of an
  interval of width 0 that would claim a precision the seeds cannot give.
* Standard deviations are sample standard deviations (``ddof=1``); confidence intervals are
  two-sided at ``confidence`` (0.95).
* Per variant: the mean over seeds with a t-interval (``scipy.stats.t.interval``; assumes the
  seed-to-seed values are roughly normal).
* Per comparison, on the seeds both arms finished (*paired*: same seed, hence same data split,
  initialisation seed and batch order): the mean paired difference; a paired t-interval
  (``scipy.stats.ttest_rel``); a paired bootstrap interval (``scipy.stats.bootstrap``, BCa;
  with under ~10 seeds bootstrap intervals are too narrow, so the verdict never rests on it
  alone); a sign-flip permutation test (``scipy.stats.permutation_test`` with
  ``permutation_type='samples'``: under "no difference" each pair's two values are
  exchangeable; exact enumeration of all 2^n sign flips when n is small). With n seeds the
  smallest two-sided p-value the sign-flip test can give is ``2 / 2^n``: 5 seeds can never
  reach p < 0.05, 6 can.
* A difference is *detected* only when the sign-flip p-value is below ``alpha`` **and** both
  intervals exclude zero. Anything else is "no detectable difference", said together with how
  the gap compares with the seed-to-seed spread and roughly how many seeds would detect it.
  When the paired t-interval alone excludes zero (a gap consistent in sign, e.g. on every one
  of 3 seeds, or a borderline sign-flip p), the verdict says the gap is consistent and what
  keeps it from being claimed (too few seeds for the sign-flip test, or its p-value), instead
  of calling it noise.
* Seeds needed: for the rule actually used (:func:`normlab.report.power.seeds_for_rule`: the
  sign-flip test at the family's level and the t-interval, simulated up to 12 seeds, noncentral
  t beyond). Assumes the observed gap is the true one and the sd of the paired differences
  stays as observed (both are uncertain with few seeds). :func:`seeds_needed` keeps the normal
  approximation, which is optimistic at small n.
* One seed per arm: no seed-to-seed variance can be estimated, so no difference can be
  detected, and the verdict says so. The binomial view is added, which accounts only for the
  sampling of validation images: with both runs' per-image predictions, McNemar's exact test
  (:func:`mcnemar`: both models saw the same images, so only the images on which they disagree
  carry information); for runs made before normlab kept predictions, when the validation-set
  size is known, Fisher's exact test on the two correct/incorrect counts
  (``scipy.stats.fisher_exact``; it treats the two accuracies as independent samples).
* Validation-image sampling (:func:`two_way_bootstrap_ci`, from per-image predictions): the
  seed-only intervals above treat the validation images as fixed; beside them the report gives
  a percentile interval that also resamples the images (see that function for the scheme).
  It is descriptive: the claim rule above does not use it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import stats

from normlab.report.power import seeds_for_rule

ALPHA = 0.05
POWER = 0.8
CONFIDENCE = 0.95
N_RESAMPLES = 9999


@dataclass(frozen=True)
class Unit:
    """How a metric's differences are written: ``scale`` times the value, then ``name``."""

    name: str  # "points", or the metric's own unit ("" when it has none)
    scale: float = 1.0
    digits: str = ".3g"  # format of one amount

    def amount(self, x: float, signed: bool = False) -> str:
        return format(self.scale * x, ("+" if signed else "") + self.digits)

    def text(self, x: float, signed: bool = False) -> str:
        """``x`` with its unit: ``2.1 points``, ``+0.015``."""
        return f"{self.amount(x, signed)} {self.name}".rstrip()


POINTS = Unit("points", 100.0, ".1f")
"""Accuracies (fractions in [0, 1]) in percentage points."""


@dataclass(frozen=True)
class Summary:
    """Mean, sd and t-interval of one quantity over seeds (NaN where n is too small, and
    where every seed gives the same value: ``constant``)."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    confidence: float = CONFIDENCE
    constant: bool = False  # n >= 2 equal values: no spread, so no interval


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, sample sd (ddof=1) and the t-interval of the mean of ``values``.

    n = 0: all NaN. n = 1: the mean only (no spread can be estimated). Zero spread (every
    value equal): no interval either, and ``constant`` says why.
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    nan = float("nan")
    if n == 0:
        return Summary(0, nan, nan, nan, nan, confidence)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, nan, nan, nan, confidence)
    sd = float(x.std(ddof=1))
    if sd == 0.0:
        return Summary(n, mean, 0.0, nan, nan, confidence, constant=True)
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=sd / math.sqrt(n))
    return Summary(n, mean, sd, float(low), float(high), confidence)


def min_sign_flip_p(n: int) -> float:
    """The smallest two-sided p-value an exact sign-flip test on ``n`` pairs can give."""
    return min(1.0, 2.0 / 2.0**n) if n >= 1 else 1.0


def min_seeds_for(alpha: float = ALPHA) -> int:
    """The fewest pairs for which the two-sided sign-flip test can reach p < ``alpha``."""
    n = 1
    while min_sign_flip_p(n) >= alpha:
        n += 1
    return n


def seeds_needed(
    diff: float, sd_diff: float, alpha: float = ALPHA, power: float = POWER
) -> int | None:
    """Pairs (seeds) needed to detect a true paired difference ``diff`` with paired-difference
    sd ``sd_diff`` (normal approximation, see the module docstring); None when ``diff`` is 0
    or either number is unknown."""
    if not (math.isfinite(diff) and math.isfinite(sd_diff)) or diff == 0:
        return None
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    n = math.ceil((z * sd_diff / abs(diff)) ** 2)
    return max(n, min_seeds_for(alpha))


def _mean_diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x - y, axis=axis)


def sign_flip_p(
    variant: Sequence[float] | Any,
    baseline: Sequence[float] | Any,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> float:
    """Two-sided sign-flip permutation p-value of the mean paired difference (scipy's
    ``permutation_test``, ``permutation_type='samples'``; exact for 2^n <= n_resamples)."""
    x = np.asarray(variant, dtype=np.float64)
    y = np.asarray(baseline, dtype=np.float64)
    if np.all(x == y):
        return 1.0
    res = stats.permutation_test(
        (x, y),
        _mean_diff,
        permutation_type="samples",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    return float(min(1.0, res.pvalue))


def _paired(
    variant: Sequence[float] | Any, baseline: Sequence[float] | Any
) -> tuple[np.ndarray, np.ndarray, tuple[float, float] | None]:
    """Both samples as float64 arrays, and the interval when none can be estimated: NaN below
    two pairs, and NaN when every paired difference is equal (no spread to estimate from)."""
    x = np.asarray(variant, dtype=np.float64)
    y = np.asarray(baseline, dtype=np.float64)
    d = x - y
    if d.size < 2 or np.all(d == d[0]):
        return x, y, (float("nan"), float("nan"))
    return x, y, None


def paired_bootstrap_ci(
    variant: Sequence[float] | Any,
    baseline: Sequence[float] | Any,
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """BCa bootstrap interval of the mean paired difference (scipy's ``bootstrap`` with
    ``paired=True``); NaN below 2 pairs and when every difference is equal."""
    x, y, settled = _paired(variant, baseline)
    if settled is not None:
        return settled
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples at tiny n: reported as NaN
        res = stats.bootstrap(
            (x, y),
            _mean_diff,
            paired=True,
            vectorized=True,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="BCa",
            rng=np.random.default_rng(seed),
        )
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def paired_t_ci(
    variant: Sequence[float] | Any,
    baseline: Sequence[float] | Any,
    *,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """The paired t-interval of the mean difference (``scipy.stats.ttest_rel``)."""
    x, y, settled = _paired(variant, baseline)
    if settled is not None:
        return settled
    ci = stats.ttest_rel(x, y).confidence_interval(confidence_level=confidence)
    return (float(ci.low), float(ci.high))


@dataclass(frozen=True)
class Binomial:
    """Two accuracies as counts of correct validation images, and Fisher's exact test."""

    correct_a: int
    correct_b: int
    n_a: int
    n_b: int
    p_value: float


def two_proportions(acc_a: float, n_a: int, acc_b: float, n_b: int) -> Binomial:
    """Fisher's exact test of two accuracies measured on ``n_a`` and ``n_b`` images."""
    ka, kb = round(acc_a * n_a), round(acc_b * n_b)
    p = stats.fisher_exact([[ka, n_a - ka], [kb, n_b - kb]]).pvalue
    return Binomial(ka, kb, n_a, n_b, float(p))


@dataclass(frozen=True)
class Comparison:
    """One variant against the baseline on one metric, over the seeds both finished."""

    metric: str
    baseline: str
    variant: str
    seeds: tuple[int, ...]
    baseline_mean: float
    variant_mean: float
    diff: float  # mean of (variant - baseline), as a fraction
    sd_diff: float  # sample sd of the paired differences (NaN for n < 2)
    t_ci: tuple[float, float]
    bootstrap_ci: tuple[float, float]
    p_value: float  # two-sided sign-flip permutation p (NaN for n < 2)
    p_min: float  # the smallest p the test could give with these seeds
    wins: int  # seeds on which the variant is higher
    losses: int  # seeds on which it is lower
    seeds_needed: int | None
    binomial: Binomial | None
    detected: bool
    verdict: str
    alpha: float = ALPHA
    confidence: float = CONFIDENCE
    # family-wise control (normlab.report.family): the adjusted p-value and the number of
    # comparisons in the family; None / 1 for a comparison judged on its own
    p_adjusted: float | None = None
    family_size: int = 1
    descriptive: bool = False  # reported, never claimed (not in the tested family)
    unit: Unit = POINTS  # how differences are written (points for accuracies)
    # validation-image sampling, from the runs' per-image predictions (with_images): the
    # seeds x images interval of diff; the design ("crossed": one split for all seeds,
    # "nested": a split per seed); why they are missing; McNemar's test for one seed per arm
    images_ci: tuple[float, float] | None = None
    images_design: str = ""
    images_note: str = ""
    mcnemar: McNemar | None = None

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def decision_p(self) -> float:
        """The p-value the claim rests on: family-wise adjusted when in a family."""
        return self.p_value if self.p_adjusted is None else self.p_adjusted


def compare(
    baseline: Mapping[int, float],
    variant: Mapping[int, float],
    *,
    metric: str = "val/acc",
    names: tuple[str, str] = ("baseline", "variant"),
    n_val: int | Mapping[int, int] | None = None,
    alpha: float = ALPHA,
    power: float = POWER,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    unit: Unit = POINTS,
) -> Comparison:
    """Compare ``variant`` with ``baseline`` (each: seed -> value) on their common seeds.

    ``unit``: how the verdict writes differences (:data:`POINTS` for accuracies in [0, 1]).

    ``n_val``: the validation-set size (or seed -> size), for the binomial view of a single
    pair of runs. The verdict never declares a difference on noise (module docstring).
    """
    common = tuple(sorted(set(baseline) & set(variant)))
    b = np.asarray([baseline[s] for s in common], dtype=np.float64)
    v = np.asarray([variant[s] for s in common], dtype=np.float64)
    n = len(common)
    nan = float("nan")
    d = v - b
    diff = float(d.mean()) if n else nan
    sd_diff = float(d.std(ddof=1)) if n >= 2 else nan
    t_ci = paired_t_ci(v, b, confidence=confidence)
    boot = paired_bootstrap_ci(v, b, confidence=confidence, n_resamples=n_resamples, seed=seed)
    p = sign_flip_p(v, b, n_resamples=n_resamples, seed=seed) if n >= 2 else nan
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    binomial = None
    if n == 1 and n_val is not None:
        size = n_val if isinstance(n_val, int) else n_val.get(common[0])
        if size:
            binomial = two_proportions(float(b[0]), size, float(v[0]), size)
    needed = (
        seeds_for_rule(diff, sd_diff, alpha=alpha, power=power, confidence=confidence)
        if n >= 2
        else None
    )
    comparison = Comparison(
        metric=metric,
        baseline=names[0],
        variant=names[1],
        seeds=common,
        baseline_mean=float(b.mean()) if n else nan,
        variant_mean=float(v.mean()) if n else nan,
        diff=diff,
        sd_diff=sd_diff,
        t_ci=t_ci,
        bootstrap_ci=boot,
        p_value=p,
        p_min=min_sign_flip_p(n),
        wins=wins,
        losses=losses,
        seeds_needed=needed,
        binomial=binomial,
        detected=False,
        verdict="",
        alpha=alpha,
        confidence=confidence,
        unit=unit,
    )
    return _with_verdict(comparison, power)


def _claimed(c: Comparison) -> bool:
    """The study's rule: the decision p-value below alpha and both intervals excluding 0 on
    the same side; never for a descriptive comparison."""
    t_ci, boot = c.t_ci, c.bootstrap_ci
    return bool(
        not c.descriptive
        and c.n >= 2
        and c.decision_p < c.alpha
        and all(math.isfinite(x) for x in (*t_ci, *boot))
        and (t_ci[0] > 0 or t_ci[1] < 0)
        and (boot[0] > 0 or boot[1] < 0)
        and (t_ci[0] > 0) == (boot[0] > 0)
    )


def _with_verdict(c: Comparison, power: float) -> Comparison:
    c = replace(c, detected=_claimed(c))
    return replace(c, verdict=verdict(c, power))


def in_family(c: Comparison, p_adjusted: float, size: int, power: float = POWER) -> Comparison:
    """``c`` judged as one of ``size`` comparisons whose family-wise error is controlled:
    the claim rests on ``p_adjusted``, and seeds needed are those of the rule for a family of
    ``size`` (:func:`normlab.report.power.seeds_for_rule`)."""
    needed = (
        seeds_for_rule(
            c.diff,
            c.sd_diff,
            family_size=size,
            alpha=c.alpha,
            power=power,
            confidence=c.confidence,
        )
        if c.n >= 2
        else None
    )
    return _with_verdict(
        replace(c, p_adjusted=p_adjusted, family_size=size, seeds_needed=needed), power
    )


def as_descriptive(c: Comparison, power: float = POWER) -> Comparison:
    """``c`` reported but outside the tested family: never claimed."""
    return _with_verdict(replace(c, descriptive=True), power)


def _direction(c: Comparison) -> tuple[str, int]:
    """("higher" | "lower", how many seeds agree with that direction) for the mean gap."""
    return ("higher", c.wins) if c.diff > 0 else ("lower", c.losses)


def _p_text(c: Comparison, fmt: str) -> str:
    """``sign-flip p = X``, and the family-wise adjusted p-value when ``c`` is in a family."""
    text = f"sign-flip p = {format(c.p_value, fmt)}"
    if c.p_adjusted is not None and c.family_size > 1:
        text += (
            f", adjusted for the {c.family_size} comparisons of this report "
            f"p = {format(c.p_adjusted, fmt)}"
        )
    return text


def _alpha_text(c: Comparison) -> str:
    if c.family_size > 1:
        return f"alpha = {c.alpha:g} over a family of {c.family_size}"
    return f"alpha = {c.alpha:g}"


MANY_SEEDS = 1000
"""Beyond this many seeds the verdict stops quoting the power estimate (a gap that small is
negligible next to the spread, and the estimate itself is meaningless at that scale)."""


def verdict(c: Comparison, power: float = POWER) -> str:
    """A plain-language verdict for ``c`` (see the module docstring for the rules)."""
    n, need_min = c.n, min_seeds_for(c.alpha)
    seeds = f"{n} seed" + ("s" if n != 1 else "")
    u = c.unit
    gap = u.text(abs(c.diff))
    if n == 0:
        return "not compared: no seed finished in both arms"
    if n == 1:
        text = (
            f"no detectable difference with 1 seed: one run per arm gives no estimate of the "
            f"seed-to-seed variation, so a gap of {gap} ({c.variant} {u.amount(c.variant_mean)} vs "
            f"{c.baseline} {u.amount(c.baseline_mean)}) cannot be told from noise"
        )
        if c.mcnemar is not None:
            text += _mcnemar_text(c, c.mcnemar)
        elif c.binomial is not None:
            bn = c.binomial
            images = abs(bn.correct_b - bn.correct_a)
            text += (
                f"; it is {images} of {bn.n_a} validation images ({bn.correct_b} vs "
                f"{bn.correct_a} correct)"
            )
            if bn.p_value >= c.alpha:
                text += (
                    f", within the sampling noise of the validation set alone (Fisher's exact "
                    f"test p = {bn.p_value:.2f})"
                )
            else:
                text += (
                    f", more than validation sampling alone explains (Fisher's exact test "
                    f"p = {bn.p_value:.2g}), but seed-to-seed variation, usually larger, is "
                    "unknown"
                )
        return text + f". Run at least {need_min} seeds per arm to compare them."
    if c.sd_diff == 0 and c.diff == 0:
        return f"no difference: identical {c.metric} on all {seeds}"
    if c.sd_diff == 0:
        direction, _ = _direction(c)
        return (
            f"not claimed: {c.variant} is {direction} by exactly {gap} on every one of the "
            f"{seeds}, so the seeds show no spread to estimate an interval from (such a "
            f"constant gap usually means a deterministic effect or a broken arm: check the "
            f"runs); {_p_text(c, '.2g')}"
        )
    if c.descriptive:
        direction, agree = _direction(c)
        return (
            f"descriptive, not tested (the best epoch is picked on the validation set, so this "
            f"comparison is outside the family the report controls): {c.variant} is "
            f"{direction} by {gap}, {agree}/{n} seeds agree, raw sign-flip p = {c.p_value:.2g}"
        )
    if c.detected:
        direction, agree = _direction(c)
        return (
            f"{c.variant} is {direction} than {c.baseline} by {gap} "
            f"({agree}/{n} seeds agree; paired {c.confidence:.0%} CI {u.amount(c.t_ci[0], True)} to "
            f"{u.text(c.t_ci[1], True)}; {_p_text(c, '.3g')})"
        )
    lo, hi = c.t_ci
    if math.isfinite(lo) and math.isfinite(hi) and (lo > 0 or hi < 0):
        # Consistent in sign and size (the t-interval excludes 0), yet not claimed: say so
        # rather than calling it noise.
        direction, agree = _direction(c)
        parts = [
            f"no detectable difference with {seeds} by the study's rule, though the gap is "
            f"consistent: {c.variant} is {direction} by {gap}, {agree}/{n} seeds agree and the "
            f"paired {c.confidence:.0%} t-interval, {u.amount(lo, True)} to {u.text(hi, True)}, "
            "excludes 0"
        ]
        if c.p_min >= c.alpha:
            parts.append(
                f"; but with {seeds} the sign-flip test cannot reach p < {c.alpha:g} at all "
                f"(smallest possible p = {c.p_min:.3g}): run at least {need_min} seeds to "
                "settle it"
            )
        else:
            parts.append(
                f"; but {_p_text(c, '.2g')} (the claim needs < {c.alpha:g}), so it is borderline"
            )
            if c.seeds_needed is not None and c.seeds_needed <= MANY_SEEDS:
                parts.append(
                    f": about {c.seeds_needed} seeds would claim a gap this size "
                    f"{int(power * 100)}% of the time under this rule, if it is real"
                )
        return "".join(parts)
    parts = [f"no detectable difference with {seeds}: the observed gap, {gap}"]
    if c.sd_diff > 0 and abs(c.diff) < c.sd_diff:
        parts.append(
            f", is smaller than the seed-to-seed spread (sd of the paired differences "
            f"{u.text(c.sd_diff)})"
        )
    else:
        parts.append(
            f", is not consistent enough across seeds to rule out noise (sd of the paired "
            f"differences {u.text(c.sd_diff)}; {_p_text(c, '.2g')})"
        )
    if c.p_min >= c.alpha:
        parts.append(
            f"; with {seeds} the sign-flip test cannot reach p < {c.alpha:g} at all (smallest "
            f"possible p = {c.p_min:.3g})"
        )
    if c.seeds_needed is None:
        parts.append("")
    elif c.seeds_needed > MANY_SEEDS:
        parts.append(
            f"; more than {MANY_SEEDS:,} seeds would be needed to detect a gap this size: it "
            "is negligible next to the seed-to-seed spread"
        )
    elif c.seeds_needed > n:
        parts.append(
            f"; about {c.seeds_needed} seeds would be needed to detect a gap this size "
            f"({int(power * 100)}% power under this report's rule, {_alpha_text(c)}, if the "
            "spread stays as observed)"
        )
    else:
        parts.append(
            f"; a real gap this size would usually be detected with {seeds} "
            f"(about {c.seeds_needed} would do at {int(power * 100)}% power), so it is most "
            "likely noise"
        )
    return "".join(parts)


# -- validation-image sampling: from per-image predictions ---------------------------------------


@dataclass(frozen=True)
class McNemar:
    """Two models' per-image correctness on the same validation images, and McNemar's exact
    test: under "equally accurate" each image that one model alone gets right is equally likely
    to be either's, so ``variant_only ~ Binomial(variant_only + baseline_only, 1/2)``."""

    correct_a: int  # images the baseline gets right
    correct_b: int  # images the variant gets right
    n: int  # images
    variant_only: int  # right by the variant, wrong by the baseline
    baseline_only: int  # right by the baseline, wrong by the variant
    p_value: float  # two-sided exact binomial p (scipy.stats.binomtest); 1 with no discordance


def mcnemar(variant_correct: Any, baseline_correct: Any) -> McNemar:
    """McNemar's exact test on two boolean per-image correctness arrays of the same images."""
    v = np.asarray(variant_correct, dtype=bool)
    b = np.asarray(baseline_correct, dtype=bool)
    if v.shape != b.shape or v.ndim != 1:
        raise ValueError(f"mcnemar: per-image arrays of one shape needed, got {v.shape}, {b.shape}")
    only_v, only_b = int(np.count_nonzero(v & ~b)), int(np.count_nonzero(b & ~v))
    discordant = only_v + only_b
    p = 1.0 if discordant == 0 else float(stats.binomtest(only_v, discordant, 0.5).pvalue)
    return McNemar(
        correct_a=int(np.count_nonzero(b)),
        correct_b=int(np.count_nonzero(v)),
        n=int(v.size),
        variant_only=only_v,
        baseline_only=only_b,
        p_value=min(1.0, p),
    )


_CHUNK = 256  # bootstrap resamples drawn at a time (bounds memory at ~ _CHUNK x images)
IMAGE_RESAMPLES = 1999
"""Resamples of the seeds x images bootstrap: each costs a draw per image (or per group of
interchangeable images); the percentile ends then carry a Monte Carlo error of about 0.06
bootstrap standard deviations."""


def two_way_bootstrap_ci(
    variant: Sequence[Any],
    baseline: Sequence[Any],
    *,
    same_images: bool = True,
    confidence: float = CONFIDENCE,
    n_resamples: int = IMAGE_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean paired difference ``variant - baseline``
    that resamples the validation images as well as the seeds.

    ``variant[k]`` and ``baseline[k]`` are per-image values (correctness, 0/1) of the two arms'
    runs with the k-th common seed, on the same images in the same order (the pairing: both
    models saw exactly these images). The statistic is the mean over seeds and images of the
    per-image difference ``D[s, i]``, i.e. the mean paired accuracy difference.

    ``same_images=True`` (one split for every seed; crossed seeds x images): each resample
    draws n seeds with replacement and, independently, m image indices with replacement, and
    takes the mean of ``D`` over that seeds x images block. The same image indices serve every
    seed and both arms, since all saw the same images: so the interval carries the image-to-
    image variation of the gap, which the seed-only intervals hold fixed, besides the seed-to-
    seed variation (Owen 2007, "The pigeonhole bootstrap"; Bouthillier et al., MLSys 2021, on
    accounting for the data sampling). Its variance is exactly ``mean(a^2)/n + mean(b^2)/m +
    mean(e^2)/(nm)`` for the two-way decomposition ``D = mu + a_s + b_i + e_si`` of the
    observed table: about the true variance plus ``2 var(e)/(nm)``, so it errs on the wide side
    where models differ image by image from seed to seed (churn), and, like every bootstrap
    over few seeds, on the narrow side for the seed part (a factor (n-1)/n). The test suite
    checks coverage by simulation: near 95% where seed and image effects dominate, above where
    churn does.

    ``same_images=False`` (the split redrawn with each seed: images nested in seeds): each
    seed's mean difference already varies with its own draw of images, so only the seeds are
    resampled (resampling images within seeds as well would count their variation twice;
    Davison & Hinkley 1997, section 3.8).

    NaN below two seeds, and NaN when every per-image difference is equal (no variation to
    resample: the same policy as the seed-only intervals; :func:`with_images` says why). Numpy,
    vectorised, seeded by ``seed``.
    """
    rows = _differences(variant, baseline)
    n = len(rows)
    nan = float("nan")
    if n < 2 or any(r.size == 0 for r in rows):
        return nan, nan
    if _constant(rows):
        return nan, nan
    draws = _two_way_draws(rows, same_images, n_resamples, np.random.default_rng(seed))
    alpha = 1 - confidence
    low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _differences(variant: Sequence[Any], baseline: Sequence[Any]) -> list[np.ndarray]:
    """Each seed's per-image differences ``variant - baseline``, as flat float64 arrays."""
    return [
        np.asarray(v, dtype=np.float64).reshape(-1) - np.asarray(b, dtype=np.float64).reshape(-1)
        for v, b in zip(variant, baseline, strict=True)
    ]


def _constant(rows: list[np.ndarray]) -> bool:
    """Whether every per-image difference of every seed is the same number."""
    first = rows[0][0]
    return all(bool(np.all(r == first)) for r in rows)


CONSTANT_IMAGES_NOTE = (
    "no interval: every per-image difference is the same on every seed and image, so there is "
    "no variation to resample"
)


def _two_way_draws(
    rows: list[np.ndarray], same_images: bool, n_resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """The bootstrap distribution of :func:`two_way_bootstrap_ci` (``rows``: each seed's
    per-image differences)."""
    n = len(rows)
    if not same_images:
        seed_means = np.asarray([r.mean() for r in rows])
        draws = seed_means[rng.integers(0, n, (n_resamples, n))].mean(axis=1)
    else:
        if any(r.shape != rows[0].shape for r in rows):
            raise ValueError("two_way_bootstrap_ci: same_images needs one image count per seed")
        # Images with the same column of differences over the seeds are interchangeable:
        # resample them as groups (how many draws land in each group is multinomial with the
        # group sizes), which is the same bootstrap with far fewer random numbers.
        patterns, group = np.unique(np.stack(rows).T, axis=0, return_inverse=True)  # [P, n], [m]
        group = group.reshape(-1)
        sizes = np.bincount(group, minlength=len(patterns))
        m, n_groups = int(sizes.sum()), len(patterns)
        draws = np.empty(n_resamples, dtype=np.float64)
        for start in range(0, n_resamples, _CHUNK):
            k = min(_CHUNK, n_resamples - start)
            # how often each seed / group of images is drawn in each of k resamples
            seed_w = _counts(rng.integers(0, n, (k, n)), n)  # [k, n]
            if 4 * n_groups < m:  # the cheaper way to draw them (same distribution)
                group_w = rng.multinomial(m, sizes / m, size=k).astype(np.float64)  # [k, P]
            else:
                group_w = _counts(group[rng.integers(0, m, (k, m))], n_groups)
            per_seed = group_w @ patterns  # [k, n]: each seed's sum over the resampled images
            draws[start : start + k] = (seed_w * per_seed).sum(axis=1) / (n * m)
    return draws


def _counts(idx: np.ndarray, size: int) -> np.ndarray:
    """Per row of ``idx`` ([k, draws] indices into ``range(size)``), how often each index
    occurs: [k, size] (float64, for the matrix products)."""
    k = idx.shape[0]
    flat = (idx + size * np.arange(k)[:, None]).reshape(-1)
    return np.bincount(flat, minlength=k * size).reshape(k, size).astype(np.float64)


IMAGES_CROSSED = "crossed"  # one validation split for every seed
IMAGES_NESTED = "nested"  # the split redrawn with each seed


def with_images(
    c: Comparison,
    baseline: Mapping[int, Any],
    variant: Mapping[int, Any],
    *,
    design: str,
    confidence: float = CONFIDENCE,
    n_resamples: int = IMAGE_RESAMPLES,
    seed: int = 0,
    power: float = POWER,
) -> Comparison:
    """``c`` with what the per-image correctness of its runs adds (each mapping: seed ->
    boolean per-image array, for at least ``c.seeds``; ``design``: :data:`IMAGES_CROSSED` or
    :data:`IMAGES_NESTED`): the seeds x images interval (:func:`two_way_bootstrap_ci`) from two
    seeds on, McNemar's test (:func:`mcnemar`) with one."""
    if design not in (IMAGES_CROSSED, IMAGES_NESTED):
        raise ValueError(f"with_images: design must be crossed or nested, got {design!r}")
    if c.n == 0:
        return c
    if c.n == 1:
        only = c.seeds[0]
        return _with_verdict(
            replace(c, mcnemar=mcnemar(variant[only], baseline[only]), images_design=design),
            power,
        )
    variant_rows = [variant[s] for s in c.seeds]
    baseline_rows = [baseline[s] for s in c.seeds]
    ci = two_way_bootstrap_ci(
        variant_rows,
        baseline_rows,
        same_images=design == IMAGES_CROSSED,
        confidence=confidence,
        n_resamples=n_resamples,
        seed=seed,
    )
    if not math.isfinite(ci[0]):
        diffs = _differences(variant_rows, baseline_rows)
        if all(d.size for d in diffs) and _constant(diffs):
            return replace(c, images_design=design, images_note=CONSTANT_IMAGES_NOTE)
    return replace(c, images_ci=ci, images_design=design)


def without_images(c: Comparison, note: str) -> Comparison:
    """``c`` with the reason its per-image statistics are not available."""
    return replace(c, images_note=note)


def _mcnemar_text(c: Comparison, mc: McNemar) -> str:
    """The one-seed verdict's image-by-image clause."""
    text = (
        f"; it is {abs(mc.correct_b - mc.correct_a)} of {mc.n} validation images "
        f"({mc.correct_b} vs {mc.correct_a} correct; {mc.variant_only} right only by "
        f"{c.variant}, {mc.baseline_only} only by {c.baseline})"
    )
    test = (
        f"McNemar's exact test on the {mc.variant_only + mc.baseline_only} images the two "
        "disagree on"
    )
    if mc.p_value >= c.alpha:
        return text + (
            f", within the sampling noise of the validation set alone ({test}, "
            f"p = {mc.p_value:.2f})"
        )
    return text + (
        f", more than validation sampling alone explains ({test}, p = {mc.p_value:.2g}), but "
        "seed-to-seed variation, usually larger, is unknown"
    )
