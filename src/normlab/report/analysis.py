"""From runs to numbers: per-arm summaries over seeds and the comparisons with the baseline.

Only completed runs enter the accuracy statistics. A diverged run has no meaningful final
accuracy; it is counted per arm and listed, and the report says when an arm lost seeds to
divergence (excluding them flatters that arm). Comparisons pair runs by seed, within a group.

The family whose error is controlled (:mod:`normlab.report.family`) is every final-epoch
comparison; best-epoch comparisons are descriptive (:data:`TESTED`).

Where every run of both arms kept its per-image predictions, a comparison also gets the
interval that resamples the validation images (or, with one seed, McNemar's test):
:func:`images_of`. Whether the seeds share one split ("crossed") or each drew its own
("nested") is read from the runs' validation-set ids, not assumed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from normlab.report.family import FamilyResult, Member, Values, adjust
from normlab.report.stats import (
    IMAGES_CROSSED,
    IMAGES_NESTED,
    Comparison,
    Summary,
    as_descriptive,
    compare,
    in_family,
    summarize,
    with_images,
    without_images,
)

if TYPE_CHECKING:  # only annotations: judging numbers needs no run store (nor torch)
    from normlab.report.data import RunRecord, StudyData

METRICS: dict[str, tuple[str, str]] = {
    # name -> (summary.json key, text)
    "final": ("final/val/acc", "final-epoch validation accuracy"),
    "best": (
        "best/val/acc",
        "best-epoch validation accuracy (optimistic: the epoch is picked on the validation set)",
    ),
}
TESTED = "final"
"""The metric whose comparisons form the family the report controls; the others are descriptive
(best-epoch accuracy picks its epoch on the validation set)."""


@dataclass
class ArmStats:
    """One group x variant over its seeds."""

    group: str | None
    variant: str
    description: str
    runs: list[RunRecord]
    final: Summary
    best: Summary
    best_epoch: Summary
    wall_seconds: Summary
    images_per_s: Summary
    values: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> seed -> value

    @property
    def arm(self) -> str:
        return f"{self.group}/{self.variant}" if self.group else self.variant

    def count(self, status: str) -> int:
        return sum(1 for r in self.runs if r.status == status)

    @property
    def n_val(self) -> dict[int, int]:
        return {r.seed: r.n_val for r in self.runs if r.n_val}


@dataclass
class GroupComparison:
    group: str | None
    metric: str
    comparison: Comparison


@dataclass
class Analysis:
    study: StudyData
    arms: list[ArmStats]
    comparisons: list[GroupComparison]
    family: FamilyResult | None = None

    def arm(self, group: str | None, variant: str) -> ArmStats:
        for a in self.arms:
            if a.group == group and a.variant == variant:
                return a
        raise KeyError((group, variant))

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.study.runs:
            out[r.status] = out.get(r.status, 0) + 1
        return out


def _throughput(run: RunRecord) -> float:
    values = [row.get("images_per_s") for row in run.rows]
    finite = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def arm_stats(study: StudyData, group: str | None, variant: str) -> ArmStats:
    runs = study.arm_runs(group, variant)
    done = [r for r in runs if r.status == "completed"]
    values: dict[str, dict[int, float]] = {}
    for metric, (key, _) in METRICS.items():
        values[metric] = {
            r.seed: float(r.summary[key])
            for r in done
            if isinstance(r.summary.get(key), int | float)
        }
    return ArmStats(
        group=group,
        variant=variant,
        description=study.spec.variant(variant).description,
        runs=runs,
        final=summarize(list(values["final"].values())),
        best=summarize(list(values["best"].values())),
        best_epoch=summarize(
            [float(r.summary["best/epoch"]) for r in done if r.summary.get("best/epoch")]
        ),
        wall_seconds=summarize(
            [
                float(r.summary["wall_seconds"])
                for r in done
                if r.summary.get("wall_seconds") is not None
            ]
        ),
        images_per_s=summarize([_throughput(r) for r in done]),
        values=values,
    )


def analyze(study: StudyData, *, seed: int = 0) -> Analysis:
    """Summaries of every arm and, within each group, every variant against the baseline on
    each metric of :data:`METRICS`, then the spec's extra ``comparisons`` pairs (variant against
    its named reference), in the spec's order."""
    spec = study.spec
    arms = [arm_stats(study, g, v) for g in spec.group_names for v in spec.variant_names]
    comparisons = []
    for group in spec.group_names:
        in_group = {a.variant: a for a in arms if a.group == group}
        pairs = [(v, spec.baseline) for v in spec.variant_names if v != spec.baseline]
        for variant, reference in [*pairs, *spec.comparisons]:
            ref, arm = in_group[reference], in_group[variant]
            for metric in METRICS:
                n_val: dict[int, int] = {**ref.n_val, **arm.n_val}
                c = compare(
                    ref.values[metric],
                    arm.values[metric],
                    metric=f"{metric} val acc",
                    names=(reference, variant),
                    n_val=n_val or None,
                    seed=seed,
                )
                comparisons.append(
                    GroupComparison(group, metric, images_of(c, ref, arm, metric, seed))
                )
    family = _judge_family(arms, comparisons, seed=seed)
    return Analysis(study=study, arms=arms, comparisons=comparisons, family=family)


def images_of(c: Comparison, ref: ArmStats, arm: ArmStats, which: str, seed: int = 0) -> Comparison:
    """``c`` with its per-image statistics from the runs' ``which`` ("final" or "best") model,
    or with the reason they are not available: a run of either arm without usable predictions,
    or paired runs that held out different images."""
    if c.n == 0:
        return c
    correct: list[dict[int, Any]] = [{}, {}]  # baseline, variant: seed -> per-image hits
    split: dict[int, set[str]] = {s: set() for s in c.seeds}  # seed -> validation-set ids
    why: list[str] = []  # what is wrong with the predictions of runs that have them
    older = 0  # runs without predictions.npz
    for side, a in enumerate((ref, arm)):
        by_seed = {r.seed: r for r in a.runs if r.status == "completed"}
        for s in c.seeds:
            run = by_seed[s]
            hits, reason = run.image_correctness(which)
            if hits is None and run.predictions is None and not run.predictions_error:
                older += 1
            elif hits is None:
                why.append(reason)
            correct[side][s] = hits
            split[s].add(run.predictions.val_id if run.predictions is not None else "")
    if why or older:
        note = why[0] if why else "runs made before normlab kept predictions"
        return without_images(c, f"not available: {note} ({len(why) + older} of {2 * c.n} runs)")
    for s, ids in split.items():
        if len(ids) != 1 or "" in ids:
            return without_images(
                c, f"not available: the runs with seed {s} do not record the same held-out images"
            )
    distinct = len({ids.pop() for ids in split.values()})
    if distinct == 1:
        design = IMAGES_CROSSED
    elif distinct == c.n:
        design = IMAGES_NESTED
    else:
        return without_images(c, "not available: some seeds share a validation split, others not")
    return with_images(c, correct[0], correct[1], design=design, seed=seed)


def _judge_family(
    arms: list[ArmStats], comparisons: list[GroupComparison], *, seed: int
) -> FamilyResult:
    """Judge the tested comparisons as one family (in place) and mark the rest descriptive;
    returns the family's result."""
    tested = [gc for gc in comparisons if gc.metric == TESTED]
    values = {(a.group, a.variant): a.values[TESTED] for a in arms}
    result = judge_family(values, tested, seed=seed)
    for gc in comparisons:
        if gc.metric != TESTED:
            gc.comparison = as_descriptive(gc.comparison)
    return result


def judge_family(
    values: Values, family: Sequence[GroupComparison], *, seed: int = 0
) -> FamilyResult:
    """Judge ``family`` (in place) as comparisons whose family-wise error is controlled.

    ``values``: (group, arm) -> seed -> value, the numbers the comparisons were computed from.
    The p-values are adjusted together (:func:`normlab.report.family.adjust`); each comparison
    with a finite adjusted p (at least 2 common seeds) is then judged on it, as one of that
    many (:func:`normlab.report.stats.in_family`). A study report calls this once, on its
    final-epoch comparisons; ``normlab compare`` once per metric.
    """
    members = [Member(gc.group, gc.comparison.variant, gc.comparison.baseline) for gc in family]
    result = adjust(values, members, seed=seed)
    for gc, p_adj in zip(family, result.adjusted, strict=True):
        if math.isfinite(p_adj):
            gc.comparison = in_family(gc.comparison, p_adj, result.size)
    return result


def fmt_pct(x: float, digits: int = 2) -> str:
    """A fraction as a percentage string; an en dash for NaN."""
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}"


def fmt_num(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"
