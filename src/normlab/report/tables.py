"""The report's tables as header + rows of strings, shared by the HTML and Markdown writers
(and ``normlab compare``), and those two layouts of a table (:func:`markdown_table`,
:func:`html_table`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from markupsafe import Markup, escape

from normlab.report.analysis import Analysis, ArmStats, GroupComparison, fmt_num, fmt_pct
from normlab.report.stats import POINTS, Comparison, Summary

Table = tuple[list[str], list[list[str]]]


def _mean_sd(s: Summary) -> str:
    if s.n == 0:
        return "–"
    if s.n == 1 or not math.isfinite(s.sd):
        return f"{fmt_pct(s.mean)}"
    return f"{fmt_pct(s.mean)} ± {fmt_pct(s.sd)}"


def _ci(s: Summary) -> str:
    if s.constant:
        return f"none: all {s.n} seeds equal"
    if s.n < 2 or not math.isfinite(s.ci_low):
        return "–"
    return f"[{fmt_pct(s.ci_low)}, {fmt_pct(s.ci_high)}]"


def _runs(arm: ArmStats) -> str:
    parts = [f"{arm.count('completed')}/{len(arm.runs)}"]
    for status in ("diverged", "failed", "running", "pending"):
        n = arm.count(status)
        if n:
            parts.append(f"{n} {status}")
    return ", ".join(parts)


def arms_table(analysis: Analysis) -> Table:
    headers = [
        "arm",
        "runs done",
        "final val acc % (mean ± sd)",
        "95% CI",
        "best val acc % (mean ± sd)",
        "95% CI",
        "best epoch (mean)",
    ]
    rows = [
        [
            a.arm + (" (baseline)" if a.variant == analysis.study.spec.baseline else ""),
            _runs(a),
            _mean_sd(a.final),
            _ci(a.final),
            _mean_sd(a.best),
            _ci(a.best),
            fmt_num(a.best_epoch.mean, 1),
        ]
        for a in analysis.arms
    ]
    return headers, rows


def comparisons_table(analysis: Analysis) -> Table:
    return verdict_table(analysis.comparisons, pairs=bool(analysis.study.spec.comparisons))


def verdict_table(comparisons: Sequence[GroupComparison], *, pairs: bool = False) -> Table:
    """One row per comparison: its numbers, raw and adjusted p, and verdict; ``pairs``: some
    compare a variant with another reference than the baseline (the header says so)."""
    headers = [
        "group",
        "variant − reference" if pairs else "variant − baseline",
        "metric",
        "seeds",
        "diff (points)" if all(gc.comparison.unit is POINTS for gc in comparisons) else "diff",
        "paired t 95% CI",
        "bootstrap 95% CI",
        "seeds × images 95% CI",
        "sign-flip p",
        "adjusted p",
        "verdict",
    ]
    rows = []
    for gc in comparisons:
        c = gc.comparison

        def pts(x: float, c: Comparison = c) -> str:
            if not math.isfinite(x):
                return "–"
            return f"{100 * x:+.2f}" if c.unit is POINTS else c.unit.amount(x, signed=True)

        def ci(lo_hi: tuple[float, float]) -> str:
            lo, hi = lo_hi
            return "–" if not math.isfinite(lo) else f"[{pts(lo)}, {pts(hi)}]"

        rows.append(
            [
                gc.group or "",
                f"{c.variant} − {c.baseline}",
                gc.metric,
                str(c.n),
                pts(c.diff),
                ci(c.t_ci),
                ci(c.bootstrap_ci),
                _images(c, ci),
                "–" if not math.isfinite(c.p_value) else f"{c.p_value:.3g}",
                _adjusted(c),
                c.verdict,
            ]
        )
    return headers, rows


def _images(c: Comparison, ci: Callable[[tuple[float, float]], str]) -> str:
    """The interval that also resamples the validation images, or why there is none."""
    if c.images_ci is not None:
        return ci(c.images_ci)
    if c.mcnemar is not None:
        return f"– (1 seed: McNemar p = {c.mcnemar.p_value:.3g})"
    return c.images_note or "–"


def _adjusted(c: Comparison) -> str:
    if c.descriptive:
        return "not tested"
    if c.p_adjusted is None or not math.isfinite(c.p_adjusted):
        return "–"
    return f"{c.p_adjusted:.3g}"


def timing_table(analysis: Analysis) -> Table:
    """Per arm: wall time per run, training images/s per run, how the seeds were trained
    (separately; stacked: K seeds in one model, ``normlab.train.stacked``; or as momentum
    twins, ``normlab.train.twins``) and the arm's total wall time, which counts shared work
    once: a stacked group's time once, a twin pair's in the arm that trained."""
    headers = [
        "arm",
        "wall time per run, s (mean ± sd)",
        "training images/s per run (mean)",
        "trained",
        "total s",
    ]
    rows = []
    for a in analysis.arms:
        w = a.wall_seconds
        rows.append(
            [
                a.arm,
                "–"
                if w.n == 0
                else (fmt_num(w.mean, 1) + ("" if w.n < 2 else f" ± {fmt_num(w.sd, 1)}")),
                fmt_num(a.images_per_s.mean, 0),
                _trained(a.runs),
                fmt_num(_total_wall(a.runs), 1),
            ]
        )
    return headers, rows


def _stack_of(run: Any) -> tuple[int, ...] | None:
    stacked = run.summary.get("stacked")
    if isinstance(stacked, dict) and isinstance(stacked.get("seeds"), list):
        return tuple(int(s) for s in stacked["seeds"])
    return None


def _twin_of(run: Any) -> dict[str, Any] | None:
    shared = run.summary.get("shared_training")
    return shared if isinstance(shared, dict) else None


def _trained(runs: Sequence[Any]) -> str:
    groups = sorted({g for g in map(_stack_of, runs) if g is not None})
    twins = [t for t in map(_twin_of, runs) if t is not None]
    alone = sum(1 for r in runs if _stack_of(r) is None and _twin_of(r) is None)
    parts = [f"stacked: seeds {', '.join(map(str, g))}" for g in groups]
    if twins:
        took = sum(1 for t in twins if t.get("trained"))
        momenta = sorted({m for t in twins for m in t.get("bn_momenta") or []}, reverse=True)
        where = (
            "trained here"
            if took == len(twins)
            else "network trained by its twin (time counted there)"
            if took == 0
            else f"{took} of {len(twins)} trained here"
        )
        parts.append(f"momentum twins (BN momenta {', '.join(f'{m:g}' for m in momenta)}): {where}")
    if alone:
        parts.append(f"{alone} separately" if groups else "separately")
    return "; ".join(parts) or "–"


def _total_wall(runs: Sequence[Any]) -> float:
    """Sum of the runs' wall times, a stacked group's (shared) time counted once, and momentum
    twins' time counted only in the run that trained (``normlab.train.twins``): twins run in one
    process, so every twin's wall time is the pair's, and the trained run's covers the pair's
    training, every twin's evaluation, probes and checkpoints."""
    total, shared = 0.0, dict[tuple[int, ...], float]()
    for r in runs:
        seconds = float(r.summary.get("wall_seconds") or 0.0)
        twin = _twin_of(r)
        if twin is not None and not twin.get("trained"):
            continue  # in the wall time of the run that trained it
        group = _stack_of(r)
        if group is None:
            total += seconds
        else:
            shared[group] = max(shared.get(group, 0.0), seconds)
    return total + sum(shared.values())


def problems_table(analysis: Analysis) -> Table:
    headers = ["run", "status", "reason"]
    rows = [
        [r.key, r.status, r.reason or ""]
        for r in analysis.study.runs
        if r.status in ("failed", "diverged", "running", "pending")
    ]
    return headers, rows


def markdown_table(t: Table) -> str:
    """``t`` as a Markdown (GitHub) table; ``|`` escaped, newlines joined."""
    headers, rows = t

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def html_table(t: Table) -> Markup:
    """``t`` as an HTML ``<table>`` (escaped); numeric-looking cells get ``class="num"``."""
    headers, rows = t
    esc = escape
    out = ["<table><tr>", *(f"<th>{esc(h)}</th>" for h in headers), "</tr>"]
    for row in rows:
        out.append("<tr>")
        for cell in row:
            numeric = cell[:1] in "+-–0123456789[" and len(cell) < 40
            out.append(f'<td class="num">{esc(cell)}</td>' if numeric else f"<td>{esc(cell)}</td>")
        out.append("</tr>")
    out.append("</table>")
    return Markup("".join(out))
