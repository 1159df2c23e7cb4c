"""The long table `normlab compare` reads, for one rung of a ladder that has not finished:
one row per finished run of GROUP (arm, seed, final validation accuracy in %), baseline first.
The interim numbers in docs/findings.md come from it (each rung its own family):

    python docs/findings/progress.py restore ladders/batch-size
    python docs/findings/interim.py ladders/batch-size bs8@x4 bn > /tmp/rung.csv
    normlab compare /tmp/rung.csv --md -
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def main(name: str, group: str, baseline: str) -> None:
    rows = []
    for f in sorted(
        (Path("studies/findings") / name / "runs" / group).glob("*/seed-*/summary.json")
    ):
        summary = json.loads(f.read_text(encoding="utf-8"))
        if summary.get("status") == "completed":
            arm, seed = f.parent.parent.name, f.parent.name.split("-", 1)[1]
            rows.append((arm != baseline, arm, int(seed), 100 * summary["final/val/acc"]))
    out = csv.writer(sys.stdout)
    out.writerow(["arm", "seed", "value"])
    for _, arm, seed, value in sorted(rows):
        out.writerow([arm, seed, value])


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: interim.py LADDER GROUP BASELINE, e.g. ladders/batch-size bs8@x4 bn")
    main(*sys.argv[1:])
