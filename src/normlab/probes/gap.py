"""``gap`` probe: the same batch in training mode and in inference mode (seed 002).

At the end of each epoch one fixed batch of ``batch_size`` training images (no augmentation;
the training batch size by default, because batch statistics depend on it) is forwarded twice:

* ``gap/train/loss``, ``gap/train/acc``: in batch-statistics mode
  (:func:`normlab.probes.stats.batch_statistics_mode`): every BN-family layer normalises with
  the batch's own statistics, as in training; dropout is *off*, so the gap isolates what
  normalization does differently in the two modes (and no random number is drawn);
* ``gap/eval/loss``, ``gap/eval/acc``: in eval mode, BN with its running statistics.

Loss is the mean cross-entropy (no label smoothing), accuracy the top-1 fraction. A large gap
(eval much worse than train on the very same images) is the train/inference discrepancy of a
BN whose running statistics do not match its batch statistics. Cost: two forward passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from normlab.errors import ConfigError
from normlab.models.modes import preserved_modes
from normlab.probes.base import Option, Probe, sample_loader
from normlab.probes.context import Batches
from normlab.probes.stats import AutocastLike, batch_statistics_mode

if TYPE_CHECKING:
    from normlab.probes.context import ProbeContext

__all__ = ["GapProbe", "train_eval_gap"]


def _loss_acc(out: Tensor, y: Tensor) -> tuple[float, float]:
    loss = nn.functional.cross_entropy(out.float(), y)
    return float(loss), float((out.argmax(1) == y).double().mean())


def train_eval_gap(
    model: nn.Module, x: Tensor, y: Tensor, autocast: AutocastLike = None
) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``(x, y)`` in batch-statistics mode and in eval mode.

    Returns ``{"train/loss", "train/acc", "eval/loss", "eval/acc"}``. The model is left exactly
    as it was (running buffers restored, train/eval flags restored, no gradients touched).
    """
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    with torch.no_grad():
        with batch_statistics_mode(model), ctx:
            out_train = model(x)
        with preserved_modes(model), ctx:
            model.eval()
            out_eval = model(x)
    train_loss, train_acc = _loss_acc(out_train, y)
    eval_loss, eval_acc = _loss_acc(out_eval, y)
    return {
        "train/loss": train_loss,
        "train/acc": train_acc,
        "eval/loss": eval_loss,
        "eval/acc": eval_acc,
    }


class GapProbe(Probe):
    """Train-mode vs eval-mode loss and accuracy on one fixed training batch."""

    name = "gap"
    OPTIONS: ClassVar[dict[str, Option]] = {
        "batch_size": (int, 0, 0, "images in the fixed batch (0: the training batch size)"),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["batch_size"] == 1:
            raise ConfigError(
                "probes: option batch_size of probe 'gap' must be 0 (the training batch size) "
                "or >= 2: batch statistics of one image are degenerate"
            )
        self._batch: Batches | None = None

    def start(self, ctx: ProbeContext) -> None:
        bs = self.options["batch_size"] or ctx.batch_size
        self._batch = sample_loader(
            ctx, split="train", samples=bs, batch_size=bs, salt=self.name, drop_last=True
        )

    def measure(self, ctx: ProbeContext, epoch: int, row: Mapping[str, Any]) -> dict[str, Any]:
        if self._batch is None:
            return {}
        x, y = next(iter(self._batch))  # the one batch: the same tensors every epoch
        gap = train_eval_gap(ctx.model, x, y, ctx.autocast())
        return {f"gap/{key}": value for key, value in gap.items()}
