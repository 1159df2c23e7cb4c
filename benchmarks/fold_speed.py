"""Fold time with an example input: verification a group at a time against one layer at a time.

Claim checked: checking the folds on the example input costs about one extra forward per
candidate group (``fold_batchnorm_report(..., verify="groups")``, the default), not one per
layer (``verify="each"``, the reference measured in the same run), so densenet121 folds in
seconds. Both modes must leave the same folds; the script asserts it and prints the forwards
each mode ran.

Method: timm models built untrained with trained-looking BN statistics (tests/_zoo.py:build),
a 2x3x64x64 example input, one torch thread; each mode is timed ``--repeats`` times in
alternating order in one process and the median (and min-max) seconds are printed. Timings on a
shared machine are noisy: compare the two columns within one run.

Usage::

    python benchmarks/fold_speed.py [--models densenet121,dpn68,...] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _zoo

from normlab.bn.fold import fold_batchnorm_report

MODELS = "densenet121,dpn68,resnetv2_50,mixnet_s,efficientnet_b0,resnet50d"


def bench(name: str, repeats: int) -> dict:
    entry = _zoo.ZooEntry("timm", name, 64, _zoo.TIMM.get(name, {}))
    model = _zoo.build(entry)
    x = entry.example()
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))  # copies share it
    seconds: dict[str, list[float]] = {"groups": [], "each": []}
    forwards: dict[str, int] = {}
    folds: dict[str, list[str]] = {}
    for r in range(repeats):
        for mode in ("groups", "each") if r % 2 == 0 else ("each", "groups"):
            calls.clear()
            start = time.perf_counter()
            result = fold_batchnorm_report(model, x, verify=mode)
            seconds[mode].append(time.perf_counter() - start)
            forwards[mode] = len(calls)
            folds[mode] = [s.norm for s in result.folded]
    handle.remove()
    assert folds["groups"] == folds["each"], f"{name}: the two modes left different folds"
    g, e = statistics.median(seconds["groups"]), statistics.median(seconds["each"])
    return {
        "model": name,
        "bn": _zoo.bn_count(model),
        "folded": len(folds["groups"]),
        "groups_s": round(g, 3),
        "each_s": round(e, 3),
        "ratio": round(e / g, 2),
        "groups_range": [round(min(seconds["groups"]), 3), round(max(seconds["groups"]), 3)],
        "each_range": [round(min(seconds["each"]), 3), round(max(seconds["each"]), 3)],
        "forwards_groups": forwards["groups"],
        "forwards_each": forwards["each"],
        "repeats": repeats,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=MODELS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, 1 thread, {platform.processor() or platform.machine()}, "
        f"input 2x3x64x64, median of {args.repeats}"
    )
    print(
        f"{'model':<18} {'BN':>4} {'folded':>6} {'groups s':>9} {'each s':>9} {'ratio':>6}"
        f" {'fwd groups':>10} {'fwd each':>8}"
    )
    rows = []
    for name in args.models.split(","):
        row = bench(name.strip(), args.repeats)
        rows.append(row)
        print(
            f"{row['model']:<18} {row['bn']:>4} {row['folded']:>6} {row['groups_s']:>9.2f} "
            f"{row['each_s']:>9.2f} {row['ratio']:>5.1f}x {row['forwards_groups']:>10} "
            f"{row['forwards_each']:>8}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
