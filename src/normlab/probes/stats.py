"""Statistics of what normalization layers see: the math shared by the probes and the BN toolbox.

Plain functions first (fvcore's ``precise_bn`` style); the probes in this package are thin
wrappers around them, and ``normlab.bn`` calls them too: recalibration accumulates with
:class:`ChannelMoments` (and writes the unbiased variance into ``running_var``), the doctor's
``bn-estimation-shift`` is :func:`estimation_shift` against those statistics with the biased
variance. (``normlab.bn`` imports this module; nothing here imports ``normlab.bn``.)

Conventions, stated once for everything in this module:

* *Channel* is dim 1 of a layer input of shape ``(N, C, *)``; a per-channel statistic pools the
  ``N x prod(*)`` values of that channel (samples and spatial positions alike).
* *Variance* is the **biased** (population) variance, sum of squared deviations / n. PyTorch's
  ``running_var`` tracks the *unbiased* per-batch variance (divide by n - 1, n = values per
  channel in the batch); the two agree to a relative ``1 / n`` (e.g. 1.2e-4 for 128 CIFAR images
  at 8x8), and for i.i.d. values both estimate the same population variance.
* Per-batch moments are computed in the input's precision (at least float32) and merged batch
  by batch in float64 with the exact pairwise update
  (Chan, Golub & LeVeque 1979; Pébay 2008): the result equals the statistics of all values
  concatenated, whatever the batch split. For equal-size batches this is the equal-weight
  average of the per-batch means and of the per-batch ``E[x^2]`` (``var = avg E[x^2] - mean^2``),
  computed without the cancellation that formula suffers from.
* *Batch-statistics mode* (:func:`batch_statistics_mode`): the model in eval mode except every
  batch-statistics norm (``_BatchNorm``: BN, BRN, ghost BN), which runs in training mode and
  normalises with the statistics of the current batch, exactly as during training. Dropout is
  off (no random numbers drawn) and every running buffer is restored after each batch and on
  exit, so the model comes out bit-identical.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from normlab.models.modes import preserved_modes
from normlab.norms import BatchRenorm1d, BatchRenorm2d, is_norm

__all__ = [
    "ChannelMoments",
    "PopulationStatistics",
    "batch_statistics_mode",
    "batchnorm_layers",
    "estimation_shift",
    "init_fraction",
    "layer_input_moments",
    "load_population_statistics",
    "norm_layers",
    "population_statistics",
    "substituted_statistics",
]

AutocastLike = contextlib.AbstractContextManager[Any] | None


# --------------------------------------------------------------------------------------------
# per-channel moments


class ChannelMoments:
    """Per-channel count, mean, second and (optionally) third central moment sums, and
    (optionally) the number of exact zeros, over every value passed to :meth:`update`.

    ``update(x)`` takes ``x`` of shape ``(N, C, *)`` (or ``(N, C)``); all updates must have the
    same ``C``. Each batch's moments are computed in the input's precision (at least float32;
    relative error ~1e-6 for float32 inputs) and merged in float64 with the exact pairwise update
    (see the module docstring), so splitting the same values into other batches changes nothing
    beyond rounding.
    """

    def __init__(self, *, third: bool = False, zeros: bool = False) -> None:
        self.third = third
        self.track_zeros = zeros
        self.count = 0
        """Values per channel seen so far (the same for every channel)."""
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None
        self._m3: Tensor | None = None
        self._zeros: Tensor | None = None

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"ChannelMoments expects (N, C, *) inputs, got shape {tuple(x.shape)}")
        c = x.shape[1]
        if self._mean is not None and self._mean.numel() != c:
            raise ValueError(
                f"ChannelMoments: {c} channels, earlier batches had {self._mean.numel()}"
            )
        n_b = x.numel() // c if c else 0
        if n_b == 0:
            return
        dims = [0, *range(2, x.dim())]
        xw = x.detach().to(torch.promote_types(x.dtype, torch.float32))
        var_b, mean_b = torch.var_mean(xw, dim=dims, correction=0)  # one pass, biased
        m3_b = zeros_b = None
        if self.third:
            d = xw - mean_b.view((1, c) + (1,) * (x.dim() - 2))
            m3_b = (d * d * d).sum(dims).double()
        if self.track_zeros:
            zeros_b = (xw == 0).sum(dims).double()
        self._merge(n_b, mean_b.double(), var_b.double() * n_b, m3_b, zeros_b)

    @torch.no_grad()
    def add_batch_statistics(self, mean: Tensor, var: Tensor, count: int) -> None:
        """Merge one batch given by its per-channel mean and *biased* variance over ``count``
        values per channel (e.g. read from a BN layer); only for ``third=False, zeros=False``."""
        if self.third or self.track_zeros:
            raise ValueError("add_batch_statistics carries no third moment or zero count")
        if count > 0:
            # copy: ``mean`` may be a buffer that is about to be restored (no aliasing)
            mean64 = mean.detach().to(torch.float64, copy=True)
            self._merge(count, mean64, var.detach().double() * count, None, None)

    def _merge(
        self, n_b: int, mean_b: Tensor, m2_b: Tensor, m3_b: Tensor | None, zeros_b: Tensor | None
    ) -> None:
        """Pairwise merge of a batch's (count, mean, M2, M3, zeros) into the running totals."""
        if self._mean is not None and self._mean.numel() != mean_b.numel():
            raise ValueError(
                f"ChannelMoments: {mean_b.numel()} channels, earlier batches had {self._mean.numel()}"
            )
        if self._mean is None:
            self.count, self._mean, self._m2, self._m3, self._zeros = (
                n_b,
                mean_b,
                m2_b,
                m3_b,
                zeros_b,
            )
            return
        assert self._m2 is not None
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self._mean
        if self.third:
            assert self._m3 is not None and m3_b is not None
            self._m3 = (
                self._m3
                + m3_b
                + delta**3 * n_a * n_b * (n_a - n_b) / n**2
                + 3.0 * delta * (n_a * m2_b - n_b * self._m2) / n
            )
        self._m2 = self._m2 + m2_b + delta**2 * (n_a * n_b / n)
        self._mean = self._mean + delta * (n_b / n)
        if self.track_zeros:
            assert self._zeros is not None and zeros_b is not None
            self._zeros = self._zeros + zeros_b
        self.count = n

    def _need(self, t: Tensor | None) -> Tensor:
        if t is None:
            raise ValueError("ChannelMoments has seen no values")
        return t

    @property
    def mean(self) -> Tensor:
        """Per-channel mean, float64 ``[C]``."""
        return self._need(self._mean)

    @property
    def var(self) -> Tensor:
        """Per-channel biased variance, float64 ``[C]``."""
        return self._need(self._m2) / self.count

    @property
    def std(self) -> Tensor:
        """Per-channel biased standard deviation, float64 ``[C]``."""
        return self.var.sqrt()

    @property
    def skew(self) -> Tensor:
        """Per-channel skewness ``m3 / m2^1.5`` with biased central moments (as
        ``scipy.stats.skew(..., bias=True)``); NaN for a constant channel (std at most
        ``1e-6 * (1 + |mean|)``)."""
        if not self.third:
            raise ValueError("ChannelMoments(third=False) does not track the third moment")
        m2 = self._need(self._m2) / self.count
        m3 = self._need(self._m3) / self.count
        out = m3 / m2.pow(1.5)
        # A (numerically) constant channel, e.g. a dead ReLU, has no defined skewness; rounding
        # must not turn it into a huge finite number: std <= 1e-6 (1 + |mean|) counts as constant.
        degenerate = m2 <= (1e-6 * (1.0 + self.mean.abs())) ** 2
        return torch.where(degenerate, torch.full_like(out, math.nan), out)

    @property
    def zeros(self) -> Tensor:
        """Per-channel fraction of values exactly equal to 0, float64 ``[C]``."""
        if not self.track_zeros:
            raise ValueError("ChannelMoments(zeros=False) does not count zeros")
        return self._need(self._zeros) / self.count


# --------------------------------------------------------------------------------------------
# layers and modes


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Every batch-statistics norm with running statistics (``_BatchNorm`` with
    ``track_running_stats``: BN, SyncBN, BRN, ghost BN), by qualified name, in module order."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None
    }


def norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every normalization layer (:func:`normlab.norms.is_norm`), by name, in module order."""
    return {name: m for name, m in model.named_modules() if is_norm(m)}


_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def batch_statistics_mode(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Run ``model`` as during training as far as normalization goes, and leave no trace.

    Inside the block: ``model.eval()`` (dropout off), then every ``_BatchNorm`` in training mode
    (it normalises with the current batch's statistics and updates its running buffers). Yields
    ``restore()``, which puts every BN's ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` back to their values on entry; call it after each forward pass so that
    every batch sees the same running statistics (Batch Renormalization reads them). On exit,
    also after an exception, the buffers are restored and every module's ``training`` flag is
    set back to what it was.
    """
    saved: list[tuple[Tensor, Tensor]] = []
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            for key in _BUFFERS:
                buf = getattr(m, key, None)
                if isinstance(buf, Tensor):
                    saved.append((buf, buf.detach().clone()))

    def restore() -> None:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)

    with preserved_modes(model):
        try:
            model.eval()
            for m in model.modules():
                if isinstance(m, _BatchNorm):
                    m.train()
            yield restore
        finally:
            restore()


@contextlib.contextmanager
def _mode(model: nn.Module, normalize_with: str) -> Iterator[Callable[[], None]]:
    """``normalize_with="batch"``: :func:`batch_statistics_mode`; ``"running"``: eval mode."""
    if normalize_with == "batch":
        with batch_statistics_mode(model) as restore:
            yield restore
        return
    if normalize_with != "running":
        raise ValueError(f"normalize_with must be 'batch' or 'running', got {normalize_with!r}")
    with preserved_modes(model):
        model.eval()
        yield lambda: None


def _inputs(batches: Iterable[Any]) -> Iterator[Tensor]:
    for batch in batches:
        x = batch[0] if isinstance(batch, tuple | list) else batch
        if not isinstance(x, Tensor):
            raise TypeError(f"batches must yield tensors or (x, y) pairs, got {type(x).__name__}")
        yield x


def layer_input_moments(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Mapping[str, nn.Module],
    *,
    third: bool = False,
    zeros: bool = False,
    normalize_with: str = "batch",
    autocast: AutocastLike = None,
) -> dict[str, ChannelMoments]:
    """Per-channel moments of the *input* of each module in ``layers`` over ``batches``
    (:class:`ChannelMoments`; ``third`` and ``zeros`` add the third moment and the zero count).

    ``batches`` yields input tensors or ``(x, y)`` pairs (a ``BatchLoader`` does). The model
    runs under ``torch.no_grad`` in batch-statistics mode (``normalize_with="batch"``, see
    :func:`batch_statistics_mode`) or in eval mode with the running statistics
    (``"running"``). The result is ordered by the order in which the layers first ran (execution
    order, i.e. depth); layers that never ran are absent. Forward pre-hooks are removed,
    running buffers and train/eval flags restored, also when an exception escapes.
    """
    moments: dict[str, ChannelMoments] = {}
    handles: list[RemovableHandle] = []

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], Tensor):
                moments.setdefault(name, ChannelMoments(third=third, zeros=zeros)).update(args[0])

        return record

    with _mode(model, normalize_with) as restore:
        try:
            for name, module in layers.items():
                handles.append(module.register_forward_pre_hook(hook(name)))
            with torch.no_grad():
                for x in _inputs(batches):
                    with autocast if autocast is not None else contextlib.nullcontext():
                        model(x)
                    restore()
        finally:
            for handle in handles:
                handle.remove()
    return moments


# --------------------------------------------------------------------------------------------
# population statistics and estimation shift


@dataclass(frozen=True)
class PopulationStatistics:
    """Statistics of one BN layer's input over a data sample (float64, on the model's device)."""

    mean: Tensor
    """Per-channel mean ``[C]``."""
    var: Tensor
    """Per-channel biased variance ``[C]``."""
    count: int
    """Values per channel the statistics pool (samples x spatial positions)."""


def population_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    normalize_with: str = "batch",
    autocast: AutocastLike = None,
) -> dict[str, PopulationStatistics]:
    """Population statistics of every BN layer's input, recomputed with the current weights.

    This is *precise BN* (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", arXiv
    2105.07576; fvcore's ``update_bn_stats``) with a batch-split-independent variance: the model
    runs over ``batches`` (inputs or ``(x, y)`` pairs, typically training images *without*
    augmentation, in the training batch size) in batch-statistics mode, so each BN layer's input
    is distributed as during training with the current weights; the returned mean and variance
    pool every value of each channel over all batches (see the module docstring: exact merge,
    biased variance). fvcore instead averages the per-batch *variances*, which misses the spread
    of the batch means; both agree when that spread is negligible. The per-batch statistics are
    the ones the BN layers compute in that forward pass (read from their buffers with momentum
    1), so the cost is one forward pass per batch.

    ``normalize_with="running"`` runs the model in eval mode instead: the statistics of the
    input each BN actually receives at inference, with every earlier layer normalising by its
    running estimates.

    The model is left exactly as it was (parameters, running buffers, train/eval flags, no hooks).
    Layers, keyed by qualified module name, come in execution order. Write the result into the
    model with :func:`load_population_statistics` (recalibration) or temporarily with
    :func:`substituted_statistics`.
    """
    layers = batchnorm_layers(model)
    if normalize_with == "batch":
        moments = _batch_mode_moments(model, batches, layers, autocast)
    else:
        moments = layer_input_moments(
            model, batches, layers, normalize_with=normalize_with, autocast=autocast
        )
    return {
        name: PopulationStatistics(mean=m.mean, var=m.var, count=m.count)
        for name, m in moments.items()
    }


# BN layers whose training forward sets running_mean / running_var to exactly the batch mean and
# unbiased batch variance when momentum is 1 (ghost BN averages over chunks instead).
_EXACT_UPDATE: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    BatchRenorm1d,
    BatchRenorm2d,
)


def _batch_mode_moments(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Mapping[str, _BatchNorm],
    autocast: AutocastLike,
) -> dict[str, ChannelMoments]:
    """:func:`layer_input_moments` in batch-statistics mode, mean and variance only, reading
    the batch statistics the BN layers compute anyway instead of recomputing them.

    With momentum 1 a BN layer's training forward leaves ``running_mean = batch mean`` and
    ``running_var = unbiased batch variance`` (``n / (n - 1)`` times the biased one, n = values
    per channel, which a pre-hook records); the buffers are read after each batch and then
    restored. Layers without that exact update (ghost BN, unknown subclasses) are measured on
    their input by a hook, as in :func:`layer_input_moments`. Momentum is restored in
    ``finally``; everything else as in :func:`batch_statistics_mode`.
    """
    fast = {n: m for n, m in layers.items() if type(m) in _EXACT_UPDATE}
    moments: dict[str, ChannelMoments] = {}
    counts: dict[str, int] = {}
    handles: list[RemovableHandle] = []

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], Tensor):
                return
            x = args[0]
            m = moments.setdefault(name, ChannelMoments())  # first call: execution order
            if name in fast:
                counts[name] = x.numel() // x.shape[1]
            else:
                m.update(x)

        return record

    momenta = [(m, m.momentum) for m in fast.values()]
    with batch_statistics_mode(model) as restore:
        try:
            for m in fast.values():
                m.momentum = 1.0
            for name, module in layers.items():
                handles.append(module.register_forward_pre_hook(hook(name)))
            with torch.no_grad():
                for x in _inputs(batches):
                    counts.clear()
                    with autocast if autocast is not None else contextlib.nullcontext():
                        model(x)
                    for name, n in counts.items():
                        bn = fast[name]
                        assert bn.running_mean is not None and bn.running_var is not None
                        biased = bn.running_var * ((n - 1) / n) if n > 1 else bn.running_var * 0
                        moments[name].add_batch_statistics(bn.running_mean, biased, n)
                    restore()
        finally:
            for handle in handles:
                handle.remove()
            for m, momentum in momenta:
                m.momentum = momentum
    return moments


def estimation_shift(
    running_mean: Tensor,
    running_var: Tensor,
    population: PopulationStatistics,
    eps: float,
) -> tuple[float, float]:
    """Normalised distance between a BN layer's running estimates and population statistics.

    With per-channel running mean ``m_hat``, running variance ``v_hat``, population mean ``m``
    and (biased) variance ``v`` over the C channels::

        mean shift = (1 / C) * sum_c |m_hat_c - m_c| / sqrt(v_c + eps)
        var shift  = (1 / C) * sum_c |log(v_hat_c + eps) - log(v_c + eps)|

    The mean shift is in units of the channel's population standard deviation (how far, in
    standard deviations, inference-time normalisation moves the channel off centre); the
    variance shift is the absolute log ratio of the variances that inference-time normalisation
    divides by (``|log r|`` ~ ``|r - 1|`` for small differences, symmetric in over- and
    under-estimation; a factor k on ``v_hat`` gives ``log k`` when ``eps`` is negligible).
    Both are dimensionless and 0 when the estimates equal the population statistics; ``eps`` is
    the layer's own. See docs/estimation_shift.md for the relation to Huang et al. 2022.
    """
    v = population.var.to(torch.float64)
    rm = running_mean.detach().to(v.device, torch.float64)
    rv = running_var.detach().to(v.device, torch.float64)
    mean_shift = ((rm - population.mean.to(torch.float64)).abs() / (v + eps).sqrt()).mean()
    var_shift = ((rv + eps).log() - (v + eps).log()).abs().mean()
    return float(mean_shift), float(var_shift)


def init_fraction(momentum: float | None, num_batches_tracked: int) -> float:
    """Weight of the *initial* value (mean 0, variance 1) still in a BN running statistic.

    PyTorch's update is ``running <- (1 - m) * running + m * batch`` (Keras' ``momentum=0.99``
    is ``m = 0.01``), so after k updates ``running = (1 - m)^k * initial + sum of batch terms``:
    the fraction is ``(1 - m)^k``. With ``momentum=None`` (cumulative average, factor
    ``1 / k``) the first update replaces the initial value entirely: 1 for k = 0, else 0.
    A value near 1 after training is the classic "moving_mean is still ~0" symptom (statistics
    never updated: trained with ``training=False``, or the update ops not run).
    """
    k = int(num_batches_tracked)
    if k < 0:
        raise ValueError(f"num_batches_tracked must be >= 0, got {k}")
    if momentum is None:
        return 1.0 if k == 0 else 0.0
    return float((1.0 - float(momentum)) ** k)


def load_population_statistics(model: nn.Module, stats: Mapping[str, PopulationStatistics]) -> None:
    """Write ``stats`` into the running mean/variance of the named BN layers of ``model``
    (permanently: this *is* recalibration). ``num_batches_tracked`` is left alone. Raises
    KeyError for a name that is not a BN layer with running statistics."""
    layers = batchnorm_layers(model)
    with torch.no_grad():
        for name, s in stats.items():
            m = layers[name]
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(s.mean.to(m.running_mean.dtype))
            m.running_var.copy_(s.var.to(m.running_var.dtype))


@contextlib.contextmanager
def substituted_statistics(
    model: nn.Module, stats: Mapping[str, PopulationStatistics]
) -> Iterator[None]:
    """Inside the block the named BN layers use ``stats`` as running statistics; on exit (also
    after an exception) their previous running mean and variance are back, bit for bit."""
    layers = batchnorm_layers(model)
    saved = []
    for name in stats:
        m = layers[name]
        assert m.running_mean is not None and m.running_var is not None
        saved.append((m.running_mean, m.running_mean.detach().clone()))
        saved.append((m.running_var, m.running_var.detach().clone()))
    try:
        load_population_statistics(model, stats)
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
