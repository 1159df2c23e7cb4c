"""The doctor's dynamic checks: what running the model on a batch shows.

All run on deep copies (dropout off): the model passed in is never modified.

* :func:`batch_dependence`: does a sample's output depend on its batch-mates (BN in train mode)?
* :func:`updates_in_current_mode`: which BN layers' statistics move in one forward?
* ``bn-estimation-shift`` (a registered ``data`` check): running statistics against the
  population statistics of real batches.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from normlab.bn.checks import check
from normlab.bn.findings import Finding
from normlab.bn.graph import norm_family
from normlab.bn.recalibrate import batch_input, recalibrate_batchnorm
from normlab.errors import NormlabError
from normlab.probes.stats import estimation_shift

__all__ = ["DataInput", "batch_dependence", "first_input", "updates_in_current_mode"]


@dataclass
class DataInput:
    """What a ``data`` check receives: the model, real batches and the thresholds."""

    model: nn.Module
    batches: Iterable[Any]
    max_batches: int
    mean_threshold: float
    var_threshold: float
    target_hint: str
    skip: set[str] = field(default_factory=set)
    """Layers already reported broken (initial or non-finite statistics)."""


def first_input(data: Any) -> Any:
    if isinstance(data, Tensor):
        return data
    for batch in data:
        return batch_input(batch)
    return None


def _no_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout | nn.Dropout1d | nn.Dropout2d | nn.Dropout3d | nn.AlphaDropout):
            m.eval()


def batch_dependence(model: nn.Module, x: Tensor) -> float | None:
    """max |f(x[:1]) - f(x)[:1]| with the model in its current mode (on a copy; dropout off)."""
    if x.shape[0] < 2:
        return None
    probe = copy.deepcopy(model)
    _no_dropout(probe)
    with torch.no_grad():
        try:
            alone = probe(x[:1])
            together = probe(x)
        except Exception:
            return None
    if not isinstance(alone, Tensor) or not isinstance(together, Tensor):
        return None
    return float((alone.double() - together[:1].double()).abs().max())


def updates_in_current_mode(model: nn.Module, x: Tensor) -> set[str]:
    """Names of BN layers whose running statistics move in one forward in the current mode."""
    probe = copy.deepcopy(model)
    _no_dropout(probe)
    before = {
        name: m.running_mean.clone()
        for name, m in probe.named_modules()
        if norm_family(m) == "batchnorm" and isinstance(getattr(m, "running_mean", None), Tensor)
    }
    with torch.no_grad():
        try:
            probe(x)
        except Exception:
            return set()
    moved = set()
    for name, m in probe.named_modules():
        if name in before and not torch.equal(before[name], m.running_mean):
            moved.add(name)
    return moved


@check(
    "bn-estimation-shift",
    "warning",
    "running statistics far from population statistics",
    "running statistics far from the population statistics of the given data (stale after "
    "weight averaging, too few updates, ...)",
    kind="data",
)
def estimation_shift_check(data: DataInput) -> Iterator[Finding]:
    probe = copy.deepcopy(data.model)
    try:
        result = recalibrate_batchnorm(probe, data.batches, num_batches=data.max_batches)
    except NormlabError:
        return
    modules = dict(probe.named_modules())
    for name in result.layers:
        if name in data.skip:
            continue
        old_mean, old_var = result.old[name]
        eps = float(getattr(modules[name], "eps", 1e-5))
        mean_shift, var_shift = estimation_shift(old_mean, old_var, result.population[name], eps)
        if not (math.isfinite(mean_shift) and math.isfinite(var_shift)):
            continue
        if mean_shift > data.mean_threshold or var_shift > data.var_threshold:
            yield Finding(
                "bn-estimation-shift",
                "warning",
                name,
                f"the running statistics differ from the population statistics of the given "
                f"data: mean off by {mean_shift:.2f} std on average over channels, variance off "
                f"by a factor {math.exp(var_shift):.2f} (typical after weight averaging "
                "(SWA/EMA), after too few updates, or on data unlike the training data)",
                f"recompute population statistics on training data: normlab recalibrate "
                f"{data.target_hint} --data D",
                fixable=True,
                evidence={"mean_shift": mean_shift, "var_log_ratio": var_shift},
            )
