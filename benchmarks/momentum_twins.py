"""Momentum twins (``fit_twins``) vs one ``fit`` per arm, in one run.

Claim checked: arms that differ only in BN momentum trained once (``normlab study
--momentum-twins``) give bit-identical runs in less wall time: K arms cost one training plus K
evaluations instead of K of both.

Setting: the train-mode study's arms (correct statistics, momentum 0.1, and never updated,
momentum 0; ``--arms 3`` adds momentum 0.01), ResNet-20, BN, SGD momentum 0.9, cosine
schedule, ``runtime.threads = 1``, the ``bn`` probe, CIFAR-10 JPEGs (or synthetic images
without them) at ``--size``. Per seed, the K arms are trained as K ``fit`` calls and as one
``fit_twins`` call; each repeat does both, in alternating order. Printed: the median over
repeats of each path's wall time and of the ratio separate / twins (every repeat's value
too; one untimed run first pays one-off warm-up), and whether every run of the two paths is
bit-identical (model and optimizer tensors,
metric rows without wall time, predictions).

Usage::

    python benchmarks/momentum_twins.py [--arms 2] [--seeds 1] [--repeats 3] [--epochs 2]
        [--train 1024] [--val 1000] [--size 16] [--data cifar10:PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from normlab.config import config_from_dict
from normlab.data import build_data
from normlab.train import fit
from normlab.train.twins import fit_twins

DEFAULT_DATA = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
)
MOMENTA = (0.1, 0.0, 0.01)


def _config(args: argparse.Namespace, momentum: float, seed: int):
    if args.data:
        name, _, path = args.data.partition(":")
        data = {"name": name, "path": path}
    elif DEFAULT_DATA.is_file():
        data = {"name": "cifar10", "path": str(DEFAULT_DATA)}
    else:
        data = {"name": "synthetic"}
    data.update(limit_train=args.train, limit_val=args.val, image_size=args.size)
    return config_from_dict(
        {
            "model": {"name": "resnet20"},
            "data": data,
            "epochs": args.epochs,
            "batch_size": 128,
            "seed": seed,
            "norm": {"name": "bn", "bn_momentum": momentum},
            "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "schedule": "cosine"},
            "probes": ["bn"],
            "runtime": {"threads": 1, "progress": "off"},
        }
    )


def _same(a: Path, b: Path) -> bool:
    ca = torch.load(a / "checkpoint.pt", weights_only=False)
    cb = torch.load(b / "checkpoint.pt", weights_only=False)
    if any(not torch.equal(v, cb["model"][k]) for k, v in ca["model"].items()):
        return False
    for i, st in ca["optimizer"]["state"].items():
        if any(not torch.equal(v, cb["optimizer"]["state"][i][k]) for k, v in st.items()):
            return False

    def rows(d: Path) -> list[dict]:
        out = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in out]

    pa, pb = np.load(a / "predictions.npz"), np.load(b / "predictions.npz")
    return rows(a) == rows(b) and np.array_equal(pa["final"], pb["final"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", type=int, default=2, choices=(2, 3))
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train", type=int, default=1024)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--data", default=None, help="NAME:PATH (default: the shared CIFAR-10 JPEGs)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    momenta = MOMENTA[: args.arms]
    bundle = build_data(_config(args, momenta[0], 0).data)
    times: dict[str, list[float]] = {"separate": [], "twins": []}
    identical = True
    with tempfile.TemporaryDirectory() as tmp:
        # one untimed run first: kernel selection and allocator warm-up are paid once
        fit(_config(args, momenta[0], 0), out=Path(tmp) / "warm-up", data=bundle, verbose=False)
        for rep in range(args.repeats):
            order = ["separate", "twins"] if rep % 2 == 0 else ["twins", "separate"]
            for path in order:
                root = Path(tmp) / f"{path}-{rep}"
                t0 = time.perf_counter()
                for seed in range(args.seeds):
                    configs = [_config(args, m, seed) for m in momenta]
                    outs = [root / f"s{seed}-m{i}" for i in range(len(momenta))]
                    if path == "separate":
                        for c, o in zip(configs, outs, strict=True):
                            fit(c, out=o, data=bundle, verbose=False)
                    else:
                        fit_twins(configs, outs, data=bundle)
                times[path].append(time.perf_counter() - t0)
            for seed in range(args.seeds):
                for i in range(len(momenta)):
                    name = f"s{seed}-m{i}"
                    a, b = Path(tmp) / f"separate-{rep}" / name, Path(tmp) / f"twins-{rep}" / name
                    identical = identical and _same(a, b)
    ratios = [s / t for s, t in zip(times["separate"], times["twins"], strict=True)]
    print(
        f"momentum twins: {args.arms} arms (BN momenta {', '.join(map(str, momenta))}) x "
        f"{args.seeds} seed(s), ResNet-20 at {args.size}x{args.size}, {args.train} training / "
        f"{args.val} validation images, {args.epochs} epochs, one thread, {args.repeats} repeats"
    )
    for path in ("separate", "twins"):
        values = ", ".join(f"{t:.1f}" for t in times[path])
        print(f"  {path:>8}: median {statistics.median(times[path]):.1f} s  ({values})")
    print(
        f"  separate / twins: median {statistics.median(ratios):.2f}x  "
        f"({', '.join(f'{r:.2f}' for r in ratios)})"
    )
    print(f"  bit-identical runs: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
