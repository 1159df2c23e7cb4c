"""Precise BatchNorm: replace running statistics with population statistics over N batches.

The running averages a BN keeps during training estimate the statistics of *past* weights, with
exponential weights (momentum) over noisy batches; they go stale after weight averaging (SWA,
EMA), never move when momentum is 0 or the update ops were not run (seed 002), and can be NaN
after an overflow. :func:`recalibrate_batchnorm` recomputes them (Wu & Johnson 2021, "Rethinking
'Batch' in BatchNorm", sec. 3; fvcore's ``update_bn_stats`` is the same idea).

What is computed, per BN channel, over the ``n`` values (samples x positions) it sees across all
batches:

* ``running_mean = sum(x) / n``;
* ``running_var = sum((x - mean)^2) / (n - 1)``: the **unbiased** population variance, the same
  convention as PyTorch's own ``running_var`` (eval mode divides by ``sqrt(running_var + eps)``).

The result also carries each layer's statistics with the **biased** variance
``sum((x - mean)^2) / n`` (``RecalibrationResult.population``, as
:class:`normlab.probes.stats.PopulationStatistics`, the convention of
:mod:`normlab.probes.stats`): the reference the doctor's estimation shift
(:func:`normlab.probes.stats.estimation_shift`) measures the old running statistics against.

Per batch the layer's input mean and sum of squared deviations are computed in float64 and
merged exactly (Chan et al.'s parallel update: :class:`normlab.probes.stats.ChannelMoments`, the
accumulator of the probes' population statistics, fed the input cast to float64), i.e. each
batch is weighted by its number of values: an equal-weight average of per-batch means and per-batch ``E[x^2]`` when the batches have
equal size, and in every case the same result however the data are split into batches (up to
float64 rounding).

During the passes every BN normalises with its batch statistics (train mode, as in training,
with momentum 0 so the running buffers do not move); every other module is in eval mode
(dropout off), so the statistics are those the inference network sees. No gradients are kept.
Every module's training flag, every BN's momentum and the forward hooks are restored or removed
in ``finally``, also on error. ``num_batches_tracked`` advances by the number of batches run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.errors import DataError, NormlabError
from normlab.models.modes import preserved_modes
from normlab.probes.stats import ChannelMoments, PopulationStatistics

__all__ = ["RecalibrationResult", "batch_input", "recalibrate_batchnorm"]


@dataclass
class RecalibrationResult:
    """What :func:`recalibrate_batchnorm` did."""

    layers: list[str]
    """BN layers whose statistics were replaced."""
    batches: int
    samples: int
    values_per_channel: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(layer, reason): BN-like layers left alone (no running statistics, not reached)."""
    old: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)
    """Layer -> (running_mean, running_var) before recalibration (float64 copies)."""
    population: dict[str, PopulationStatistics] = field(default_factory=dict, repr=False)
    """Layer -> the population statistics measured, with the **biased** variance (float64, on
    the layer's device): what :func:`normlab.probes.stats.estimation_shift` compares running
    statistics with. ``running_var`` got the unbiased one, ``var * count / (count - 1)``."""


def batch_input(batch: Any) -> Any:
    """The model input of a batch: a tensor as is; the first element of a tuple/list
    (``(x, y)`` loaders); ``batch["input"]`` or ``batch["image"]`` of a dict."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, tuple | list) and batch:
        return batch[0]
    if isinstance(batch, dict):
        for key in ("input", "inputs", "image", "images", "x"):
            if key in batch:
                return batch[key]
    raise DataError(
        f"cannot find the model input in a batch of type {type(batch).__name__}; pass tensors, "
        "(input, target) pairs, or a forward= callable"
    )


@contextlib.contextmanager
def _recalibration_mode(bns: list[_BatchNorm], model: nn.Module) -> Iterator[None]:
    momenta = [(bn, bn.momentum) for bn in bns]
    with preserved_modes(model):
        try:
            model.eval()
            for bn in bns:
                bn.train()
                bn.momentum = 0.0  # batch statistics for normalisation, running buffers untouched
            yield
        finally:
            for bn, momentum in momenta:
                bn.momentum = momentum


def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
) -> RecalibrationResult:
    """Set every BN's running statistics to population statistics over ``batches``, in place.

    Args:
        model: any ``nn.Module``; every ``_BatchNorm`` with running statistics is recalibrated
            (BatchNorm*d, SyncBatchNorm, BatchRenorm, ghost BN). Frozen BNs are left alone.
        batches: an iterable of batches: tensors, ``(input, target)`` pairs or dicts (see
            :func:`batch_input`); e.g. a :class:`~normlab.data.BatchLoader` or a DataLoader.
        num_batches: use at most this many batches (None: all of them).
        forward: ``forward(model, batch)`` for models that take more than one input
            (default: ``model(batch_input(batch))``).
        device: move inputs there (default: the device of the model's first parameter).

    Returns a :class:`RecalibrationResult`. Raises :class:`DataError` if no batch was seen and
    :class:`NormlabError` if a BN saw only one value per channel (no variance to estimate).
    See the module docstring for the exact statistics (unbiased ``running_var``).
    """
    if num_batches is not None and num_batches < 1:
        raise NormlabError(f"num_batches must be >= 1 or None, got {num_batches}")
    named = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None
    ]
    skipped = [
        (name, "track_running_stats=False: it keeps no statistics to recalibrate")
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and (m.running_mean is None or m.running_var is None)
    ]
    moments = {name: ChannelMoments() for name, _ in named}
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(m: nn.Module, args: tuple[Any, ...]) -> None:
            # float64 from the start, not only in the merge: a one-off pass, precision is cheap
            moments[name].update(args[0].double())

        return record

    handles = []
    n_batches = samples = 0
    try:
        for name, bn in named:
            handles.append(bn.register_forward_pre_hook(hook(name)))
        with _recalibration_mode([bn for _, bn in named], model), torch.no_grad():
            for batch in batches:
                if num_batches is not None and n_batches >= num_batches:
                    break
                try:
                    if forward is not None:
                        forward(model, batch)
                    else:
                        x = batch_input(batch)
                        if isinstance(x, Tensor):
                            x = x.to(device)
                            samples += int(x.shape[0])
                        model(x)
                except ValueError as exc:  # e.g. "Expected more than 1 value per channel"
                    raise DataError(
                        f"recalibration forward failed on batch {n_batches + 1}: {exc}"
                    ) from exc
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0:
        raise DataError("recalibration needs at least one batch; the batch iterable was empty")
    result = RecalibrationResult([], n_batches, samples, skipped=skipped)
    with torch.no_grad():
        for name, bn in named:
            mom = moments[name]
            n = mom.count
            if n == 0:
                result.skipped.append((name, "not reached by the forward passes"))
                continue
            if n < 2:
                raise NormlabError(
                    f"layer {name!r} saw {n} value per channel over {n_batches} batch(es); "
                    "a variance needs at least 2: use more or larger batches"
                )
            assert bn.running_mean is not None and bn.running_var is not None
            result.old[name] = (
                bn.running_mean.detach().double().cpu().clone(),
                bn.running_var.detach().double().cpu().clone(),
            )
            population = PopulationStatistics(mean=mom.mean, var=mom.var, count=n)  # biased
            bn.running_mean.copy_(population.mean.to(bn.running_mean))
            bn.running_var.copy_((population.var * (n / (n - 1))).to(bn.running_var))
            result.layers.append(name)
            result.values_per_channel[name] = n
            result.population[name] = population
    return result
