"""Test the statements of docs/findings.md that no study report tests, from committed results.csv.

The findings page quoted a few numbers that no report's rule had judged: best-epoch
comparisons, accuracy after recalibration against the correct model, and the growth of the
estimation shift with depth. This script judges each of them with ``normlab.compare`` (the
report's rule: family-wise adjusted sign-flip p < 0.05 and both paired intervals excluding 0),
one family per check, and writes checks.md beside itself.

These checks were chosen after the numbers had been looked at (the page stated them first), so
their p-values are not confirmatory: a claim here says the data are consistent with the
statement under the rule; a new study is what would confirm it.

    python docs/findings/checks.py
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import normlab
from normlab.report.compare import CompareResult

HERE = Path(__file__).resolve().parent
Row = dict[str, str]


def read_rows(study: str) -> list[Row]:
    """Every completed run's every epoch row of a committed study."""
    with open(HERE / study / "results.csv", newline="", encoding="utf-8") as fh:
        return [r for r in csv.DictReader(fh) if r["status"] == "completed"]


def per_run(
    rows: Iterable[Row], pick: Callable[[list[Row]], Row]
) -> dict[tuple[str, str, int], Row]:
    """One row per (group, variant, seed): ``pick`` chooses it from the run's epoch rows."""
    runs: dict[tuple[str, str, int], list[Row]] = {}
    for r in rows:
        runs.setdefault((r["group"], r["variant"], int(r["seed"])), []).append(r)
    return {k: pick(sorted(v, key=lambda r: int(r["epoch"]))) for k, v in runs.items()}


def final(rows: list[Row]) -> Row:
    return rows[-1]


def best(rows: list[Row]) -> Row:
    """The epoch with the highest validation accuracy (the first such epoch)."""
    return max(rows, key=lambda r: (float(r["val/acc"]), -int(r["epoch"])))


def epoch(n: int) -> Callable[[list[Row]], Row]:
    return lambda rows: next(r for r in rows if int(r["epoch"]) == n)


def _natural(name: str) -> tuple[tuple[int, str], ...]:
    """Module order of dotted layer names: ``features.2`` before ``features.10``."""
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in name.split("."))


def layer_thirds(row: Row, prefix: str) -> tuple[float, float]:
    """Mean of the first and of the last third of the layers under ``prefix`` (module order,
    as normlab.report.mechanisms takes them), over the finite values."""
    names = sorted((k[len(prefix) :] for k in row if k.startswith(prefix)), key=_natural)
    values = [float(row[prefix + n]) for n in names if row[prefix + n] not in ("", None)]
    values = [v for v in values if math.isfinite(v)]
    k = len(values) // 3
    return sum(values[:k]) / k, sum(values[-k:]) / k


def _p(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.3g}"


def section(title: str, text: list[str], res: CompareResult, scale: float, unit: str) -> list[str]:
    out = [f"## {title}", "", *text, ""]
    out += [
        f"{res.family_size('value')} comparison(s) in this check's family.",
        "",
        f"| group | comparison | seeds | baseline mean | variant mean | diff ({unit}) "
        "| 95% t-interval | raw p | adjusted p | claimed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for gc in res.comparisons:
        c = gc.comparison
        lo, hi = c.t_ci
        out.append(
            f"| {gc.group or ''} | {c.variant} − {c.baseline} | {c.n} "
            f"| {scale * c.baseline_mean:.3f} | {scale * c.variant_mean:.3f} "
            f"| {scale * c.diff:+.3f} | {scale * lo:+.3f} to {scale * hi:+.3f} "
            f"| {_p(c.p_value)} | {_p(c.p_adjusted)} | {'yes' if c.detected else 'no'} |"
        )
    return [*out, ""]


def best_epoch_placement() -> list[str]:
    runs = per_run(read_rows("placement"), best)
    rows = [
        {"group": g, "arm": v, "seed": s, "value": float(r["val/acc"])}
        for (g, v, s), r in runs.items()
    ]
    res = normlab.compare(rows, baseline="pre")
    return section(
        "placement: best-epoch accuracy (descriptive)",
        [
            "Each run's best epoch by validation accuracy (selected on the validation set",
            "itself, so optimistic). The report keeps best-epoch comparisons out of the tested",
            "family; their raw p-values are the ones to compare with the final epoch's.",
        ],
        res,
        100.0,
        "points",
    )


RECALIBRATED = ("stats-never-updated", "keras-0.99", "keras-0.999", "correct")


def recalibration() -> list[str]:
    runs = per_run(read_rows("train-mode"), final)
    rows = [
        {"arm": "correct", "seed": s, "value": float(r["val/acc"])}
        for (_, v, s), r in runs.items()
        if v == "correct"
    ]
    rows += [
        {"arm": f"{v} recalibrated", "seed": s, "value": float(r["shift/val/acc_precise"])}
        for (_, v, s), r in runs.items()
        if v in RECALIBRATED
    ]
    res = normlab.compare(rows, baseline="correct")
    return section(
        "train-mode: recalibrated accuracy against the correct model",
        [
            "Final epoch. Baseline: the correct model (PyTorch momentum 0.1) with its running",
            "statistics (val/acc). Variants: each BN arm's accuracy after its statistics were",
            "recomputed on 2,048 un-augmented training images (shift/val/acc_precise).",
        ],
        res,
        100.0,
        "points",
    )


def depth_growth() -> list[str]:
    prefix = "bn/shift/var/"
    runs = per_run(
        (r for r in read_rows("batch-size-mobilenetv2") if r["group"] == "bs128"), epoch(1)
    )
    # GN everywhere has no BN layer, so no estimation shift
    thirds = {(v, s): layer_thirds(r, prefix) for (_, v, s), r in runs.items() if v != "gn"}
    within = [
        {"group": v, "arm": part, "seed": s, "value": t[i]}
        for (v, s), t in thirds.items()
        for i, part in enumerate(("first third", "last third"))
    ]
    growth = [{"arm": v, "seed": s, "value": t[1] - t[0]} for (v, s), t in thirds.items()]
    text = [
        "batch-size-mobilenetv2, batch 128, after epoch 1 (23 updates): the variance shift",
        "|log(running var / population var)| averaged over the first and over the last third of",
        "each arm's BN layers (module order). Per arm, last third − first third, paired within",
        "each run (group = arm):",
    ]
    out = section(
        "batch-size-mobilenetv2: growth of the estimation shift with depth",
        text,
        normlab.compare(within, baseline="first third"),
        1.0,
        "shift",
    )
    out += section(
        "batch-size-mobilenetv2: XBNBlock's growth against BN's",
        [
            "The same runs: (last third − first third) of XBNBlock minus that of BN, paired by",
            "seed. XBNBlock's thirds are not the same layers as BN's (it has no BN at each",
            "block's first norm).",
        ],
        normlab.compare(growth, baseline="bn"),
        1.0,
        "shift",
    )
    return out


def render() -> str:
    """The markdown this script writes (a test checks the committed file equals it)."""
    out = [
        "# Statements of the findings page, tested",
        "",
        "Made by `python docs/findings/checks.py` from the committed results.csv files. Each",
        "section is one family under the report's rule (normlab.compare: step-down minP",
        "adjusted sign-flip p < 0.05 and both paired intervals excluding 0). The checks were",
        "chosen after the page had stated these numbers, so they are not confirmatory.",
        "",
    ]
    out += best_epoch_placement() + recalibration() + depth_growth()
    return "\n".join(out)


def main() -> None:
    (HERE / "checks.md").write_text(render())
    print(HERE / "checks.md")


if __name__ == "__main__":
    main()
