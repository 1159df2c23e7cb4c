"""Validation-set noise: the seeds x images bootstrap against its closed-form variance and by
simulated coverage, McNemar's test against a hand computation, and the report's use of both."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from _helpers import tiny_base
from scipy.special import expit

from normlab.report import write_report
from normlab.report.analysis import analyze
from normlab.report.data import load_study
from normlab.report.stats import (
    IMAGES_CROSSED,
    IMAGES_NESTED,
    _two_way_draws,
    compare,
    mcnemar,
    paired_bootstrap_ci,
    paired_t_ci,
    two_way_bootstrap_ci,
    with_images,
)
from normlab.report.tables import _images
from normlab.store import Predictions, RunDir
from normlab.study.runner import run_study
from normlab.study.spec import spec_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def _width(ci: tuple[float, float]) -> float:
    return ci[1] - ci[0]


def test_constant_per_image_differences_give_no_interval_and_say_why():
    """Issue 12, item 6: never an interval of width 0 (the seed-only intervals' policy)."""
    rng = np.random.default_rng(0)
    same = [rng.random(50) < 0.6 for _ in range(4)]
    assert all(np.isnan(two_way_bootstrap_ci(same, same)))
    assert all(np.isnan(two_way_bootstrap_ci(same, same, same_images=False)))
    ones, zeros = [np.ones(9)] * 3, [np.zeros(9)] * 3
    assert all(np.isnan(two_way_bootstrap_ci(ones, zeros)))  # every image, every seed: +1
    assert all(np.isnan(two_way_bootstrap_ci(same[:1], same[1:2])))  # one seed: no interval
    c = compare({0: 0.6, 1: 0.6}, {0: 0.6, 1: 0.6})
    c = with_images(c, dict(enumerate(same[:2])), dict(enumerate(same[:2])), design=IMAGES_CROSSED)
    assert c.images_ci is None and "no variation to resample" in c.images_note
    assert "no variation to resample" in _images(c, str)


def _decomposition_variance(d: np.ndarray) -> float:
    """mean(a^2)/n + mean(b^2)/m + mean(e^2)/(nm) of D = mu + a_s + b_i + e_si."""
    n, m = d.shape
    a = d.mean(1) - d.mean()
    b = d.mean(0) - d.mean()
    e = d - d.mean(1, keepdims=True) - d.mean(0, keepdims=True) + d.mean()
    return float((a**2).mean() / n + (b**2).mean() / m + (e**2).mean() / (n * m))


@pytest.mark.parametrize("kind", ["binary", "continuous"])
def test_the_two_way_bootstrap_has_the_pigeonhole_variance(kind):
    """Both ways of drawing (grouped images for a {-1, 0, 1} table with few distinct columns,
    one draw per image otherwise) give Owen's closed-form variance."""
    rng = np.random.default_rng(1)
    n, m = 4, 200
    if kind == "binary":
        d = (rng.random((n, m)) < 0.3).astype(float) - (rng.random((n, m)) < 0.2)
        d[:, :170] = 0  # most images: the two models agree on every seed
        assert 4 * len(np.unique(d.T, axis=0)) < m  # the grouped path
    else:
        d = rng.normal(size=(n, 1)) + rng.normal(size=(1, m)) + rng.normal(size=(n, m))
    draws = _two_way_draws(list(d), True, 40000, np.random.default_rng(2))
    assert draws.mean() == pytest.approx(d.mean(), abs=4 * draws.std() / 200)  # 4 MC sd
    assert draws.var() == pytest.approx(_decomposition_variance(d), rel=0.04)


def test_the_two_way_interval_covers_near_95_percent_in_a_two_way_model():
    """Seeds and images both random, little interaction: D = 0.5 + a_s + b_i + e_si."""
    rng = np.random.default_rng(3)
    n, m, reps, hits = 10, 40, 300, 0
    for r in range(reps):
        d = 0.5 + rng.normal(size=(n, 1)) + rng.normal(size=(1, m)) + 0.3 * rng.normal(size=(n, m))
        low, high = two_way_bootstrap_ci(list(d), list(np.zeros_like(d)), n_resamples=999, seed=r)
        hits += low <= 0.5 <= high
    assert 0.90 <= hits / reps <= 0.98  # Monte Carlo sd about 0.013


def _two_models(rng, z, effect, n):
    """Per-image correctness over n seeds of a baseline (logit z) and a variant (z + effect)."""
    base = rng.random((n, z.size)) < expit(z)
    var = rng.random((n, z.size)) < expit(z + effect)
    return list(var), list(base)


def test_on_correctness_data_the_interval_errs_on_the_wide_side_and_seed_only_misses():
    """Images drawn from a population, models that differ image by image and churn from seed to
    seed: the two-way interval covers the population's accuracy difference (conservatively,
    as its docstring says); the seed-only interval, which holds the images fixed, does not."""
    rng = np.random.default_rng(4)
    z_all, effect_all = rng.normal(1.0, 1.5, 200_000), rng.normal(0.2, 1.0, 200_000)
    truth = float(np.mean(expit(z_all + effect_all) - expit(z_all)))
    n, m, reps = 10, 100, 200
    two_way = seed_only = 0
    for r in range(reps):
        pick = rng.integers(0, z_all.size, m)
        var, base = _two_models(rng, z_all[pick], effect_all[pick], n)
        low, high = two_way_bootstrap_ci(var, base, n_resamples=999, seed=r)
        two_way += low <= truth <= high
        low, high = paired_t_ci(np.mean(var, 1), np.mean(base, 1))
        seed_only += low <= truth <= high
    assert two_way / reps >= 0.95
    assert seed_only / reps < 0.93


def test_it_is_wider_than_the_seed_only_interval_when_images_are_few():
    rng = np.random.default_rng(5)
    z, effect = rng.normal(0.5, 1.0, 20), rng.normal(0.3, 1.5, 20)
    # models that do not churn: every seed gets the same images right
    var = [expit(z + effect) > 0.5] * 5
    base = [expit(z) > 0.5] * 5
    seed_means = (np.mean(var, 1), np.mean(base, 1))
    # training noise: none, so the seed-only interval has nothing to estimate from (NaN)
    assert all(math.isnan(x) for x in paired_t_ci(*seed_means))
    assert _width(two_way_bootstrap_ci(var, base)) > 0.1  # 20 images: a lot
    # and with seed-to-seed churn as well
    var, base = _two_models(rng, z, effect, 5)
    seed_boot = paired_bootstrap_ci(np.mean(var, 1), np.mean(base, 1))
    assert _width(two_way_bootstrap_ci(var, base)) > _width(seed_boot)


def test_nested_images_resample_only_the_seeds():
    """Each seed held out its own images: the interval depends on the seeds' mean differences
    only, and is the percentile bootstrap of those means."""
    rng = np.random.default_rng(6)
    var = [rng.random(m) < 0.7 for m in (30, 30, 30, 30)]
    base = [rng.random(30) < 0.6 for _ in range(4)]
    got = two_way_bootstrap_ci(var, base, same_images=False, n_resamples=999, seed=7)
    means = np.asarray([v.mean() - b.mean() for v, b in zip(var, base, strict=True)])
    draws = means[np.random.default_rng(7).integers(0, 4, (999, 4))].mean(1)
    assert got == pytest.approx(tuple(np.quantile(draws, [0.025, 0.975])), abs=1e-12)
    shuffled = [rng.permutation(v) for v in var]  # the same means, other images
    again = two_way_bootstrap_ci(shuffled, base, same_images=False, n_resamples=999, seed=7)
    assert again == pytest.approx(got, abs=1e-12)
    assert two_way_bootstrap_ci(var, base, seed=7) != got  # crossed: images matter


def test_mcnemar_against_a_hand_computation():
    # 7 images only the variant gets right, 2 only the baseline, 11 both, 5 neither
    v = np.array([1] * 7 + [0] * 2 + [1] * 11 + [0] * 5, dtype=bool)
    b = np.array([0] * 7 + [1] * 2 + [1] * 11 + [0] * 5, dtype=bool)
    mc = mcnemar(v, b)
    assert (mc.variant_only, mc.baseline_only, mc.correct_b, mc.correct_a, mc.n) == (
        7,
        2,
        18,
        13,
        25,
    )
    # two-sided exact: 2 * P(X <= 2), X ~ Binomial(9, 1/2) = 2 * (1 + 9 + 36) / 512
    assert mc.p_value == pytest.approx(92 / 512, rel=1e-12)
    assert mcnemar(b, v).p_value == mc.p_value
    assert mcnemar(v, v).p_value == 1.0  # no discordant image: nothing to test


def test_one_seed_per_arm_uses_mcnemar_on_the_paired_images():
    v = np.array([1] * 7 + [0] * 2 + [1] * 11 + [0] * 5, dtype=bool)
    b = np.array([0] * 7 + [1] * 2 + [1] * 11 + [0] * 5, dtype=bool)
    c = compare({0: b.mean()}, {0: v.mean()}, names=("bn", "gn"), n_val=25)
    assert "Fisher's exact test" in c.verdict  # without predictions, as before
    c = with_images(c, {0: b}, {0: v}, design=IMAGES_CROSSED)
    assert not c.detected and c.verdict.startswith("no detectable difference with 1 seed")
    assert "Fisher" not in c.verdict
    assert "5 of 25 validation images (18 vs 13 correct; 7 right only by gn, 2 only by bn)" in (
        c.verdict
    )
    assert "McNemar's exact test on the 9 images the two disagree on, p = 0.18" in c.verdict
    far = with_images(c, {0: np.zeros(60, bool)}, {0: np.ones(60, bool)}, design=IMAGES_CROSSED)
    assert "more than validation sampling alone explains (McNemar" in far.verdict


# -- the report ------------------------------------------------------------------------------


def _study(out: Path, **data) -> Path:
    base = tiny_base(epochs=1)
    base["data"].update(data)
    spec = {
        "name": "images",
        "seeds": 2,
        "baseline": "bn",
        "base": base,
        "variants": {"bn": {"norm.name": "bn"}, "gn": {"norm.name": "gn", "norm.gn_groups": 8}},
    }
    assert run_study(spec_from_dict(spec), out, executor="serial", stream=None).ok
    return out


@pytest.fixture(scope="module")
def fixed_split(tmp_path_factory) -> Path:
    return _study(tmp_path_factory.mktemp("images") / "fixed")


def test_the_report_shows_the_seeds_x_images_interval(fixed_split):
    study = load_study(fixed_split)
    c = analyze(study).comparisons[0].comparison
    assert c.images_design == IMAGES_CROSSED and c.images_ci is not None
    correct = {
        side: {r.seed: r.image_correctness("final")[0] for r in study.arm_runs(None, side)}
        for side in ("bn", "gn")
    }
    expected = two_way_bootstrap_ci(
        [correct["gn"][s] for s in (0, 1)], [correct["bn"][s] for s in (0, 1)]
    )
    assert c.images_ci == expected
    md = Path(write_report(fixed_split)["markdown"]).read_text()
    assert "seeds × images 95% CI" in md
    assert f"[{100 * expected[0]:+.2f}, {100 * expected[1]:+.2f}]" in md
    assert "The train/validation split is drawn once (with seed 0) for every run" in md
    assert "pigeonhole" in md


def test_predictions_that_do_not_fit_are_not_used(fixed_split, tmp_path):
    out = tmp_path / "study"
    shutil.copytree(fixed_split, out)
    run = RunDir(out / "runs" / "gn" / "seed-1")
    p = run.read_predictions()
    other = Predictions.build(p.labels, p.final, p.final_epoch, p.num_classes, val_id="elsewhere")
    run.write_predictions(other)
    c = analyze(load_study(out)).comparisons[0].comparison
    assert c.images_ci is None
    assert c.images_note == (
        "not available: the runs with seed 1 do not record the same held-out images"
    )
    run.write_predictions(Predictions.build(p.labels, 1 - p.final, 1, p.num_classes))
    c = analyze(load_study(out)).comparisons[0].comparison
    assert c.images_note.startswith("not available: predictions.npz does not match summary.json")
    run.predictions_path.write_bytes(b"not a zip")  # a bad file: a note, not a crash
    md = Path(write_report(out)["markdown"]).read_text()
    assert "gn/seed-1" in md and "not a readable predictions file" in md
    assert "not available: predictions.npz unreadable (1 of 4 runs)" in md


def test_a_split_redrawn_with_each_seed_is_resampled_as_nested(tmp_path):
    out = _study(tmp_path / "nested", split_seed="run")
    study = load_study(out)
    ids = {r.seed: r.predictions.val_id for r in study.runs}
    assert ids[0] != ids[1]
    c = analyze(study).comparisons[0].comparison
    assert c.images_design == IMAGES_NESTED and c.images_ci is not None
    md = Path(write_report(out)["markdown"]).read_text()
    assert "Each seed draws its own train/validation split (data.split_seed: run)" in md


def test_a_claim_that_does_not_carry_over_to_other_images_gets_a_note():
    from normlab.report.analysis import Analysis, GroupComparison
    from normlab.report.document import images_caveats

    # 8 seeds, variant higher on every one (by 1 or 2 of 10 images, so the gap varies and has
    # an interval): claimed; but it is one or two images of 10 on each seed
    base = {s: 0.5 for s in range(8)}
    var = {s: 0.6 + 0.1 * (s % 2) for s in range(8)}
    c = compare(base, var, names=("bn", "gn"))
    assert c.detected
    hits_b = {s: np.array([1] * 5 + [0] * 5, dtype=bool) for s in range(8)}
    hits_v = {s: np.array([1] * (6 + s % 2) + [0] * (4 - s % 2), dtype=bool) for s in range(8)}
    c = with_images(c, hits_b, hits_v, design=IMAGES_CROSSED)
    assert c.detected and c.images_ci is not None and c.images_ci[0] <= 0 <= c.images_ci[1]
    analysis = Analysis(study=None, arms=[], comparisons=[GroupComparison("g", "final", c)])
    notes = images_caveats(analysis)
    assert notes == [
        f"g: gn − bn is claimed on the seeds, but its seeds × images interval, "
        f"{100 * c.images_ci[0]:+.2f} to {100 * c.images_ci[1]:+.2f} points, includes 0: it is "
        "not shown to hold beyond these validation images"
    ]
