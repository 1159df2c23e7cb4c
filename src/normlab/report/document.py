"""Everything a report shows, gathered once; the HTML and Markdown writers only lay it out."""

from __future__ import annotations

import importlib.metadata
import math
import platform
from dataclasses import dataclass, field
from typing import Any

from normlab.config import config_to_dict, validates
from normlab.data import SPLIT_SEED_RUN
from normlab.report.analysis import Analysis, analyze
from normlab.report.budgets import Ladder, ladders
from normlab.report.data import RunRecord, StudyData
from normlab.report.family import N_RESAMPLES as FAMILY_RESAMPLES
from normlab.report.figures import (
    across_groups,
    ladder_figures,
    learning_curves,
    mechanism_figures,
    paired_seeds,
    to_png,
)
from normlab.report.stats import (
    ALPHA,
    CONFIDENCE,
    IMAGE_RESAMPLES,
    N_RESAMPLES,
    POWER,
    min_seeds_for,
)
from normlab.study.spec import spec_to_dict
from normlab.yamlio import dumps

PACKAGES = ("normlab", "torch", "numpy", "scipy", "matplotlib", "pyyaml", "jinja2", "ray")


@dataclass
class FigureEntry:
    name: str  # file stem in figures/
    title: str
    png: bytes
    section: str  # "curves" | "seeds" | "mechanisms"


@dataclass
class ReportDocument:
    study: StudyData
    analysis: Analysis
    figures: list[FigureEntry]
    mechanisms_note: str | None
    versions: dict[str, str]
    git_shas: list[str]
    spec_yaml: str
    base_config_yaml: str
    arm_overrides: list[tuple[str, dict[str, Any]]]
    methods: list[str]
    warnings: list[str] = field(default_factory=list)
    ladders: list[Ladder] = field(default_factory=list)  # a study with budgets (report.budgets)


def run_machines(study: StudyData) -> list[str]:
    """The distinct machines the study's runs were made on, as ``host (CPU)`` from each run's
    saved meta (``cpu`` where recorded, else the architecture), sorted."""
    found = set()
    for r in study.runs:
        meta = (r.config or {}).get("meta") or {}
        if meta:
            found.add(
                f"{meta.get('host') or '?'} ({meta.get('cpu') or meta.get('machine') or '?'})"
            )
    return sorted(found)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "normlab":
                import normlab

                out[name] = normlab.__version__
    return out


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-") or "study"


def _family_size(analysis: Analysis) -> str:
    """The family's size as the verdicts count it (comparisons with >= 2 common seeds)."""
    n = analysis.family.size if analysis.family is not None else 0
    return f"{n} comparison" + ("s" if n != 1 else "")


def _split_text(study: StudyData) -> str:
    """What Methods says about the train/validation split, from the arms' ``data.split_seed``
    (and, where the runs kept predictions, which images they actually held out)."""
    spec = study.spec
    chosen = {
        spec.arm_config(g, v).data.split_seed for g in spec.group_names for v in spec.variant_names
    }
    if chosen == {SPLIT_SEED_RUN}:
        text = (
            "Each seed draws its own train/validation split (data.split_seed: run), and runs "
            "with the same seed share it, so the spread over seeds, and every interval here, "
            "covers which images are held out as well as training noise (Bouthillier et al., "
            "MLSys 2021)."
        )
        ids = {r.predictions.val_id for r in study.runs if r.predictions is not None}
        if len(ids) == 1 and len({r.seed for r in study.runs if r.predictions}) > 1:
            text += (
                " Here, though, every seed held out the same images: the source's own test "
                "split does not depend on the seed (only the training subset is redrawn)."
            )
        return text
    if SPLIT_SEED_RUN in chosen:
        return (
            "Some arms redraw the train/validation split with each seed (data.split_seed: "
            "run) and others keep one: their comparisons pair runs that held out different "
            "images, and have no seeds × images interval."
        )
    fixed = ", ".join(str(0 if x is None else x) for x in sorted(chosen, key=str))
    return (
        f"The train/validation split is drawn once (with seed {fixed}) for every run "
        "(data.split_seed), so the seed-only intervals cover training noise only, not the "
        "sampling of the validation images; the seeds × images interval covers both."
    )


def methods_text(study: StudyData, analysis: Analysis) -> list[str]:
    spec = study.spec
    lines = [
        f"Every arm ran with the same seeds ({', '.join(map(str, spec.seeds))}); a seed fixes "
        "the initialisation, the batch order and the augmentation, so runs with the same seed "
        "are paired. " + _split_text(study),
        f"Per arm: mean, sample standard deviation (ddof = 1) and {CONFIDENCE:.0%} t-interval "
        "over the completed runs. Final-epoch accuracy is the honest number; best-epoch "
        "accuracy picks the epoch on the validation set itself, so it is optimistic (the "
        "seeds report best epochs).",
        "Per comparison (within a group, variant minus baseline, in percentage points): the "
        f"mean paired difference; a paired t-interval; a paired BCa bootstrap interval "
        f"({N_RESAMPLES} resamples; too narrow with under ~10 seeds, so never used alone); the "
        "two-sided sign-flip permutation test (exact over all 2^n sign flips for small n). "
        f"With n seeds its smallest possible p is 2/2^n: at least {min_seeds_for(ALPHA)} seeds "
        f"are needed to ever reach p < {ALPHA:g}.",
        "Family-wise error control: the family is every final-epoch comparison of this report "
        f"({_family_size(analysis)}); best-epoch comparisons are descriptive and never claimed. "
        "The p-values are adjusted by Westfall and Young's step-down minP procedure over "
        "within-seed permutations of the arm labels (exact when the permutations are few, "
        f"else {FAMILY_RESAMPLES} random ones): where no arm truly differs, the chance that "
        f"this report claims any difference is at most {ALPHA:g}. The raw sign-flip p and the "
        "adjusted p are both shown.",
        f"A difference is claimed only when the adjusted p < {ALPHA:g} and both intervals "
        "exclude 0. Otherwise the verdict is 'no detectable difference', which is not evidence "
        "of equality: it says the seeds run cannot tell.",
        f"Seeds needed: the fewest seeds with which this rule would claim the observed gap "
        f"{POWER:.0%} of the time if it were real, with the sd of the paired differences as "
        "observed (both uncertain with few seeds): up to 12 seeds by simulating the exact "
        "sign-flip test and the paired t-interval, beyond that from the noncentral t "
        f"distribution, at level {ALPHA:g} divided by the family size (Bonferroni, which the "
        "step-down procedure used is never stricter than, so the figure is enough for it).",
        "Seeds × images interval, per comparison where every run of both arms kept its "
        f"per-image predictions: a percentile bootstrap ({IMAGE_RESAMPLES} resamples) of the "
        "mean paired difference that resamples the seeds and, independently, the validation "
        "images with replacement, with the same image indices for every seed and both arms "
        "since all saw the same images (a two-way 'pigeonhole' bootstrap, Owen 2007). It "
        "errs on the wide side where models disagree image by image from seed to seed, and, "
        "like every bootstrap over few seeds, on the narrow side in its seed part. Where each "
        "seed drew its own split, only the seeds are resampled: their means already vary with "
        "the images drawn. It is descriptive (the claim rule above does not use it): a claimed "
        "difference whose seeds × images interval includes 0 holds on these validation images "
        "but is not shown to carry over to other images like them. Runs made before normlab "
        "kept predictions have none ('not available').",
        "One seed per arm: no seed-to-seed variance can be estimated and no difference can be "
        "detected. The binomial view then shows whether the gap exceeds even the sampling "
        "noise of the validation images, ignoring training noise: McNemar's exact test on the "
        "images where the two models disagree (scipy.stats.binomtest), where both runs kept "
        "per-image predictions; for runs made before that, Fisher's exact test on the "
        "correct/incorrect counts, which treats the two evaluations as independent.",
        "Diverged runs (NaN/Inf loss) and unfinished runs are left out of the accuracy "
        "statistics and counted per arm.",
    ]
    if spec.lr_reference_batch_size:
        lines.append(
            f"Learning rate scaled linearly with the batch size: each run's optim.lr is the "
            f"configured lr x batch_size / {spec.lr_reference_batch_size}."
        )
    if spec.budgets:
        rungs = "; ".join(
            f"{b.name}: epochs x{b.epochs:g}, training images x{b.train:g}"
            + (f", validated every {b.eval_every} epochs" if b.eval_every else "")
            + (f", groups {', '.join(b.groups)} only" if b.groups else "")
            for b in spec.budgets
        )
        lines.append(
            f"Budget ladder ({rungs}): every group ran at every rung unless the rung names its "
            "groups, on top of its arms' own "
            "settings (normlab.study.spec), as the group GROUP@RUNG; the rungs' comparisons are "
            "all in the one family above. Along the ladder, the trend of each comparison is "
            "read from its claims at the rungs (holds, reverses, appears, fades, some rungs "
            "only, none); the change in size from the first to the last rung is the mean over "
            "seeds of the difference of the paired effects, with its paired t-interval, "
            "descriptive and outside the family (normlab.report.budgets)."
        )
    rt = spec.base.get("runtime") or {}
    if rt:
        lines.append(
            "Arithmetic resolved once for the whole study: "
            + ", ".join(
                f"{k} = {v}" for k, v in rt.items() if k in ("device", "precision", "memory_format")
            )
            + " in every run (unless a variant sets it)."
        )
    return lines


def images_caveats(analysis: Analysis) -> list[str]:
    """A note for every claimed difference whose seeds x images interval includes 0."""
    notes = []
    for gc in analysis.comparisons:
        c, ci = gc.comparison, gc.comparison.images_ci
        if c.detected and ci is not None and ci[0] <= 0 <= ci[1]:
            notes.append(
                f"{(gc.group + ': ') if gc.group else ''}{c.variant} − {c.baseline} is claimed "
                f"on the seeds, but its seeds × images interval, {100 * ci[0]:+.2f} to "
                f"{100 * ci[1]:+.2f} points, includes 0: it is not shown to hold beyond these "
                "validation images"
            )
    return notes


def build_document(study: StudyData) -> ReportDocument:
    analysis = analyze(study)
    spec = study.spec
    figures: list[FigureEntry] = []
    for group in spec.group_names:
        stem = _slug(group) if group else "study"
        if any(r.rows for r in study.runs if r.group == group):
            figures.append(
                FigureEntry(
                    f"curves-{stem}",
                    (f"{group}: " if group else "") + "learning curves",
                    to_png(learning_curves(study, group)),
                    "curves",
                )
            )
        if any(analysis.arm(group, v).values["final"] for v in spec.variant_names):
            figures.append(
                FigureEntry(
                    f"seeds-{stem}",
                    (f"{group}: " if group else "") + "validation accuracy per seed",
                    to_png(paired_seeds(analysis, group)),
                    "seeds",
                )
            )
    if spec.groups and any(a.final.n for a in analysis.arms):
        figures.insert(
            0,
            FigureEntry(
                "across-groups",
                "final-epoch validation accuracy across groups",
                to_png(across_groups(analysis)),
                "overview",
            ),
        )
    ladder = ladders(analysis)
    for title, fig in ladder_figures(ladder):
        figures.append(FigureEntry(f"ladder-{_slug(title)[:40]}", title, to_png(fig), "ladder"))
    mech, note = mechanism_figures(study)
    for i, (title, fig) in enumerate(mech):
        figures.append(
            FigureEntry(f"mechanism-{i:02d}-{_slug(title)[:40]}", title, to_png(fig), "mechanisms")
        )

    shas = sorted(
        {str((r.config.get("meta") or {}).get("git_sha")) for r in study.runs if r.config}
    )
    warnings = []
    if len(shas) > 1:
        warnings.append(
            f"runs were made from {len(shas)} different code versions: {', '.join(shas)}"
        )
    machines = run_machines(study)
    if len(machines) > 1:
        warnings.append(
            f"runs were made on {len(machines)} different machines ({'; '.join(machines)}): "
            "compare wall times within one machine only"
        )
    for arm in analysis.arms:
        lost = arm.count("diverged")
        if lost:
            warnings.append(
                f"{arm.arm}: {lost} of {len(arm.runs)} runs diverged and are left out of its "
                "statistics (which flatters it)"
            )
    warnings += images_caveats(analysis)
    for r in study.runs:
        if r.predictions_error:
            warnings.append(
                f"{r.key}: {r.predictions_error}; its comparisons have no seeds × images interval"
            )
    unfinished = sum(1 for r in study.runs if r.status in ("running", "pending"))
    if unfinished:
        warnings.append(
            f"{unfinished} of {len(study.runs)} runs are unfinished; rerun the study command to "
            "complete them"
        )
    for r in study.runs:
        if r.status == "completed" and any(
            not (isinstance(row.get("val/acc"), int | float) and math.isfinite(row["val/acc"]))
            for row in _validated_rows(r)
        ):
            warnings.append(f"{r.key}: some epochs have no finite validation accuracy")

    first_group = spec.group_names[0]
    base_cfg = config_to_dict(spec.arm_config(first_group, spec.baseline))
    base_cfg.pop("seed", None)
    spec_doc = spec_to_dict(spec)
    arm_overrides = []
    for group in spec.group_names:
        for variant in spec.variant_names:
            o = spec.arm_overrides(group, variant)
            if spec.lr_reference_batch_size:
                o["optim.lr (scaled)"] = spec.arm_config(group, variant).optim.lr
            arm_overrides.append(((f"{group}/" if group else "") + variant, o))
    return ReportDocument(
        study=study,
        analysis=analysis,
        figures=figures,
        mechanisms_note=note,
        versions=package_versions(),
        git_shas=shas,
        spec_yaml=dumps(spec_doc),
        base_config_yaml=dumps(base_cfg),
        arm_overrides=arm_overrides,
        methods=methods_text(study, analysis),
        warnings=warnings,
        ladders=ladder,
    )


def _validated_rows(run: RunRecord) -> list[dict[str, Any]]:
    """The metrics rows of the epochs the run validated (every epoch unless its config has
    ``eval_every``: then every N-th and the last)."""
    every = int(run.config.get("eval_every") or 1)
    epochs = int(run.config.get("epochs") or 0) or max(
        (int(r.get("epoch", 0)) for r in run.rows), default=0
    )
    return [r for r in run.rows if validates(int(r.get("epoch", 0)), every, epochs)]
