"""Re-judge every committed findings study from its results.csv under the report's current rule.

For each study folder here (study.yaml + results.csv): the last epoch's val/acc of every
completed run becomes one (group, arm, seed, value) row, and ``normlab.compare`` judges the
study's comparisons (every variant against its baseline, plus the spec's extra comparisons)
as one family: family-wise adjusted p-values, intervals, verdicts and seeds needed for the rule.
Writes rejudged.md beside this script.

    python docs/findings/rejudge.py
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import normlab
from normlab.study.spec import load_spec_file

HERE = Path(__file__).resolve().parent


def final_rows(study: Path) -> list[dict[str, object]]:
    last: dict[tuple[str, str, int], tuple[int, float]] = {}
    with open(study / "results.csv", newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            if r["status"] != "completed":
                continue
            key = (r["group"], r["variant"], int(r["seed"]))
            if key not in last or int(r["epoch"]) > last[key][0]:
                last[key] = (int(r["epoch"]), float(r["val/acc"]))
    return [{"group": g, "arm": v, "seed": s, "value": acc} for (g, v, s), (_, acc) in last.items()]


def _p(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.3g}"


def render() -> str:
    """The markdown this script writes (a test checks the committed file equals it)."""
    out = [
        "# The findings re-judged under the family-wise rule",
        "",
        "Made by `python docs/findings/rejudge.py` from each study's committed results.csv (the",
        "final epoch's validation accuracy of every completed run). Each study's final-epoch",
        "comparisons form one family; 'adjusted p' is its step-down minP p-value",
        "(normlab.report.family); a difference is claimed when it is below 0.05 and both paired",
        "intervals exclude 0. 'seeds needed': for this rule, at 80% power, if the observed gap and",
        "spread were the truth.",
        "",
    ]
    for study in sorted(p for p in HERE.iterdir() if (p / "results.csv").is_file()):
        spec = load_spec_file(study / "study.yaml")
        pairs = [f"{a}:{b}" for a, b in spec.comparisons]
        res = normlab.compare(final_rows(study), baseline=spec.baseline, pairs=pairs)
        out += [
            f"## {study.name}",
            "",
            f"{res.family_size('value')} comparisons in the family.",
            "",
            "| group | comparison | seeds | diff (points) | raw p | adjusted p | claimed | seeds needed |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for gc in res.comparisons:
            c = gc.comparison
            need = c.seeds_needed
            out.append(
                f"| {gc.group or ''} | {c.variant} − {c.baseline} | {c.n} | {100 * c.diff:+.2f} "
                f"| {_p(c.p_value)} | {_p(c.p_adjusted)} | {'yes' if c.detected else 'no'} "
                f"| {'> 1000' if need and need > 1000 else need} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    (HERE / "rejudged.md").write_text(render())
    print(HERE / "rejudged.md")


if __name__ == "__main__":
    main()
