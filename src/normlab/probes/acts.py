"""``acts`` probe: the distribution each normalization layer normalises (seed 003).

Goodfellow et al. (Deep Learning, 8.7.1): the input of a norm placed after a ReLU is skewed and
non-Gaussian. At the end of each epoch this probe forwards a fixed sample of ``batches`` x
``batch_size`` training images (or ``images`` of them, cut to whole batches; no augmentation),
records the input of every normalization
layer (:func:`normlab.norms.is_norm`: BN family, GN, LN, IN, frozen BN) and writes, per layer:

* ``acts/mean/<layer>``: mean over channels of the per-channel mean;
* ``acts/std/<layer>``: mean over channels of the per-channel (biased) standard deviation;
* ``acts/skew/<layer>``: mean over channels of the per-channel skewness ``m3 / m2^1.5``
  (biased moments, ``scipy.stats.skew``'s default), over channels with non-zero variance
  (a dead channel has none; NaN, stored as null, if every channel is constant);
* ``acts/zeros/<layer>``: fraction of values exactly 0 (ReLU's dead half).

Statistics are per channel because normalization layers of the BN family normalise per channel
(pooling channels would mix their means into the spread). ``mode=train`` (default) forwards in
batch-statistics mode, the distribution the norms see in training; ``mode=eval`` in eval mode
with the running statistics. Layers appear in execution order. Cost: ``batches`` forward passes
and float64 moments of every norm input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from normlab.errors import ConfigError
from normlab.probes.base import IMAGES_OPTION, Option, Probe, training_batches
from normlab.probes.context import Batches
from normlab.probes.stats import ChannelMoments, layer_input_moments, norm_layers

if TYPE_CHECKING:
    from normlab.probes.context import ProbeContext

__all__ = ["ActsProbe", "activation_summary"]


def activation_summary(m: ChannelMoments) -> dict[str, float]:
    """``mean``, ``std``, ``skew``, ``zeros`` of one layer (definitions in the module docstring)."""
    skew = m.skew
    finite = skew[torch.isfinite(skew)]
    return {
        "mean": float(m.mean.mean()),
        "std": float(m.std.mean()),
        "skew": float(finite.mean()) if finite.numel() else float("nan"),
        "zeros": float(m.zeros.mean()),
    }


class ActsProbe(Probe):
    """Mean, std, skewness and zero fraction of every normalization layer's input."""

    name = "acts"
    OPTIONS: ClassVar[dict[str, Option]] = {
        "batches": (int, 2, 1, "training batches (of the training batch size) forwarded"),
        "images": IMAGES_OPTION,
        "mode": (str, "train", None, "train: batch statistics as in training; eval: running"),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["mode"] not in ("train", "eval"):
            raise ConfigError(
                f"probes: option mode of probe 'acts' must be train or eval, got {self.options['mode']!r}"
            )
        self._train: Batches | None = None

    def start(self, ctx: ProbeContext) -> None:
        self._train = training_batches(
            ctx, self.options["batches"], salt=self.name, images=self.options["images"]
        )

    def measure(self, ctx: ProbeContext, epoch: int, row: Mapping[str, Any]) -> dict[str, Any]:
        layers = norm_layers(ctx.model)
        if self._train is None or not layers:
            return {}
        moments = layer_input_moments(
            ctx.model,
            self._train,
            layers,
            third=True,
            zeros=True,
            normalize_with="batch" if self.options["mode"] == "train" else "running",
            autocast=ctx.autocast(),
        )
        out: dict[str, Any] = {}
        for name, m in moments.items():
            for stat, value in activation_summary(m).items():
                out[f"acts/{stat}/{name}"] = value
        return out
