"""One training epoch: :func:`train_epoch`."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from normlab.engine.callbacks import Callback
from normlab.engine.distributed import all_reduce_sum
from normlab.engine.optim import L2Penalty
from normlab.engine.state import FitState


def progress_enabled(setting: str) -> bool:
    """``runtime.progress``: "on", "off", or "auto" (only when stderr is a terminal)."""
    if setting == "on":
        return True
    if setting == "off":
        return False
    return sys.stderr.isatty()


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


def train_epoch(
    state: FitState,
    train_model: nn.Module,
    l2: L2Penalty | None,
    epoch: int,
    show_progress: bool,
    callbacks: Sequence[Callback],
) -> tuple[dict[str, Any], int | None]:
    """One training epoch; returns its metrics row and the step at which the loss became
    non-finite (None if it did not). The model's modes are the caller's: ``RunLoop.epoch_start``
    puts it in training mode before the callbacks' ``on_epoch_start``."""
    cfg = state.config
    model, optimizer, scheduler = state.model, state.optimizer, state.scheduler
    device = state.runtime.device
    # Accumulate on the device: no host sync per step (the loss check below is the only one).
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    l2_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    lr = optimizer.param_groups[0]["lr"]
    t0 = time.perf_counter()
    # A loss check needs a host sync: every step on CPU (free), every 25 steps on a GPU.
    check_every = 1 if state.runtime.device.type == "cpu" else 25
    with _progress(len(state.train_loader), f"epoch {epoch}/{cfg.epochs}", show_progress) as bar:
        for step, (x, y) in enumerate(state.train_loader):
            if state.dist.enabled:  # this rank's contiguous slice of the global batch
                x = x.tensor_split(state.dist.world_size)[state.dist.rank]
                y = y.tensor_split(state.dist.world_size)[state.dist.rank]
            with state.autocast():
                out = train_model(x)
            loss = nn.functional.cross_entropy(
                out.float(), y, label_smoothing=cfg.optim.label_smoothing
            )
            total = loss
            if l2 is not None:
                penalty = l2()
                total = loss + penalty
                l2_sum += penalty.detach().double()
            if step % check_every == 0 and not _all_finite(total.detach(), state.dist.enabled):
                return {}, step
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if cfg.optim.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            n = y.numel()
            loss_sum += loss.detach().double() * n
            correct += (out.detach().argmax(1) == y).sum()
            seen += n
            for cb in callbacks:
                cb.on_step_end(state, epoch, step)
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{float(loss):.3f}")
    total_loss, total_correct, total_seen, total_l2 = all_reduce_sum(
        [float(loss_sum), int(correct), seen, float(l2_sum)], device
    )
    if not math.isfinite(total_loss):
        return {}, len(state.train_loader) - 1
    seconds = time.perf_counter() - t0
    steps = len(state.train_loader)
    row: dict[str, Any] = {
        "epoch": epoch,
        "train/loss": total_loss / max(total_seen, 1),
        "train/acc": total_correct / max(total_seen, 1),
        "lr": lr,
        "seconds": seconds,
        "images_per_s": total_seen / seconds if seconds > 0 else float("nan"),
    }
    if l2 is not None:
        row["train/l2"] = total_l2 / state.dist.world_size / max(steps, 1)
    return row, None


def _all_finite(value: torch.Tensor, distributed: bool) -> bool:
    """Whether ``value`` is finite on every rank (all ranks must agree to stop together)."""
    if not distributed:
        return bool(torch.isfinite(value).all())
    flag = torch.isfinite(value).all().to(torch.float64).reshape(1)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() == 1.0)
