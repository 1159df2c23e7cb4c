"""Several seeds of one configuration trained together: :func:`fit_stacked`.

Each run keeps everything a :func:`~normlab.train.fit` run has: its own run directory, model
initialisation, data order and augmentation (its own loader and generator), optimizer and
schedule, evaluation, probes, metrics, checkpoints and predictions. Only the training steps are
shared: the K models are stacked into one module (:mod:`normlab.models.stack`, verified
against the copies before training) that takes the K batches at once, so each step costs
one set of operations instead of K. After every epoch the stacked tensors (parameters, buffers,
momentum) are copied back into each run's model and optimizer, which are then evaluated and
checkpointed exactly as ``fit`` does; a stacked run's checkpoint is an ordinary one and
resumes with ``fit`` or ``fit_stacked``.

What is and is not the same as ``fit``: each copy's loss, gradient and update are the same
functions as the single run's (in float64 the gradients agree to about 1e-14), but grouped
kernels sum in a different order. In float32 the parameters agree to rounding (~1e-6
relative) after one step, while a single gradient tensor can differ by several percent where
activations tie at a ReLU's kink (zero-padded crops make many equal values): exactly as much
as the same model differs from itself between channels_last and NCHW, a choice ``fit`` makes
per machine. Training then amplifies the differences, as it does for a different thread count
or layout; ``benchmarks/small_batch.py`` measures how far final accuracies move. So stacked
runs are not bit-identical to separate runs; the old path stays the default (``normlab study``
stacks only with ``--stack-seeds``). A stacked group is deterministic: rerun or resumed, it
gives the same numbers. The summary of each run records ``stacked`` (the seeds it trained
with).

Refused (:class:`~normlab.errors.ConfigError`, before anything is trained): configs that differ
in more than the seed, batches above ``MAX_BATCH`` (where stacking stops paying:
``benchmarks/small_batch.py``), gradient clipping (its norm would couple the copies),
``runtime.compile``, a device other than the CPU (not measured there), several processes,
callbacks that act per step, models without stacking rules, and runs whose checkpoints are at
different epochs. A run that diverges stops alone, as it would by itself; the others go on.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normlab.config import TrainConfig, config_to_dict
from normlab.data import DataBundle
from normlab.engine.callbacks import Callback
from normlab.engine.optim import build_scheduler
from normlab.errors import ConfigError
from normlab.models.stack import StackError, copy_view, stack_verified, unstack_into
from normlab.train.fit import RunLoop, RunResult, fit_together, together_refusal

__all__ = ["MAX_BATCH", "fit_stacked", "stackable"]

# Largest batch trained stacked. benchmarks/small_batch.py (one thread, ResNet-20 at 16x16,
# 6 seeds, fp32, median of 3), training images/s stacked / separate: 2-core AMD EPYC 2.55x at
# batch 2, 1.55x at 8, 0.92x at 32 and 0.91x at 128; 2-core AMX Xeon 1.92x, 1.42x, 1.07x,
# 0.85x. Above 8 the arithmetic dominates and a grouped convolution is slower per FLOP than a
# plain one.
MAX_BATCH = 8


def _without_seed(config: TrainConfig) -> dict[str, Any]:
    d = config_to_dict(config)
    d.pop("seed", None)
    return d


def stackable(configs: Sequence[TrainConfig]) -> str | None:
    """Why ``configs`` cannot train stacked, or None when the config allows it (the model's
    layers are checked when it is built)."""
    if len(configs) < 2:
        return "fewer than two runs"
    first = _without_seed(configs[0])
    if any(_without_seed(c) != first for c in configs[1:]):
        return "the runs differ in more than the seed"
    if len({c.seed for c in configs}) != len(configs):
        return "two runs have the same seed"
    c = configs[0]
    if c.batch_size > MAX_BATCH:
        return (
            f"batch_size {c.batch_size} > {MAX_BATCH}: at large batches the arithmetic dominates "
            "and separate runs are as fast"
        )
    if c.runtime.device not in ("auto", "cpu"):
        return f"runtime.device {c.runtime.device!r}: stacking is measured on the CPU only"
    if c.optim.grad_clip is not None:
        return "gradient clipping (optim.grad_clip) would couple the copies through one norm"
    if c.runtime.compile:
        return "runtime.compile is on"
    return None


def fit_stacked(
    configs: Sequence[TrainConfig],
    outs: Sequence[str | Path],
    *,
    callbacks: Sequence[Sequence[Callback]] | None = None,
    data: DataBundle | None = None,
    verbose: bool = False,
) -> list[RunResult]:
    """Train (or resume) the runs ``configs`` (equal but for the seed) into ``outs`` together.

    Each ``outs[i]`` is created or resumed as ``fit(configs[i], out=outs[i], resume=True)``
    would; runs that already finished are returned as they are. ``callbacks[i]`` observe run
    i (epoch-level methods only). Raises ConfigError, before anything is trained, when the runs
    cannot be stacked (see the module docs); the caller can then train them one at a time.
    """
    why = stackable(configs)
    if why is not None:
        raise ConfigError(f"these runs cannot train stacked: {why}")
    return fit_together(
        configs,
        outs,
        callbacks=callbacks,
        data=data,
        verbose=verbose,
        shares_data=lambda a, b: a.data.split_seed_for(a.seed) == b.data.split_seed_for(b.seed),
        check=_check_active,
        train=_train,
    )


def _check_active(loops: Sequence[RunLoop]) -> None:
    why = together_refusal(loops, "the runs' own models only see the end of each epoch")
    if why is not None:
        raise ConfigError(f"these runs cannot train stacked: {why}")
    if loops[0].s.runtime.device.type != "cpu":
        raise ConfigError(
            f"these runs cannot train stacked: they run on {loops[0].s.runtime.device}, and "
            "stacking is measured on the CPU only"
        )


class _Stack:
    """The stacked module, its optimizer and schedule, mirroring the runs' own."""

    def __init__(self, loops: Sequence[RunLoop]) -> None:
        self.loops = list(loops)
        models = [lp.s.model for lp in loops]
        # verification needs one batch's shape only (it draws its own float64 inputs)
        n = max(2, min(4, loops[0].config.batch_size))
        example = torch.zeros((n, *loops[0].s.data.train_images.shape[1:]))
        try:
            wide = stack_verified(models, example)
        except StackError as exc:
            raise ConfigError(f"these runs cannot train stacked: {exc}") from None
        dtype = next(models[0].parameters()).dtype
        # grouped convolutions ran faster in NCHW than channels_last here (6 copies of
        # ResNet-20 at 16x16, one thread: 42 vs 62 ms per step at batch 2, 113 vs 121 at 8)
        self.model = (
            wide.to(loops[0].s.runtime.device, dtype)
            .to(memory_format=torch.contiguous_format)
            .train()
        )
        self.k = len(loops)
        first = loops[0].s
        names = {id(p): n for n, p in first.model.named_parameters()}
        params = dict(self.model.named_parameters())
        groups = []
        for g in first.optimizer.param_groups:
            wide_group = {key: value for key, value in g.items() if key != "params"}
            wide_group["params"] = [params[names[id(p)]] for p in g["params"]]
            groups.append(wide_group)
        defaults = dict(first.optimizer.defaults)
        if "foreach" in defaults and defaults.get("fused") is not True:
            defaults["foreach"] = True  # one kernel per op over all tensors: same arithmetic
        self.optimizer = type(first.optimizer)(groups, **defaults)
        self._load_optimizer_state()
        c = first.config
        self.scheduler = build_scheduler(self.optimizer, c.optim, len(first.train_loader), c.epochs)
        self.scheduler.load_state_dict(first.scheduler.state_dict())
        for wide_group, g in zip(
            self.optimizer.param_groups, first.optimizer.param_groups, strict=True
        ):
            wide_group["lr"] = g["lr"]
        self.l2 = [params[names[id(p)]] for p in first.l2.params] if first.l2 is not None else None
        self.l2_coef = first.l2.coef if first.l2 is not None else 0.0

    def _load_optimizer_state(self) -> None:
        """The runs' optimizer states (e.g. momentum after a resume), concatenated."""
        states = [lp.s.optimizer.state_dict()["state"] for lp in self.loops]
        wide = self.optimizer.state_dict()
        merged: dict[int, dict[str, Any]] = {}
        for index in states[0]:
            entry: dict[str, Any] = {}
            for key, value in states[0][index].items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    entry[key] = torch.cat([s[index][key] for s in states])
                else:
                    entry[key] = value
            merged[index] = entry
        wide["state"] = merged
        self.optimizer.load_state_dict(wide)

    def penalty(self) -> torch.Tensor | None:
        """Each copy's L2 penalty, shape (K,), as :class:`~normlab.engine.optim.L2Penalty`."""
        if self.l2 is None:
            return None
        total = torch.zeros(self.k, dtype=torch.float32, device=self.l2[0].device)
        for p in self.l2:
            total = total + p.float().pow(2).reshape(self.k, -1).sum(1)
        return self.l2_coef * total

    def write_back(self, alive: Sequence[int]) -> None:
        """Copy the live copies' tensors, optimizer state, schedule and learning rates into
        their runs."""
        unstack_into(self.model, [lp.s.model for lp in self.loops], only=alive)
        state = self.optimizer.state_dict()
        for i in alive:
            lp = self.loops[i]
            own = lp.s.optimizer.state_dict()
            params = [p for g in lp.s.optimizer.param_groups for p in g["params"]]
            own["state"] = {
                index: {
                    key: (
                        copy_view(value, i, self.k, params[index].shape).clone()
                        if isinstance(value, torch.Tensor) and value.dim() > 0
                        else value
                    )
                    for key, value in entry.items()
                }
                for index, entry in state["state"].items()
            }
            for g, wide_group in zip(own["param_groups"], state["param_groups"], strict=True):
                g["lr"] = wide_group["lr"]
            lp.s.optimizer.load_state_dict(own)
            lp.s.scheduler.load_state_dict(self.scheduler.state_dict())


def _train(loops: Sequence[RunLoop]) -> None:
    stack = _Stack(loops)
    seeds = [lp.config.seed for lp in loops]
    for lp in loops:
        lp.extra_summary["stacked"] = {"seeds": seeds}
    alive = list(range(len(loops)))
    with contextlib.ExitStack() as runs:
        for lp in loops:
            runs.enter_context(lp.running())
        for epoch in loops[0].epochs():
            for i in alive:
                loops[i].epoch_start(epoch)
            rows, diverged = _epoch(stack, alive, epoch)
            for i, step in diverged.items():
                loops[i].diverged(epoch, step)
                alive.remove(i)
            stack.write_back(alive)
            for i in alive:
                loops[i].end_epoch(epoch, rows[i])
            if not alive:
                break
        for i in alive:
            loops[i].complete()


def stack_batch(batches: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The K copies' ``(images, labels)`` batches as the stacked module takes them: images
    concatenated on the channel axis, copy-major and NCHW-contiguous; labels ``(N, K)``."""
    x = torch.cat([b[0] for b in batches], 1).contiguous()
    y = torch.stack([b[1] for b in batches], 1)
    return x, y


def _epoch(
    stack: _Stack, alive: list[int], epoch: int
) -> tuple[dict[int, dict[str, Any]], dict[int, int]]:
    """One stacked training epoch: each live copy's metrics row and the step at which any
    copy's loss became non-finite (that copy stops there, as ``train_epoch`` stops a run)."""
    loops, k = stack.loops, stack.k
    model, optimizer, scheduler = stack.model, stack.optimizer, stack.scheduler
    model.train()
    first = loops[0]
    cfg, device = first.config, first.s.runtime.device
    live_dev = torch.zeros(k, dtype=torch.bool, device=device)
    live_dev[alive] = True
    loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
    l2_sum = torch.zeros(k, dtype=torch.float64, device=device)
    correct = torch.zeros(k, dtype=torch.int64, device=device)
    seen = 0
    diverged: dict[int, int] = {}
    lr = optimizer.param_groups[0]["lr"]
    t0 = time.perf_counter()
    # every copy's loader draws its own epoch (order, crops, flips), exactly as in its own run
    for step, batches in enumerate(zip(*(lp.s.train_loader for lp in loops), strict=True)):
        x, y = stack_batch(batches)
        n = y.shape[0]
        with first.state.autocast():
            out = model(x)
        logits = out.float().view(n, k, -1)
        losses = nn.functional.cross_entropy(
            logits.permute(0, 2, 1), y, reduction="none", label_smoothing=cfg.optim.label_smoothing
        ).mean(0)  # K: each copy's mean loss over its batch
        totals = losses
        penalty = stack.penalty()
        if penalty is not None:
            totals = losses + penalty
            l2_sum += penalty.detach().double()
        bad = ~torch.isfinite(totals.detach()) & live_dev
        if bool(bad.any()):
            for i in bad.nonzero().flatten().tolist():
                diverged[i] = step
            live_dev = live_dev & ~bad
            if not bool(live_dev.any()):
                break
        optimizer.zero_grad(set_to_none=True)
        torch.where(live_dev, totals, torch.zeros_like(totals)).sum().backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        loss_sum += losses.detach().double() * n
        correct += (logits.detach().argmax(2) == y).sum(0)
        seen += n
    seconds = time.perf_counter() - t0
    steps = len(first.s.train_loader)
    live_now = [i for i in alive if i not in diverged]
    total_loss = loss_sum.tolist()
    for i in live_now:
        if not math.isfinite(total_loss[i]):  # a non-finite loss the step checks missed
            diverged[i] = steps - 1
    rows: dict[int, dict[str, Any]] = {}
    for i in alive:
        if i in diverged:
            continue
        row: dict[str, Any] = {
            "epoch": epoch,
            "train/loss": total_loss[i] / max(seen, 1),
            "train/acc": int(correct[i]) / max(seen, 1),
            "lr": lr,
            "seconds": seconds,
            "images_per_s": seen / seconds if seconds > 0 else float("nan"),
        }
        if penalty is not None:
            row["train/l2"] = float(l2_sum[i]) / max(steps, 1)
        rows[i] = row
    return rows, diverged
