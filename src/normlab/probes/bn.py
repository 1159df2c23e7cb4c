"""``bn`` probe: what each BN layer has stored (seed 002's "moving_mean is still 0" symptom).

Per batch-statistics norm with running statistics (BN, BRN, ghost BN; see
:func:`normlab.probes.stats.batchnorm_layers`), at the end of each epoch:

* ``bn/running_mean/<layer>``, ``bn/running_var/<layer>``: mean over channels of the running
  mean and of the running (unbiased) variance;
* ``bn/gamma/<layer>``, ``bn/beta/<layer>``: mean over channels of the affine weight and bias
  (absent for ``affine=False``);
* ``bn/num_batches_tracked/<layer>``: how many training forward passes updated the statistics;
* ``bn/init_fraction/<layer>``: the weight the initial values (mean 0, var 1) still carry,
  ``(1 - m)^k`` for PyTorch momentum ``m`` after ``k = num_batches_tracked`` updates
  (:func:`normlab.probes.stats.init_fraction`). Near 1 after training means the statistics were
  never updated; m = 0.01 (Keras' default 0.99) needs k = 459 updates to bring it below 1%.

Cost: a few reductions per layer, no forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from normlab.probes.base import Option, Probe
from normlab.probes.stats import batchnorm_layers, init_fraction

if TYPE_CHECKING:
    from normlab.probes.context import ProbeContext

__all__ = ["BNProbe", "bn_summaries"]


def bn_summaries(model: nn.Module) -> dict[str, Any]:
    """The ``bn/...`` keys described in the module docstring, for every BN layer of ``model``."""
    out: dict[str, Any] = {}
    for name, m in batchnorm_layers(model).items():
        assert m.running_mean is not None and m.running_var is not None
        out[f"bn/running_mean/{name}"] = float(m.running_mean.detach().double().mean())
        out[f"bn/running_var/{name}"] = float(m.running_var.detach().double().mean())
        if m.weight is not None:
            out[f"bn/gamma/{name}"] = float(m.weight.detach().double().mean())
        if m.bias is not None:
            out[f"bn/beta/{name}"] = float(m.bias.detach().double().mean())
        k = int(m.num_batches_tracked) if m.num_batches_tracked is not None else 0
        out[f"bn/num_batches_tracked/{name}"] = k
        out[f"bn/init_fraction/{name}"] = init_fraction(m.momentum, k)
    return out


class BNProbe(Probe):
    """Running statistics, affine parameters, update counts and initial-value fractions."""

    name = "bn"
    OPTIONS: ClassVar[dict[str, Option]] = {}
    NEEDS_DATA = False

    def measure(self, ctx: ProbeContext, epoch: int, row: Mapping[str, Any]) -> dict[str, Any]:
        return bn_summaries(ctx.model)
