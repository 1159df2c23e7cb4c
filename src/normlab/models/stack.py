"""Several copies of one architecture trained as one module: :func:`stack_models`.

A study trains the same configuration under several seeds. At small batches each step's cost
is per-operation overhead (Python, dispatch, autograd, small kernels), not arithmetic, so
``K`` copies computed by one module whose every layer is ``K`` times as wide (grouped
convolutions, batched matrix products) take far fewer, larger operations than ``K`` separate
models (``benchmarks/small_batch.py`` measures it).

Layout (the guarantee every rule keeps): the stacked module's input is the ``K`` copies'
inputs concatenated on the channel axis, copy-major (``torch.cat(xs, 1)``), and so is its
output and every activation in between; copy ``k`` computes exactly what model ``k`` computes
on its own input, up to float rounding (grouped and per-copy kernels sum in different orders).
Every parameter and buffer with a per-copy counterpart is the copies' tensors concatenated on
dim 0, so copy ``k``'s tensor is ``t.view(K, *shape)[k]`` (:func:`copy_view`); 0-dim buffers
(``num_batches_tracked``) are shared and must be equal in every copy.

Rules exist for the layers normlab's models are made of (convolutions, Linear, BatchNorm,
GroupNorm, InstanceNorm, frozen BN, SkipInit, ResNet's option-A shortcut) and for parameter-free
element-wise or spatial layers. A layer without a rule raises :class:`StackError` naming it.
Containers keep their own ``forward``, which may mix channels (a concatenation, a channel
shuffle): :func:`verify_stacked` runs the stacked module against the copies in float64, forward
and backward, in training and evaluation mode, and raises when they disagree. Callers must
verify before training (:func:`stack_verified` does both).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.errors import NormlabError
from normlab.models.blocks import SkipInit
from normlab.models.resnet import ShortcutA
from normlab.norms.layers import FrozenBatchNorm

__all__ = [
    "StackError",
    "copy_view",
    "stack_models",
    "stack_verified",
    "unstack_into",
    "verify_stacked",
]

# float64 relative agreement the stacked module must reach against the copies
VERIFY_TOLERANCE = 1e-9


class StackError(NormlabError):
    """The models cannot be trained stacked (the message says which layer and why)."""


def copy_view(t: Tensor, k: int, n_copies: int, shape: torch.Size) -> Tensor:
    """Copy ``k``'s part of a stacked tensor ``t`` (a view; 0-dim tensors are shared)."""
    if t.dim() == 0:
        return t
    return t.view(n_copies, *shape)[k]


class StackedLinear(nn.Module):
    """``K`` Linear layers on ``(N, K * in)`` inputs, as one batched matrix product."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        first = layers[0]
        self.copies, self.in_features, self.out_features = (
            len(layers),
            first.in_features,
            first.out_features,
        )
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in layers]))
        self.bias = (
            nn.Parameter(torch.cat([m.bias.detach() for m in layers]))
            if first.bias is not None
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise StackError(f"a stacked Linear takes (N, features) inputs, got {tuple(x.shape)}")
        k, n = self.copies, x.shape[0]
        xs = x.view(n, k, self.in_features).transpose(0, 1)  # K, N, in
        w = self.weight.view(k, self.out_features, self.in_features).transpose(1, 2)
        if self.bias is None:
            out = torch.bmm(xs, w)
        else:
            out = torch.baddbmm(self.bias.view(k, 1, self.out_features), xs, w)
        return out.transpose(0, 1).reshape(n, k * self.out_features)


class StackedSkipInit(nn.Module):
    """``K`` SkipInit scalars: copy k's channels are scaled by its own ``alpha``."""

    def __init__(self, layers: Sequence[SkipInit]) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.stack([m.alpha.detach() for m in layers]))

    def forward(self, x: Tensor) -> Tensor:
        k, n = self.alpha.numel(), x.shape[0]
        return (x.reshape(n, k, -1) * self.alpha.view(1, k, 1)).reshape(x.shape)


class StackedShortcutA(nn.Module):
    """ResNet's option-A shortcut per copy: subsample, then zero channels after each copy's."""

    def __init__(self, layer: ShortcutA, copies: int) -> None:
        super().__init__()
        self.layer: ShortcutA = _fresh(layer)  # type: ignore[assignment]
        self.copies = copies

    def forward(self, x: Tensor) -> Tensor:
        s, k = self.layer.stride, self.copies
        if s != 1:
            x = x[:, :, ::s, ::s]
        n, c, h, w = x.shape
        x = x.reshape(n, k, c // k, h, w)
        x = F.pad(x, (0, 0, 0, 0, 0, self.layer.out_channels - self.layer.in_channels))
        return x.reshape(n, -1, h, w)


_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _fresh(layer: nn.Module) -> nn.Module:
    """A shallow copy of ``layer`` that shares no mutable state with it: its dicts and sets are
    copied and its forward/backward hooks dropped (they were registered for the original)."""
    new = copy.copy(layer)
    for name, value in list(vars(new).items()):
        if isinstance(value, dict | set | list):
            setattr(new, name, copy.copy(value))
    for name in _HOOKS:
        if isinstance(getattr(new, name, None), dict):
            getattr(new, name).clear()
    return new


def _settings(layer: nn.Module) -> dict[str, object]:
    """A layer's own non-tensor settings (kernel size, stride, dropout rate, ...)."""
    return {
        name: value
        for name, value in vars(layer).items()
        if not name.startswith("_") and name != "training" and not isinstance(value, Tensor)
    }


def _widened(layers: Sequence[nn.Module], scale: Sequence[str]) -> nn.Module:
    """A copy of ``layers[0]`` with the attributes ``scale`` multiplied by K and every own
    parameter/buffer replaced by the copies' concatenation on dim 0."""
    k = len(layers)
    wide = _fresh(layers[0])
    for attr in scale:
        setattr(wide, attr, getattr(wide, attr) * k)
    for name, p in layers[0]._parameters.items():
        if p is not None:
            wide._parameters[name] = nn.Parameter(
                torch.cat([m._parameters[name].detach() for m in layers]),  # type: ignore[union-attr]
                requires_grad=p.requires_grad,
            )
    for name, b in layers[0]._buffers.items():
        if b is None:
            continue
        values = [m._buffers[name] for m in layers]
        if b.dim() == 0:
            if any(not torch.equal(v, b) for v in values):  # type: ignore[arg-type]
                raise StackError(f"buffer {name!r} differs between the copies")
            wide._buffers[name] = b.clone()
        else:
            wide._buffers[name] = torch.cat(values)  # type: ignore[arg-type]
    return wide


def _conv(layers: Sequence[nn.Module]) -> nn.Module:
    first = layers[0]
    assert isinstance(first, nn.Conv1d | nn.Conv2d)
    if first.padding_mode != "zeros":
        raise StackError(f"padding_mode={first.padding_mode!r} has no stacked rule")
    return _widened(layers, ("in_channels", "out_channels", "groups"))


# exact types only: a subclass may add state or behaviour the rule does not know
_RULES: dict[type[nn.Module], Callable[[Sequence[nn.Module]], nn.Module]] = {
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.BatchNorm1d: lambda ms: _widened(ms, ("num_features",)),
    nn.BatchNorm2d: lambda ms: _widened(ms, ("num_features",)),
    nn.InstanceNorm2d: lambda ms: _widened(ms, ("num_features",)),
    FrozenBatchNorm: lambda ms: _widened(ms, ("num_features",)),
    nn.GroupNorm: lambda ms: _widened(ms, ("num_groups", "num_channels")),
    nn.Linear: lambda ms: StackedLinear(ms),  # type: ignore[arg-type]
    SkipInit: lambda ms: StackedSkipInit(ms),  # type: ignore[arg-type]
    ShortcutA: lambda ms: StackedShortcutA(ms[0], len(ms)),  # type: ignore[arg-type]
}
# parameter-free layers that act per element or per channel plane: shared as they are
_SHARED = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.Dropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
)


def _stack(layers: Sequence[nn.Module], path: str) -> nn.Module:
    first = layers[0]
    where = path or "the model"
    if any(type(m) is not type(first) for m in layers):
        raise StackError(f"{where}: the copies have different layer types")
    settings = _settings(first)
    for m in layers[1:]:
        if _settings(m) != settings:
            differ = sorted(k for k in settings if _settings(m).get(k) != settings[k])
            raise StackError(
                f"{where} ({type(first).__name__}): the copies' settings differ "
                f"({', '.join(differ) or 'their attributes'})"
            )
    rule = _RULES.get(type(first))
    if rule is not None:
        return rule(layers)
    if isinstance(first, nn.Flatten) and (first.start_dim, first.end_dim) != (1, -1):
        raise StackError(f"{where}: Flatten({first.start_dim}, {first.end_dim}) mixes the copies")
    if type(first) in _SHARED:
        return _fresh(first)
    if first._parameters or any(b is not None for b in first._buffers.values()):
        raise StackError(
            f"{where} ({type(first).__name__}) holds parameters or buffers and has no stacked "
            "rule; train these seeds one at a time"
        )
    if not first._modules:
        raise StackError(
            f"{where} ({type(first).__name__}) is a layer without a stacked rule; train these "
            "seeds one at a time"
        )
    wide = _fresh(first)
    wide._modules = {}
    for name, child in first._modules.items():
        if child is None:
            wide._modules[name] = None
            continue
        wide._modules[name] = _stack(
            [m._modules[name] for m in layers],  # type: ignore[misc]
            f"{path}.{name}" if path else name,
        )
    return wide


def stack_models(models: Sequence[nn.Module]) -> nn.Module:
    """One module computing ``len(models)`` copies at once (see the module docs for the layout).

    The models must have the same structure; their tensors are copied, so the result shares
    nothing with them. Raises :class:`StackError` naming the first layer without a rule.
    Call :func:`verify_stacked` before trusting the result.
    """
    if len(models) < 1:
        raise StackError("nothing to stack")
    shapes = [[(n, tuple(t.shape)) for n, t in m.state_dict().items()] for m in models]
    for other in shapes[1:]:
        if other != shapes[0]:
            names = [n for n, _ in shapes[0]]
            if [n for n, _ in other] != names:
                raise StackError("the models to stack do not have the same parameters and buffers")
            diff = next(a for a, b in zip(shapes[0], other, strict=True) if a != b)
            raise StackError(
                f"the models to stack differ in shape at {diff[0]} "
                f"({diff[1]} vs {dict(other)[diff[0]]})"
            )
    wide = _stack(list(models), "")
    wide.train(models[0].training)
    return wide


def unstack_into(
    stacked: nn.Module, models: Sequence[nn.Module], only: Sequence[int] | None = None
) -> None:
    """Copy every copy's parameters and buffers from ``stacked`` into ``models`` (copy i into
    ``models[i]``; with ``only``, just those copies), in place, values only: the models keep
    their own tensors, so optimizers that hold them stay valid."""
    k = len(models)
    wide = dict(stacked.state_dict())
    with torch.no_grad():
        for i in range(k) if only is None else only:
            for name, t in models[i].state_dict().items():
                t.copy_(copy_view(wide[name], i, k, t.shape))


def _probe_inputs(models: Sequence[nn.Module], example: Tensor) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(example.shape, generator=g, dtype=torch.float64) for _ in models]


def verify_stacked(stacked: nn.Module, models: Sequence[nn.Module], example: Tensor) -> float:
    """The largest relative disagreement between ``stacked`` and the copies, measured in float64
    on deep copies (nothing given is changed): outputs in training and evaluation mode, the
    running buffers after the training-mode forward and the parameters' gradients of a random
    linear function of the outputs. Raises :class:`StackError` above ``VERIFY_TOLERANCE``.

    ``example``: one copy's input batch (shape and batch size as in training; at least 2
    samples so batch statistics exist). Dropout is off on both sides (its masks are random);
    in training each copy's Dropout draws its own independent mask, as a single model's does.
    """
    k = len(models)
    xs = _probe_inputs(models, example)
    worst = 0.0
    for training in (True, False):
        copies = [_quiet(copy.deepcopy(m).double().train(training)) for m in models]
        wide = _quiet(copy.deepcopy(stacked).double().train(training))
        refs = [m(x) for m, x in zip(copies, xs, strict=True)]
        out = wide(torch.cat(xs, 1))
        n = xs[0].shape[0]
        outs = out.view(n, k, -1).unbind(1)
        g = torch.Generator().manual_seed(1)
        weights = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in refs]
        sum(((r * w).sum() for r, w in zip(refs, weights, strict=True)), torch.zeros(())).backward()
        sum(
            ((o.reshape(r.shape) * w).sum() for o, r, w in zip(outs, refs, weights, strict=True)),
            torch.zeros(()),
        ).backward()
        for i, (r, o) in enumerate(zip(refs, outs, strict=True)):
            worst = max(worst, _rel(o.reshape(r.shape), r))
            wide_state = dict(wide.state_dict())
            for name, t in copies[i].state_dict().items():
                if t.is_floating_point():
                    worst = max(worst, _rel(copy_view(wide_state[name], i, k, t.shape), t))
            wide_params = dict(wide.named_parameters())
            for name, p in copies[i].named_parameters():
                gw = wide_params[name].grad
                if p.grad is None and gw is None:
                    continue
                if p.grad is None or gw is None:
                    raise StackError(f"{name}: a gradient exists on one side only")
                worst = max(worst, _rel(copy_view(gw, i, k, p.shape), p.grad))
    if not worst <= VERIFY_TOLERANCE:
        raise StackError(
            f"the stacked copies do not compute what the models compute (relative difference "
            f"{worst:.3g} in float64, allowed {VERIFY_TOLERANCE:g}): the model's forward mixes "
            "the copies' channels (a concatenation, a channel shuffle, a reshape across "
            "channels); train these seeds one at a time"
        )
    return worst


def _quiet(model: nn.Module) -> nn.Module:
    """Dropout off (its masks are random on both sides), everything else as it is."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    return model


@torch.no_grad()
def _rel(a: Tensor, b: Tensor) -> float:
    if not b.numel():
        return 0.0
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)


def stack_verified(models: Sequence[nn.Module], example: Tensor) -> nn.Module:
    """:func:`stack_models`, then :func:`verify_stacked` against ``example``; the stacked
    module in the models' precision and on their device."""
    stacked = stack_models(models)
    verify_stacked(stacked, models, example.detach().cpu())
    return stacked
