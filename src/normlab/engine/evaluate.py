"""Loss, accuracy and per-image predictions of a model in eval mode: :func:`evaluate`,
:func:`evaluate_with_predictions`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normlab.data import BatchLoader
from normlab.engine.distributed import all_reduce_sum, gather_strided
from normlab.models.modes import preserved_modes


@dataclass(frozen=True)
class Evaluation:
    """Mean cross-entropy, accuracy, and each image's predicted class (int64 [N] on the CPU,
    in the loader's order; the whole validation set's order in a multi-process job)."""

    loss: float
    acc: float
    predictions: torch.Tensor


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    autocast: contextlib.AbstractContextManager[Any] | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode over ``loader``.

    Every module's training flag is restored afterwards, also on error (one by one: a
    submodule kept in eval mode during training stays so). In a multi-process job
    each rank passes its shard of the data and the sums are reduced over ranks.
    """
    result = _evaluate(model, loader, autocast, keep=False)
    return {"loss": result.loss, "acc": result.acc}


def evaluate_with_predictions(
    model: nn.Module,
    loader: BatchLoader,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
) -> Evaluation:
    """:func:`evaluate`, plus the predicted class of every image from the same forward pass.

    In a multi-process job each rank's loader must hold the strided shard
    ``val[rank::world_size]``; the predictions are gathered back into ``val``'s order.
    """
    return _evaluate(model, loader, autocast, keep=True)


def _evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    autocast: contextlib.AbstractContextManager[Any] | None,
    *,
    keep: bool,
) -> Evaluation:
    device = next(model.parameters()).device
    # Accumulate on the device: no host sync per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    kept: list[torch.Tensor] = []  # each batch's argmax, on the device
    with preserved_modes(model), torch.no_grad():
        model.eval()
        for x, y in loader:
            with autocast if autocast is not None else contextlib.nullcontext():
                out = model(x)
            loss = nn.functional.cross_entropy(out.float(), y, reduction="sum")
            loss_sum += loss.detach().double()
            pred = out.argmax(1)
            correct += (pred == y).sum()
            count += y.numel()
            if keep:
                kept.append(pred)
    # In a multi-process job each rank saw a shard of the data: add the shards up.
    total_loss, total_correct, total = all_reduce_sum(
        [float(loss_sum), int(correct), count], device
    )
    predictions = torch.empty(0, dtype=torch.int64)
    if keep:
        shard = torch.cat(kept) if kept else torch.empty(0, dtype=torch.int64, device=device)
        predictions = gather_strided(shard).cpu()  # the one copy to the host
    if total == 0:
        return Evaluation(float("nan"), float("nan"), predictions)
    return Evaluation(total_loss / total, total_correct / total, predictions)
