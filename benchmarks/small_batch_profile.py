"""Where a small-batch training step's time goes: one ``fit`` model vs K seeds stacked.

Companion to ``small_batch.py`` (issue 15, item 4), same setting (its ``make_config``:
ResNet-20 at 16x16, SGD momentum 0.9, cosine schedule, one thread, ``--precision``). For one
batch size it builds K runs as ``fit`` would, trains one epoch untimed (kernel selection), then
times a second epoch's steps twice over:

* phases, with ``time.perf_counter`` around each: loading the batch, forward and loss,
  backward, optimizer step (median ms per step);
* convolutions, with ``torch.profiler``: the self CPU time of the convolution kernels, forward
  and backward, per step (the rest of the step is batch norm, element-wise ops, the optimizer's
  memory-bound updates, dispatch and autograd bookkeeping).

Printed per path, then ``K x old / stacked`` (the step-level speed-up of stacking) and the
convolution bound: the speed-up stacking would reach if everything but its convolutions took no
time, and the same bound for the old path (its step over its convolutions' time), and the
stacked convolutions' time over the K separate ones'. A target above these bounds cannot come
from cutting overhead around the convolutions; it needs faster convolution kernels (another
layout or precision, which changes the numbers).

The steps mirror ``train_epoch`` and ``stacked._epoch`` (forward, cross-entropy, backward,
``optimizer.step``) without their bookkeeping (metrics accumulation, the finite-loss check), so
the phase sums are slightly below the runs' own step times.

Usage::

    python benchmarks/small_batch_profile.py [--batch 8] [--seeds 6] [--images 384]
        [--precision fp32|bf16|auto]

About 30 s per batch size on one core.

Measured on a 2-core AMX Xeon, 6 seeds, one run each (the profiler's figures move by ~20%
between runs): fp32, batch 8: old 11.0 ms/step, 54% convolutions; stacked 48.8 ms, 67%; the
stacked convolutions take 0.91 of the six separate runs' convolution time, so the convolution
bound is 2.03x (stacking reached 1.35x); over 4 runs the bound was 1.65-2.03x, median 1.99x. Batch 2: old 7.1 ms, 49%; stacked 22.2 ms, 65%; bound
2.98x (reached 1.92x). bf16: bound 2.80x at batch 8 (reached 1.42x), 4.43x at batch 2 (2.14x).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import small_batch
import torch
from small_batch import DEFAULT_CIFAR, data_spec, make_config
from torch import nn
from torch.profiler import ProfilerActivity, profile

from normlab.data import build_data
from normlab.train.fit import RunLoop
from normlab.train.stacked import _Stack, stack_batch

CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution")
PHASES = ("data", "forward", "backward", "optimizer")

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class Side:
    """One path's training step: ``copies`` models in ``model`` (1: a ``fit`` model)."""

    batches: Batches
    model: nn.Module
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], contextlib.AbstractContextManager[object]]
    copies: int

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.copies == 1:
            return nn.functional.cross_entropy(out.float(), y)
        logits = out.float().view(y.shape[0], self.copies, -1).permute(0, 2, 1)
        return nn.functional.cross_entropy(logits, y, reduction="none").mean(0).sum()

    def step(self, x: torch.Tensor, y: torch.Tensor, mark: Callable[[], None]) -> None:
        """Forward and loss, backward, optimizer step; ``mark()`` after each of the first two."""
        with self.autocast():
            out = self.model(x)
        loss = self.loss(out, y)
        mark()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark()
        self.optimizer.step()


def phases(side: Side) -> dict[str, float]:
    """Median ms per step of each phase over one epoch (after one untimed epoch)."""
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    marks: list[float] = []  # the step's clock readings: before and after each phase
    for timed in (False, True):
        it = iter(side.batches())
        while True:
            marks[:] = [time.perf_counter()]
            try:
                x, y = next(it)
            except StopIteration:
                break
            marks.append(time.perf_counter())
            side.step(x, y, lambda: marks.append(time.perf_counter()))
            marks.append(time.perf_counter())
            if timed:
                for name, a, b in zip(PHASES, marks[:-1], marks[1:], strict=True):
                    times[name].append(1e3 * (b - a))
    return {name: statistics.median(v) for name, v in times.items()}


def conv_ms(side: Side) -> float:
    """Self CPU ms per step of the convolution kernels (forward and backward), one epoch."""
    data = list(side.batches())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x, y in data:
            side.step(x, y, lambda: None)
    total_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in CONV_OPS)
    return total_us / 1e3 / len(data)


def report(name: str, ph: dict[str, float], conv: float) -> float:
    step = sum(ph.values())
    print(
        f"{name:8s} ms/step {step:6.2f} = "
        + " + ".join(f"{p} {ph[p]:.2f}" for p in PHASES)
        + f"; convolutions {conv:.2f} ({conv / step:.0%})"
    )
    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    args = ap.parse_args(argv)
    small_batch.PRECISION = args.precision
    torch.set_num_threads(1)
    data = f"cifar10:{DEFAULT_CIFAR}" if DEFAULT_CIFAR.exists() else "synthetic"
    n = max(args.batch, args.images // args.batch * args.batch)
    spec = data_spec(data, n, 64)
    bundle = build_data(make_config(spec, args.batch, 0, 1).data)
    configs = [make_config(spec, args.batch, s, 2) for s in range(args.seeds)]
    with tempfile.TemporaryDirectory() as tmp:
        loops = [
            RunLoop(
                c,
                out=Path(tmp) / f"r{c.seed}",
                resume=False,
                callbacks=(),
                data=bundle,
                verbose=False,
            )
            for c in configs
        ]
        print(
            f"batch {args.batch}, {args.seeds} seeds, {n} images/epoch, "
            f"precision={loops[0].s.runtime.precision}, torch {torch.__version__}"
        )
        first = loops[0]
        stack = _Stack(loops)
        autocast = first.state.autocast
        sides = {
            "old": Side(
                lambda: iter(first.s.train_loader),
                first.s.model.train(),
                first.s.optimizer,
                autocast,
                1,
            ),
            "stacked": Side(
                lambda: map(stack_batch, zip(*(lp.s.train_loader for lp in loops), strict=True)),
                stack.model,
                stack.optimizer,
                autocast,
                len(loops),
            ),
        }
        steps, convs = {}, {}
        for name, side in sides.items():
            ph = phases(side)  # first: its untimed epoch also warms the kernels up for conv_ms
            convs[name] = conv_ms(side)
            steps[name] = report(name, ph, convs[name])
    k = len(loops)
    print(
        f"{k} x old / stacked = {k * steps['old'] / steps['stacked']:.2f}x; convolution bound "
        f"(stacked with only its convolutions left) = {k * steps['old'] / convs['stacked']:.2f}x; "
        f"old with only its convolutions left = {steps['old'] / convs['old']:.2f}x; "
        f"stacked / separate convolution time = {convs['stacked'] / (k * convs['old']):.2f}"
    )


if __name__ == "__main__":
    main()
