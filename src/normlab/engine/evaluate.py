"""Loss and accuracy of a model in eval mode: :func:`evaluate`."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from normlab.data import BatchLoader
from normlab.engine.distributed import all_reduce_sum


def evaluate(
    model: nn.Module,
    loader: BatchLoader,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode over ``loader``.

    The model's training flag is restored afterwards, also on error. In a multi-process job
    each rank passes its shard of the data and the sums are reduced over ranks.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Accumulate on the device: no host sync per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    try:
        with torch.no_grad():
            for x, y in loader:
                with autocast if autocast is not None else contextlib.nullcontext():
                    out = model(x)
                loss = nn.functional.cross_entropy(out.float(), y, reduction="sum")
                loss_sum += loss.detach().double()
                correct += (out.argmax(1) == y).sum()
                count += y.numel()
    finally:
        model.train(was_training)
    # In a multi-process job each rank saw a shard of the data: add the shards up.
    total_loss, total_correct, total = all_reduce_sum(
        [float(loss_sum), int(correct), count], device
    )
    if total == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    return {"loss": total_loss / total, "acc": total_correct / total}
