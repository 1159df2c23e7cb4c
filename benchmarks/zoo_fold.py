"""The zoo table: BN folding (and ONNX export) on every model of tests/_zoo.py, one run, CPU.

Claim checked: on every torchvision classification model under 100 M parameters and a broad
timm sample, built untrained with trained-looking BN statistics (tests/_zoo.py:build), fold is
exact or refused, with and without an example input, and the ONNX export of the folded model
matches onnxruntime. "exact": the folded model's outputs on the example and on a held-out input
are within ``fold_tolerance`` (1e-4 relative in float32) of the original's; "rounding": beyond
it in float32, but the same folds on the float64 model are exact to 1e-9 (tests/_zoo.py).

Prints one row per model (outcome, BNs folded / left, relative error, fold seconds, with and
without an example input; ONNX relative error) and a summary: models tried, outcomes per mode,
median fold time. The fold time is one call per model (no repeats): a shared machine makes it
noisy, read it as an order of magnitude.

Usage::

    python benchmarks/zoo_fold.py [--lib torchvision|timm|all] [--only NAME,...] [--no-onnx]
        [--threads N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _zoo

from normlab.bn.export import export_onnx
from normlab.errors import NormlabError


def row(entry: _zoo.ZooEntry, onnx: bool) -> dict:
    start = time.perf_counter()
    model = _zoo.build(entry)
    out: dict = {
        "model": entry.id,
        "bn": _zoo.bn_count(model),
        "build_s": time.perf_counter() - start,
    }
    for mode, with_example in (("no_example", False), ("example", True)):
        check = _zoo.fold_check(model, entry, with_example=with_example)
        check.pop("result", None)
        out[mode] = check
    if onnx:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                res = export_onnx(model, entry.example(), Path(tmp) / "m.onnx")
                out["onnx"] = {
                    "ok": True,
                    "rel_error": res.max_abs_error / max(res.output_scale, 1e-12),
                }
            except NormlabError as exc:
                out["onnx"] = {"ok": False, "reason": str(exc)}
    return out


def fmt(c: dict) -> str:
    if c["outcome"] == "refused":
        return f"refused ({c['reason'][:40]})"
    return f"{c['outcome']:<6} {c['folded']:>4}/{c['left']:<4} {c['rel_error']:.1e} {c['seconds']:6.2f}s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lib", default="all", choices=["all", "torchvision", "timm"])
    p.add_argument("--only", default="", help="comma-separated model names")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    entries = [e for e in _zoo.zoo_entries() if args.lib in ("all", e.lib)]
    if args.only:
        wanted = set(args.only.split(","))
        entries = [e for e in entries if e.name in wanted]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{platform.processor() or platform.machine()}, {len(entries)} models"
    )
    print(
        f"{'model':<34} {'BN':>4}  {'no example: outcome folded/left rel t':<38}  {'example':<38}  onnx"
    )
    rows = []
    for entry in entries:
        try:
            r = row(entry, not args.no_onnx)
        except Exception as exc:  # a model that cannot be built or run here: reported, not hidden
            print(f"{entry.id:<34} ERROR {type(exc).__name__}: {exc}", flush=True)
            rows.append({"model": entry.id, "error": f"{type(exc).__name__}: {exc}"})
            continue
        rows.append(r)
        onnx = r.get("onnx")
        onnx_s = "-" if onnx is None else (f"{onnx['rel_error']:.1e}" if onnx["ok"] else "FAILED")
        print(
            f"{r['model']:<34} {r['bn']:>4}  {fmt(r['no_example']):<38}  {fmt(r['example']):<38}  {onnx_s}",
            flush=True,
        )
    ok = [r for r in rows if "error" not in r]
    print(f"\nmodels tried: {len(rows)} ({len(rows) - len(ok)} could not be built/run)")
    for mode in ("no_example", "example"):
        kinds = ("exact", "rounding", "refused", "wrong")
        counts = {k: sum(r[mode]["outcome"] == k for r in ok) for k in kinds}
        times = [r[mode]["seconds"] for r in ok]
        folded = sum(r[mode].get("folded", 0) for r in ok)
        left = sum(r[mode].get("left", 0) for r in ok)
        print(
            f"{mode:<11}: exact {counts['exact']}, exact in float64 with float32 rounding "
            f"{counts['rounding']}, refused {counts['refused']}, wrong {counts['wrong']}; "
            f"BN folded {folded}, left {left}; median fold {statistics.median(times):.2f}s, max {max(times):.2f}s"
        )
    onnx_rows = [r["onnx"] for r in ok if "onnx" in r]
    if onnx_rows:
        good = [o for o in onnx_rows if o["ok"]]
        worst = max((o["rel_error"] for o in good), default=float("nan"))
        print(
            f"onnx       : {len(good)}/{len(onnx_rows)} match onnxruntime, worst rel error {worst:.1e}"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
