"""Fold BatchNorm into neighbouring convolutions and linear layers, exactly, for inference.

In eval mode a BN layer is a per-channel affine map ``bn(x) = x * s + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``
(:func:`~normlab.bn.graph.bn_affine`). Two placements are folded:

* **pre** (``conv -> BN``, the BN paper's placement): the BN scales the conv's output
  channels, ``W'[o] = W[o] * s[o]``, ``b'[o] = b[o] * s[o] + t[o]`` (``b = 0`` for a conv
  without bias). Grouped and depthwise convs fold the same way (output channels are output
  channels). Exact up to float rounding. The BN becomes ``nn.Identity``.
* **post** (``act -> BN -> conv``): the BN scales the *next* layer's input channels,
  ``W'[o, i] = W[o, i] * s[i]`` (``i`` over the group's input channels for grouped convs)
  and adds ``sum_i,k W[o, i, k] t[i]`` to its bias. Zero padding breaks this: the padded
  border of ``bn(x)`` is 0, not ``t``, so the shift must be left out there. With
  ``padded="exact"`` (the default) such a conv becomes a :class:`ShiftedConv` that adds the
  exact shift map ``conv(pad0(t), W)`` (one per input size, computed once and cached); with
  ``padded="refuse"`` the BN stays, with that reason in the report. Reflect, replicate and
  circular padding copy values, which the affine map commutes with, so they fold plainly.
  Between the BN and the next layer the folder looks through dropout (eval), identity,
  ``flatten(start_dim=1)``, average pooling (no zero padding counted) and, when every ``s > 0``,
  max pooling (an increasing map commutes with max).

Which module may fold where is checked, never assumed. A plain BN (or a BN subclass whose eval
forward matches its affine map on a probe input) folds either way. A norm+activation module
(timm's ``BatchNormAct2d``: BN, then dropout and an activation, inside one module) folds only
into the layer *before* it, its BN part made the identity and its activation kept; folding it
into the next layer would feed that activation un-normalised input, so it is refused, saying so.
A ``Linear`` and a BN share channels only on 2-d ``(N, C)`` tensors (a Linear mixes the last dim,
a BN normalises dim 1): the rank comes from the traced graph or from the example input, and a
fold across a Linear whose rank is unknown or above 2 is refused with that reason.

A BN is left alone (with a reason) when its producer's output is used elsewhere too, when a
module is called more than once, when it normalises with batch statistics in eval mode
(``track_running_stats=False``), or when no exact fold exists. Every norm left carries the
reason it cannot go into the layer before and the reason it cannot go into the layer after.

Graph discovery is :func:`~normlab.bn.graph.analyze` (torch.fx; a hook-based fallback for
untraceable models that requires ``example_input``). With ``example_input`` every fold is
verified on it, a group at a time: all folds are applied and the output checked once; a group
that changes the output by more than :func:`fold_tolerance` is undone and split in halves, down
to the single folds that are left unfolded with the measured error as their reason (one extra
forward when every fold is exact, about ``2 k log2(n / k)`` for ``k`` bad folds of ``n``). The
reported max abs error is that of the returned model. The result is always a new model in eval
mode; the input model is not modified.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.bn.graph import (
    CONV_MODULES,
    ModelGraph,
    NormLayer,
    analyze,
    bn_affine,
    eval_mode,
)
from normlab.errors import NormlabError
from normlab.norms import (
    BatchRenorm1d,
    BatchRenorm2d,
    FrozenBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
)

__all__ = [
    "FoldError",
    "FoldResult",
    "FoldStep",
    "ShiftedConv",
    "compare_throughput",
    "fold_batchnorm",
    "fold_batchnorm_report",
    "fold_tolerance",
    "measure_throughput",
    "output_error",
]

# Modules that are *exactly* an affine map per channel in eval mode: replaced by nn.Identity.
# Other BN subclasses (e.g. timm's BatchNormAct2d, which applies an activation after the BN)
# keep their module, neutralised to the identity affine (mean 0, var 1 - eps, weight 1, bias 0).
_PURE_BN: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    BatchRenorm1d,
    BatchRenorm2d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    FrozenBatchNorm,
)


def _compiling() -> bool:
    """True inside torch.compile / torch.export tracing (torch >= 2.3; False before)."""
    fn = getattr(torch.compiler, "is_compiling", None)
    return bool(fn()) if fn is not None else False


class FoldError(NormlabError):
    """Folding would change the model's outputs (names the layers and the error)."""


@dataclass(frozen=True)
class FoldStep:
    """One BN folded: into which layer, in which placement, and how."""

    norm: str
    into: str
    placement: str
    """``pre`` (BN after its layer) or ``post`` (BN folded into the next layer)."""
    note: str = ""


@dataclass
class FoldResult:
    """What :func:`fold_batchnorm_report` did and measured."""

    model: nn.Module
    folded: list[FoldStep] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(norm layer, reason it was left in place)."""
    graph_method: str = "fx"
    max_abs_error: float | None = None
    """max |folded(x) - original(x)| on the example input (None without one)."""
    output_scale: float | None = None
    """max |original(x)|, the scale the error should be read against."""
    images_per_s_before: float | None = None
    images_per_s_after: float | None = None

    @property
    def tolerance(self) -> float | None:
        """The largest ``max_abs_error`` that is float rounding for the folded model's dtype
        (:func:`fold_tolerance`); None when unverified (no example input)."""
        if self.output_scale is None:
            return None
        return fold_tolerance(self.output_scale, _param_dtype(self.model))

    @property
    def exact(self) -> bool | None:
        """Whether the verified output error is within :attr:`tolerance`; None when unverified."""
        if self.max_abs_error is None or self.tolerance is None:
            return None
        return self.max_abs_error <= self.tolerance

    @property
    def speedup(self) -> float | None:
        if self.images_per_s_before and self.images_per_s_after:
            return self.images_per_s_after / self.images_per_s_before
        return None

    def summary(self) -> dict[str, Any]:
        return {
            "folded": len(self.folded),
            "skipped": len(self.skipped),
            "graph": self.graph_method,
            "max_abs_error": self.max_abs_error,
            "output_scale": self.output_scale,
            "tolerance": self.tolerance,
            "images_per_s_before": self.images_per_s_before,
            "images_per_s_after": self.images_per_s_after,
            "speedup": self.speedup,
            "steps": [s.__dict__ for s in self.folded],
            "left": [{"norm": n, "reason": r} for n, r in self.skipped],
        }


class ShiftedConv(nn.Module):
    """A zero-padded conv that exactly absorbed a per-channel affine map of its input.

    Computes ``conv(pad0(x * s + t))`` as ``conv'(x) + shift_map`` where ``conv'`` holds the
    input-scaled weights and ``shift_map = conv(pad0(t), W)`` (the original weights ``W``, no
    bias) depends only on the input's spatial size. The map is computed once per size, dtype and
    device and cached (recomputed on every call while tracing or exporting, so exported graphs
    stay shape-generic in the batch dimension).
    """

    shift: Tensor
    shift_weight: Tensor

    def __init__(
        self, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, shift: Tensor, weight: Tensor
    ) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("shift", shift.detach().clone())
        self.register_buffer("shift_weight", weight.detach().clone())
        self._cache: dict[tuple[Any, ...], Tensor] = {}

    def _shift_map(self, x: Tensor) -> Tensor:
        nd = x.dim() - 2
        key = (tuple(x.shape[2:]), x.dtype, x.device)
        tracing = torch.jit.is_tracing() or _compiling()
        if not tracing and key in self._cache:
            return self._cache[key]
        c = self.shift.numel()
        t = self.shift.to(x.dtype).view(1, c, *([1] * nd)).expand(1, c, *x.shape[2:])
        conv_fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        conv = self.conv
        out = conv_fn(
            t,
            self.shift_weight.to(x.dtype),
            None,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )
        if not tracing:
            self._cache[key] = out
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + self._shift_map(x)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}  # per-size maps are rebuilt on demand, never saved
        return state

    def _apply(self, fn: Any, recurse: bool = True) -> ShiftedConv:
        self._cache = {}  # .to() / .half(): cached maps are stale
        return super()._apply(fn, recurse)


# ---- module surgery ------------------------------------------------------------------------


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _pure_bn(m: nn.Module) -> bool:
    """True if ``m``'s eval forward is exactly its per-channel affine map."""
    if type(m) in _PURE_BN:
        return True
    # torchvision.ops.FrozenBatchNorm2d is a plain frozen BN (timm's *Act variants are not)
    return type(m).__name__ == "FrozenBatchNorm2d" and type(m).__module__.startswith("torchvision")


def _neutralise(bn: nn.Module) -> None:
    """Make a BN module's own affine the identity (mean 0, var 1 - eps, weight 1, bias 0)."""
    with torch.no_grad():
        eps = float(getattr(bn, "eps", 0.0))
        bn.running_mean.zero_()  # type: ignore[operator]
        bn.running_var.fill_(1.0 - eps)  # type: ignore[operator]
        if isinstance(getattr(bn, "weight", None), Tensor):
            bn.weight.fill_(1.0)  # type: ignore[operator]
        if isinstance(getattr(bn, "bias", None), Tensor):
            bn.bias.zero_()  # type: ignore[operator]


def _remove_bn(model: nn.Module, name: str, form: str) -> str:
    """Take the folded affine out of the norm ``name``: an ``affine`` module becomes
    ``nn.Identity``; a ``norm_act`` module keeps its forward with its BN part the identity."""
    if form == "affine":
        _set(model, name, nn.Identity())
        return "removed"
    bn = _get(model, name)
    _neutralise(bn)
    return f"{type(bn).__name__} kept with its BN part the identity (its forward does more than BN)"


# ---- what a norm module computes in eval mode -------------------------------------------------


def _stats(m: nn.Module) -> tuple[Tensor, Tensor]:
    mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
    assert isinstance(mean, Tensor) and isinstance(var, Tensor)
    return mean, var


def _probe(m: nn.Module, layer: NormLayer) -> Tensor:
    """A seeded float64 input for ``m`` spreading each channel over +-3 of its running std
    around its running mean (both signs after normalisation, so an activation shows)."""
    mean, var = _stats(m)
    c = int(mean.numel())
    if layer.input_shape is not None:
        shape: tuple[int, ...] = (3, *layer.input_shape)
    elif isinstance(m, nn.BatchNorm1d) or "1d" in type(m).__name__:
        shape = (4, c)
    elif isinstance(m, nn.BatchNorm3d) or "3d" in type(m).__name__:
        shape = (2, c, 2, 2, 2)
    else:
        shape = (3, c, 3, 3)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=g, dtype=torch.float64) * 3.0
    view = (1, c) + (1,) * (len(shape) - 2)
    std = (var.detach().double().cpu() + float(getattr(m, "eps", 0.0))).sqrt()
    return mean.detach().double().cpu().view(view) + std.view(view) * z


def _norm_form(m: nn.Module, layer: NormLayer) -> tuple[str, str]:
    """How a BN-like module computes in eval mode, checked on a probe input (:func:`_probe`).

    ``("affine", "")``: exactly ``x * scale + shift`` (a known plain BN class, or a subclass that
    matches the affine map on the probe, e.g. timm's ``BatchNormAct2d`` with no activation).
    ``("norm_act", what)``: the affine map followed by something the module keeps (an
    activation): ``m(x) == neutralised(m)(x * scale + shift)`` on the probe, so the affine part
    can move into the layer *before* it. ``("opaque", why)``: neither; it is not folded.
    """
    if _pure_bn(m):
        return "affine", ""
    scale, shift = bn_affine(m)
    dtype = next((b.dtype for b in m.buffers() if b.is_floating_point()), torch.float32)
    device = _stats(m)[0].device
    try:
        x = _probe(m, layer)
        view = (1, -1) + (1,) * (x.dim() - 2)
        y = x * scale.view(view) + shift.view(view)
        with eval_mode(m), torch.no_grad():
            out = m(x.to(dtype=dtype, device=device)).double().cpu()
            saved = _Snapshot(m)
            try:
                _neutralise(m)
                out_neutral = m(y.to(dtype=dtype, device=device)).double().cpu()
            finally:
                saved.restore()
    except Exception as exc:
        return "opaque", f"{type(m).__name__} fails on a probe input ({type(exc).__name__}: {exc})"
    if out.shape != y.shape:
        return "opaque", f"{type(m).__name__} changes the shape of its input"
    tol = fold_tolerance(float(out.abs().max()), dtype)
    if float((out - y).abs().max()) <= tol:
        return "affine", ""
    if float((out - out_neutral).abs().max()) <= tol:
        after = [type(c).__name__ for c in m.children() if not isinstance(c, nn.Identity)]
        return "norm_act", " then ".join(after) or "a non-affine map"
    return "opaque", (
        f"{type(m).__name__}'s eval forward is neither its BN affine map nor that map followed by "
        "an op it could keep (checked on a probe input)"
    )


def _fold_pre(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """``layer`` followed by ``x * scale + shift`` per output channel, merged into ``layer``.

    The weight is scaled in place in its own dtype (one rounding per element, as a float64
    product rounded back would give); the bias is computed in float64."""
    w = layer.weight
    assert isinstance(w, Tensor)
    shape = (-1,) + (1,) * (w.dim() - 1)
    b = layer.bias
    b64 = b.detach().double() if isinstance(b, Tensor) else torch.zeros_like(scale)
    new_b = b64 * scale + shift
    with torch.no_grad():
        w.mul_(scale.to(w.dtype).view(shape))
        if isinstance(b, Tensor):
            b.copy_(new_b.to(b.dtype))
        else:
            layer.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=w.requires_grad)


def _input_scale(layer: nn.Module, s: Tensor) -> Tensor:
    """Per-weight-element input-channel factor for a conv/linear weight."""
    w = layer.weight
    assert isinstance(w, Tensor)
    if isinstance(layer, nn.Linear):
        return s.view(1, -1)
    g = int(getattr(layer, "groups", 1))
    c_out, c_in_g = w.shape[0], w.shape[1]
    per_group = s.view(g, 1, c_in_g).expand(g, c_out // g, c_in_g).reshape(c_out, c_in_g)
    return per_group.view(c_out, c_in_g, *([1] * (w.dim() - 2)))


def _bias_from_shift(layer: nn.Module, t: Tensor) -> Tensor:
    """``sum_{i,k} W[o, i, k] * t[i]`` per output ``o`` (the shift pushed through the layer)."""
    w = layer.weight
    assert isinstance(w, Tensor)
    w64 = w.detach().double()
    if isinstance(layer, nn.Linear):
        return w64 @ t
    t_in = _input_scale(layer, t)  # same layout as the weight's per-element input channel
    return (w64 * t_in).flatten(1).sum(1)


def _zero_padded(conv: nn.Module) -> bool:
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        return False
    pad = getattr(conv, "padding", 0)
    if isinstance(pad, str):
        return pad != "valid"
    pads = pad if isinstance(pad, tuple | list) else (pad,)
    return any(int(p) != 0 for p in pads)


def _fold_post(
    model: nn.Module,
    consumer_name: str,
    scale: Tensor,
    shift: Tensor,
    padded: str,
    flattened: bool,
) -> str:
    """Merge ``x * scale + shift`` (per input channel) into the layer ``consumer_name``;
    ``flattened``: a ``flatten(start_dim=1)`` sits between (so a channel covers a block of
    consecutive features of a linear layer)."""
    layer = _get(model, consumer_name)
    w = layer.weight
    assert isinstance(w, Tensor)
    c_in = w.shape[1] * int(getattr(layer, "groups", 1))
    if scale.numel() != c_in:
        if flattened and isinstance(layer, nn.Linear) and c_in % scale.numel() == 0:
            # flatten(N, C, *spatial) -> features c * S + j: each channel covers S features.
            rep = c_in // scale.numel()
            scale, shift = scale.repeat_interleave(rep), shift.repeat_interleave(rep)
        else:
            raise _Skip(
                f"{consumer_name} takes {c_in} input channels, the norm has {scale.numel()}"
            )
    padded_conv = isinstance(layer, CONV_MODULES) and _zero_padded(layer)
    if padded_conv and padded == "refuse":
        raise _Skip(
            f"{consumer_name} zero-pads its input, so folding the BN into it is exact only with a "
            "border correction (padded='exact', the default)"
        )
    orig_w = w.detach().clone() if padded_conv else w
    extra = None if padded_conv else _bias_from_shift(layer, shift)
    b = layer.bias
    with torch.no_grad():
        w.mul_(_input_scale(layer, scale).to(w.dtype))
        if extra is not None:
            if isinstance(b, Tensor):
                b.copy_((b.detach().double() + extra).to(b.dtype))
            else:
                layer.bias = nn.Parameter(extra.to(w.dtype), requires_grad=w.requires_grad)
    if padded_conv:
        assert isinstance(layer, CONV_MODULES)
        _set(model, consumer_name, ShiftedConv(layer, shift.to(w.dtype), orig_w))
        return "zero-padded conv: exact border correction (ShiftedConv)"
    return ""


class _Snapshot:
    """A module's own parameters and buffers (copied) and the object itself, to undo a fold:
    :meth:`restore` puts the values back, drops a parameter the fold added (a bias) and, given
    the model and name, puts the module back where a fold replaced it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.params = dict(module._parameters)
        self.values = {
            k: t.detach().clone()
            for k, t in (*module._parameters.items(), *module._buffers.items())
            if t is not None
        }

    def restore(self, model: nn.Module | None = None, name: str = "") -> None:
        m = self.module
        m._parameters.clear()
        m._parameters.update(self.params)
        with torch.no_grad():
            for k, value in self.values.items():
                getattr(m, k).copy_(value)
        if model is not None:
            _set(model, name, m)


class _Skip(Exception):
    """A fold that cannot be done exactly; the message is the reason."""


# ---- verification and timing -----------------------------------------------------------------


def _outputs(model: nn.Module, example_input: Tensor | Sequence[Tensor]) -> list[Tensor]:
    with eval_mode(model), torch.no_grad():
        out = model(example_input) if isinstance(example_input, Tensor) else model(*example_input)
    return _flatten_outputs(out)


def _flatten_outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten_outputs(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in _flatten_outputs(v)]
    return []


def output_error(
    a: nn.Module, b: nn.Module, example_input: Tensor | Sequence[Tensor]
) -> tuple[float, float]:
    """``(max |a(x) - b(x)|, max |a(x)|)`` over all output tensors, both models in eval mode."""
    ya, yb = _outputs(a, example_input), _outputs(b, example_input)
    if len(ya) != len(yb) or any(p.shape != q.shape for p, q in zip(ya, yb, strict=True)):
        return float("inf"), 0.0
    err = max(
        (float((p.double() - q.double()).abs().max()) for p, q in zip(ya, yb, strict=True)),
        default=0.0,
    )
    scale = max((float(p.double().abs().max()) for p in ya), default=0.0)
    return err, scale


def fold_tolerance(output_scale: float, dtype: torch.dtype) -> float:
    """The output error a fold may introduce by float rounding alone: ``rel * max(1, scale)``
    with ``rel`` 1e-9 in float64, 1e-4 in float32 and 2e-2 in half precision (bfloat16,
    float16), where ``output_scale`` is ``max |original(x)|``. The one tolerance of the
    folder, :func:`fold_batchnorm` and ``normlab fold``."""
    rel = 1e-9 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 2e-2
    return rel * max(output_scale, 1.0)


def _rate(model: nn.Module, batch: Tensor, min_seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while True:
        model(batch)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n * batch.shape[0] / elapsed


def measure_throughput(
    model: nn.Module,
    batch: Tensor,
    *,
    repeats: int = 5,
    min_seconds: float = 0.2,
    warmup: int = 2,
) -> float:
    """Median eval-mode images/s of ``model(batch)`` over ``repeats`` timed rounds.

    Each round runs the forward until ``min_seconds`` have passed; ``inference_mode`` is on.
    """
    return compare_throughput(
        [model], batch, repeats=repeats, min_seconds=min_seconds, warmup=warmup
    )[0]


def compare_throughput(
    models: Sequence[nn.Module],
    batch: Tensor,
    *,
    repeats: int = 5,
    min_seconds: float = 0.2,
    warmup: int = 2,
) -> list[float]:
    """Median eval-mode images/s of each model, timed in interleaved rounds.

    Round ``r`` times every model once, in rotated order, so that load changes on a shared
    machine hit all models alike; the median over ``repeats`` rounds is returned per model.
    """
    rates: list[list[float]] = [[] for _ in models]
    with contextlib.ExitStack() as stack, torch.inference_mode():
        for m in models:
            stack.enter_context(eval_mode(m))
        for m in models:
            for _ in range(warmup):
                m(batch)
        for r in range(repeats):
            for k in range(len(models)):
                i = (k + r) % len(models)
                rates[i].append(_rate(models[i], batch, min_seconds))
    return [float(statistics.median(x)) for x in rates]


# ---- the plan: which norm folds where, or why it cannot -------------------------------------


@dataclass
class _Step:
    """One planned fold; ``run`` does it on the working model and returns its note."""

    norm: str
    into: str
    placement: str
    run: Callable[[], str]


_TOKENS = (
    "on (N, L, C) tokens a Linear mixes the last dim while a BatchNorm1d normalises dim 1, so "
    "their channels line up only on 2-d (N, C) tensors"
)


def _plan_reason(layer: NormLayer, graph: ModelGraph) -> str | None:
    """Why ``layer`` cannot be folded at all (None: it may be)."""
    if layer.family not in ("batchnorm", "frozen_bn"):
        return "not a batch norm"
    if not layer.has_running_stats or layer.track_running_stats is False:
        return "no running statistics (track_running_stats=False): it normalises with batch statistics even in eval mode"
    if graph.method == "fx" and layer.calls != 1:
        return f"the module is called {layer.calls} times"
    return None


def _linear_rank_reason(linear: str, rank: int | None, what: str) -> str | None:
    """Why a Linear and a norm do not provably share channels (``rank``: dims of ``what``)."""
    if rank is None:
        return f"{linear} is a Linear and the rank of {what} is unknown here ({_TOKENS}; pass an example input)"
    if rank != 2:
        return f"{linear} is a Linear on a {rank}-d tensor: the channels do not line up ({_TOKENS})"
    return None


def _pre_target(layer: NormLayer, graph: ModelGraph, model: nn.Module) -> tuple[str | None, str]:
    """``(layer to fold into, "")`` for a fold into the producer, else ``(None, why not)``."""
    p = layer.producer
    if p is None:
        return None, "what feeds it is unknown"
    if p.kind not in ("conv", "linear") or p.name is None:
        kind = "" if p.kind == "other" else f" ({p.kind})"
        return None, f"it follows {p.name or p.kind}{kind}, not a conv/linear"
    if p.exclusive is False:
        return None, f"the output of {p.name} is used elsewhere too"
    if graph.method == "fx" and graph.module_calls.get(p.name, 1) != 1:
        return None, f"{p.name} is called {graph.module_calls.get(p.name)} times"
    target = _get(model, p.name)
    weight = getattr(target, "weight", None)
    if not isinstance(weight, Tensor):
        return None, f"{p.name} has no weight tensor"
    if isinstance(target, nn.Linear):
        reason = _linear_rank_reason(p.name, layer.input_rank, "its output")
        if reason is not None:
            return None, reason
    if layer.num_features is not None and weight.shape[0] != layer.num_features:
        return (
            None,
            f"{p.name} has {weight.shape[0]} outputs, the norm {layer.num_features} channels",
        )
    return p.name, ""


def _post_reason(layer: NormLayer, graph: ModelGraph, scale: Tensor) -> str | None:
    """Why ``layer`` cannot be folded into the next layer (None: it can)."""
    c = layer.consumer
    if c is None:
        return "what it feeds is unknown"
    if c.exclusive is False:
        return "its output is used in more than one place"
    if c.kind not in ("conv", "linear") or c.name is None:
        return f"its output goes to {c.name or c.kind}, not to a conv/linear"
    if graph.method == "fx" and graph.module_calls.get(c.name, 1) != 1:
        return f"{c.name} is called more than once"
    if "flatten" in c.through and c.kind == "conv":
        return f"a flatten sits between it and the conv {c.name}"
    if c.kind == "linear" and "flatten" not in c.through:
        rank = c.rank
        if rank is None and set(c.through) <= {"dropout", "identity"}:
            rank = layer.input_rank  # nothing between changes the rank
        reason = _linear_rank_reason(c.name, rank, "its input")
        if reason is not None:
            return reason
    if "max_pool" in c.through and not bool((scale > 0).all()):
        return "a max pooling sits between it and the next layer and some channel has scale <= 0"
    return None


def _plan(
    model: nn.Module, graph: ModelGraph, *, post: bool, padded: str
) -> tuple[list[_Step], list[tuple[str, str]]]:
    """Every fold to try, pre folds first (a conv may absorb a BN on both sides, and a post fold
    reads current weights and may wrap its conv in a :class:`ShiftedConv`), and every norm left
    with its reason."""
    pre: list[_Step] = []
    later: list[_Step] = []
    left: list[tuple[str, str]] = []
    for layer in graph.layers:
        reason = _plan_reason(layer, graph)
        if reason == "not a batch norm":
            continue
        if reason is not None:
            left.append((layer.name, reason))
            continue
        module = _get(model, layer.name)
        form, what = _norm_form(module, layer)
        if form == "opaque":
            left.append((layer.name, what))
            continue
        target, pre_why = _pre_target(layer, graph, model)
        if target is not None:
            pre.append(_Step(layer.name, target, "pre", _pre_run(model, layer.name, target, form)))
            continue
        if form == "norm_act":
            post_why = (
                f"{type(module).__name__} applies {what} after the norm inside the module, which "
                "would then see un-normalised input"
            )
        elif not post:
            post_why = "post folding disabled"
        else:
            post_why = _post_reason(layer, graph, bn_affine(module)[0]) or ""
        if post_why:
            left.append(
                (layer.name, f"not into the layer before ({pre_why}) nor the next one ({post_why})")
            )
            continue
        assert layer.consumer is not None and layer.consumer.name is not None
        flattened = "flatten" in layer.consumer.through
        run = _post_run(model, layer.name, layer.consumer.name, padded, flattened)
        later.append(_Step(layer.name, layer.consumer.name, "post", run))
    return pre + later, left


def _pre_run(model: nn.Module, norm_name: str, target: str, form: str) -> Callable[[], str]:
    def run() -> str:
        scale, shift = bn_affine(_get(model, norm_name))
        _fold_pre(_get(model, target), scale, shift)
        return _remove_bn(model, norm_name, form)

    return run


def _post_run(
    model: nn.Module, norm_name: str, target: str, padded: str, flattened: bool
) -> Callable[[], str]:
    def run() -> str:
        scale, shift = bn_affine(_get(model, norm_name))
        note = _fold_post(model, target, scale, shift, padded, flattened)
        _remove_bn(model, norm_name, "affine")
        return note

    return run


# ---- doing the plan, verified or not ---------------------------------------------------------


class _Checker:
    """The example-input check: the original's outputs once, then one forward per call."""

    def __init__(self, original: nn.Module, example_input: Tensor | Sequence[Tensor]) -> None:
        self.example_input = example_input
        self.reference = _outputs(original, example_input)
        self.scale = max((float(y.double().abs().max()) for y in self.reference), default=0.0)

    def error(self, model: nn.Module) -> float:
        got = _outputs(model, self.example_input)
        if len(got) != len(self.reference) or any(
            p.shape != q.shape for p, q in zip(got, self.reference, strict=True)
        ):
            return float("inf")
        diffs = [
            (p.double() - q.double()).abs().max() for p, q in zip(got, self.reference, strict=True)
        ]
        err = max((float(d) for d in diffs), default=0.0)
        return err if err == err else float("inf")  # NaN is never exact


def _record(result: FoldResult, step: _Step, note: str) -> None:
    result.folded.append(
        FoldStep(step.norm, step.into, step.placement, "" if note == "removed" else note)
    )


def _apply_unverified(result: FoldResult, steps: list[_Step]) -> None:
    for step in steps:
        try:
            note = step.run()
        except _Skip as exc:
            result.skipped.append((step.norm, str(exc)))
            continue
        _record(result, step, note)


def _apply_verified(
    result: FoldResult, model: nn.Module, steps: list[_Step], check: _Checker, each: bool
) -> float:
    """Apply ``steps`` in order, a group at a time: a group whose output error is within
    tolerance is kept; otherwise it is undone and its halves are tried (binary splitting), down
    to the single folds that change the output, which are left with the measured error. Costs
    one forward when every fold is exact and about ``2 k log2(n / k)`` for ``k`` bad folds of
    ``n``; ``each`` tries one fold per forward instead (the reference cost). Returns the output
    error of the final model."""
    tol = fold_tolerance(check.scale, _param_dtype(model))
    state = {"error": 0.0}

    def attempt(group: list[_Step]) -> None:
        saved: dict[str, _Snapshot] = {}
        done: list[tuple[_Step, str]] = []
        for step in group:
            for name in (step.norm, step.into):
                if name not in saved:
                    saved[name] = _Snapshot(_get(model, name))
            try:
                done.append((step, step.run()))
            except _Skip as exc:
                result.skipped.append((step.norm, str(exc)))
        if not done:
            return
        err = check.error(model)
        if err <= tol:
            state["error"] = err
            for step, note in done:
                _record(result, step, note)
            return
        for name, snapshot in reversed(saved.items()):
            snapshot.restore(model, name)
        if len(done) == 1:
            step = done[0][0]
            result.skipped.append(
                (
                    step.norm,
                    f"folding into {step.into} changed the output on the example input (max abs "
                    f"error {err:.3g}, tolerance {tol:.3g}); left unfolded",
                )
            )
            return
        pending = [step for step, _ in done]
        half = len(pending) // 2
        attempt(pending[:half])
        attempt(pending[half:])

    for group in [[s] for s in steps] if each else [steps]:
        attempt(group)
    return state["error"]


def fold_batchnorm_report(
    model: nn.Module,
    example_input: Tensor | Sequence[Tensor] | None = None,
    *,
    post: bool = True,
    padded: str = "exact",
    measure_speed: bool = False,
    speed_repeats: int = 5,
    verify: str = "groups",
) -> FoldResult:
    """Fold every BN that can be folded exactly; see the module docstring.

    Args:
        model: any ``nn.Module``; not modified (a deep copy is folded).
        example_input: a batch the model accepts (a tensor, or a tuple of positional args).
            Needed to verify the result and for untraceable models.
        post: also fold BNs that follow an activation into the next conv/linear.
        padded: ``exact`` (border-corrected :class:`ShiftedConv`) or ``refuse`` for post folds
            into zero-padded convs.
        measure_speed: time eval-mode inference before and after on ``example_input`` (median
            of ``speed_repeats`` interleaved rounds, same process, same input; see
            :func:`compare_throughput`).
        verify: with ``example_input``, ``groups`` checks all folds with one forward and splits
            only groups that change the output; ``each`` checks one fold per forward (the
            reference the benchmark compares with). Both leave the same exact folds.

    Returns a :class:`FoldResult` with the folded model (eval mode), what was folded and left
    (each with its reason), the max abs output error and, if asked, the images/s before and
    after.
    """
    if padded not in ("exact", "refuse"):
        raise NormlabError(f"padded must be 'exact' or 'refuse', got {padded!r}")
    if verify not in ("groups", "each"):
        raise NormlabError(f"verify must be 'groups' or 'each', got {verify!r}")
    result = _fold(model, example_input, post=post, padded=padded, each=verify == "each")
    if measure_speed and example_input is not None:
        batch = example_input if isinstance(example_input, Tensor) else example_input[0]
        before, after = compare_throughput([model, result.model], batch, repeats=speed_repeats)
        result.images_per_s_before, result.images_per_s_after = before, after
    return result


def _fold(
    original: nn.Module,
    example_input: Tensor | Sequence[Tensor] | None,
    *,
    post: bool,
    padded: str,
    each: bool,
) -> FoldResult:
    folded = copy.deepcopy(original).eval()
    graph = analyze(folded, example_input)
    if graph.method != "fx" and example_input is None:
        raise NormlabError(
            f"cannot trace the model with torch.fx ({graph.reason}); pass an example input so "
            "that folds can be found from a forward pass and verified"
        )
    result = FoldResult(folded, graph_method=graph.method)
    steps, left = _plan(folded, graph, post=post, padded=padded)
    result.skipped.extend(left)
    if example_input is None:
        _apply_unverified(result, steps)
    else:
        check = _Checker(original, example_input)
        result.max_abs_error = _apply_verified(result, folded, steps, check, each)
        result.output_scale = check.scale
    folded.eval()
    return result


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def fold_batchnorm(
    model: nn.Module,
    example_input: Tensor | Sequence[Tensor] | None = None,
    *,
    post: bool = True,
    padded: str = "exact",
) -> nn.Module:
    """A copy of ``model`` in eval mode with every exactly-foldable BN folded away.

    See :func:`fold_batchnorm_report` (same arguments) for what is folded and the report.
    With ``example_input`` every fold is checked on it and one that changes the output by more
    than float rounding (:func:`fold_tolerance`: ``1e-4 * max(1, max|y|)`` in float32, 2e-2 in
    half precision) is left unfolded; raises :class:`FoldError` if the folded model still
    differs (it cannot, short of a model whose output varies from call to call).
    """
    result = fold_batchnorm_report(model, example_input, post=post, padded=padded)
    if result.exact is False:
        raise FoldError(
            f"the folded model differs from the original by {result.max_abs_error:.3g} "
            f"(outputs up to {result.output_scale:.3g}); folded: "
            + ", ".join(f"{s.norm}->{s.into}" for s in result.folded)
        )
    return result.model
