"""``weights`` probe: weight norms, angular updates and effective learning rates (seed 001).

Per conv/linear layer (``nn.Conv*d``, ``nn.Linear``; the weight tensor, not the bias):

* ``weights/norm/<layer>``: the Frobenius norm ``||w||`` at the end of the epoch;
* ``weights/angle/<layer>``: the angle in radians between ``w`` at the end of the previous epoch
  (for the first epoch of a fit or a resume: at ``on_fit_start``) and now,
  ``2 * atan2(||u - v||, ||u + v||)`` with ``u, v`` the unit vectors (accurate for tiny angles);
* ``weights/eff_lr/<layer>``, only for *scale-invariant* layers (:func:`scale_invariant_layers`):
  ``lr / ||w||^2`` with ``lr`` the learning rate of the epoch's last optimizer step (the row's
  ``lr``; in :class:`~normlab.probes.Instruments`, which has no row: the lr of the optimizer's
  parameter group holding ``w`` when measured, and no key without an optimizer). For such a layer ``f(a w) = f(w)`` for every ``a > 0``, so the gradient is
  ``grad(a w) = grad(w) / a`` and an SGD step of size ``lr`` changes the *direction* of ``w`` as
  a step of ``lr / ||w||^2`` on the unit sphere would: L2 / weight decay shrinks ``||w||`` and
  thereby raises this effective learning rate without changing the function (van Laarhoven
  2017, arXiv 1706.05350; the "L2 Regularization and Batch Norm" post seed 001 cites). With
  momentum, the steady-state step is ``1 / (1 - momentum)`` times larger; with Adam the scaling
  is ``lr / ||w||`` instead: the key keeps the SGD definition for every optimizer.
* ``weights/first/<layer>``: the first ``k`` values of one layer's flattened weight (PyTorch's
  ``[out, in, kh, kw]`` order; Keras' kernels are ``[kh, kw, in, out]``), as seed 001's
  ``PrintWeightsCallback`` printed them; ``layer`` option, default the first conv/linear layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.utils.hooks import RemovableHandle

from normlab.errors import ConfigError
from normlab.models.modes import preserved_modes
from normlab.probes.base import Option, Probe, sample_loader

if TYPE_CHECKING:
    from normlab.probes.context import ProbeContext

__all__ = ["WeightsProbe", "angle_between", "scale_invariant_layers", "weight_layers"]

_LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)

# Modules that may sit between a layer and its norm without breaking scale invariance: they
# return the same tensor object (in place, or untouched in eval) and are positively homogeneous.
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout)

# Norms whose output does not change when their input is multiplied by a > 0 (statistics of the
# input itself, not stored ones), and those among them that subtract a per-channel mean (which
# also cancels a per-channel bias of the layer before).
_INVARIANT_NORMS: tuple[type[nn.Module], ...] = (
    _BatchNorm,
    _InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_PER_CHANNEL_CENTERING = (_BatchNorm, _InstanceNorm)


def weight_layers(model: nn.Module) -> dict[str, nn.modules.conv._ConvNd | nn.Linear]:
    """Every conv and linear layer, by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _LAYER_TYPES)}


def angle_between(a: Tensor, b: Tensor) -> float:
    """Angle in radians between two tensors seen as vectors (0 if either is zero)."""
    u, v = a.detach().double().flatten(), b.detach().double().flatten()
    nu, nv = u.norm(), v.norm()
    if float(nu) == 0.0 or float(nv) == 0.0:
        return 0.0
    u, v = u / nu, v / nv
    return float(2.0 * torch.atan2((u - v).norm(), (u + v).norm()))


def scale_invariant_layers(model: nn.Module, example: Tensor) -> dict[str, str]:
    """Conv/linear layers whose weight ``w`` the network's output is invariant to scaling, found
    by tracing one forward pass of ``example`` (eval mode, no grad; the model is left as it was).

    A layer qualifies, mapped to the norm that makes it so, when its output tensor reaches the
    input of a norm layer that normalises with statistics of that very input (BN family in
    training, InstanceNorm, GroupNorm, LayerNorm, RMSNorm; not FrozenBatchNorm) either directly
    or only through in-place, positively homogeneous modules (ReLU, LeakyReLU, Identity,
    Dropout), and its bias cannot break the invariance: it has none, or it feeds directly a norm
    that subtracts a per-channel mean (BN, InstanceNorm), which cancels it. Batch
    Renormalization is invariant only once its running statistics follow the batch ones.
    """
    layers = weight_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    tracked: dict[int, tuple[str, bool]] = {}  # id(tensor) -> (layer, direct)
    keep: list[Tensor] = []  # holds traced tensors alive, so their ids stay unique
    found: dict[str, str] = {}
    handles: list[RemovableHandle] = []

    def on_layer(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, Tensor):
            tracked[id(output)] = (names[id(module)], True)
            keep.append(output)

    def on_other(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, Tensor) and id(output) in tracked:
            if isinstance(module, _HOMOGENEOUS):
                tracked[id(output)] = (tracked[id(output)][0], False)
            else:
                del tracked[id(output)]

    def on_norm(module: nn.Module, args: tuple[Any, ...]) -> None:
        if not args or not isinstance(args[0], Tensor) or id(args[0]) not in tracked:
            return
        layer, direct = tracked[id(args[0])]
        if not isinstance(module, _INVARIANT_NORMS):
            return
        has_bias = getattr(layers[layer], "bias", None) is not None
        if not has_bias or (direct and isinstance(module, _PER_CHANNEL_CENTERING)):
            found.setdefault(layer, names[id(module)])

    try:
        for m in model.modules():
            if isinstance(m, _LAYER_TYPES):
                handles.append(m.register_forward_hook(on_layer))
            elif isinstance(m, _INVARIANT_NORMS):
                handles.append(m.register_forward_pre_hook(on_norm))
            elif not any(True for _ in m.children()):
                handles.append(m.register_forward_hook(on_other))
        with preserved_modes(model), torch.no_grad():
            model.eval()
            model(example)
    finally:
        for h in handles:
            h.remove()
    return {name: found[name] for name in layers if name in found}


class WeightsProbe(Probe):
    """Weight norms, angular updates, effective learning rates, first values of one layer.

    See the module docstring for the keys and definitions. Cost: one traced forward pass of two
    images at ``on_fit_start``, then per epoch a norm and a dot product per layer (negligible).
    """

    name = "weights"
    OPTIONS: ClassVar[dict[str, Option]] = {
        "k": (int, 10, 0, "how many leading values of the chosen layer to record (0: none)"),
        "layer": (str, None, None, "layer whose first k values are recorded (default: first)"),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._previous: dict[str, Tensor] = {}
        self._invariant: dict[str, str] = {}
        self._first_layer: str | None = None

    def start(self, ctx: ProbeContext) -> None:
        layers = weight_layers(ctx.model)
        chosen = self.options["layer"]
        if chosen is not None and chosen not in layers:
            raise ConfigError(
                f"probes: option layer of probe 'weights' names no conv/linear layer: {chosen!r}; "
                f"layers: {', '.join(layers)}"
            )
        self._first_layer = chosen or next(iter(layers), None)
        self._previous = {n: m.weight.detach().clone() for n, m in layers.items()}
        loader = sample_loader(
            ctx, split="train", samples=2, batch_size=2, salt=self.name, drop_last=False
        )
        self._invariant = {}
        if loader is not None:
            x, _ = next(iter(loader))
            self._invariant = scale_invariant_layers(ctx.model, x)

    def measure(self, ctx: ProbeContext, epoch: int, row: Mapping[str, Any]) -> dict[str, Any]:
        row_lr = float(row["lr"]) if "lr" in row else None
        out: dict[str, Any] = {}
        for name, m in weight_layers(ctx.model).items():
            w = m.weight.detach()
            norm = float(w.double().norm())
            out[f"weights/norm/{name}"] = norm
            prev = self._previous.get(name)
            if prev is not None and prev.shape == w.shape:
                # (.to: a no-op, unless the model moved to another device since start)
                out[f"weights/angle/{name}"] = angle_between(prev.to(w.device), w)
            lr = row_lr if row_lr is not None else ctx.learning_rate(m.weight)
            if name in self._invariant and lr is not None:
                out[f"weights/eff_lr/{name}"] = lr / norm**2 if norm > 0 else math.inf
            self._previous[name] = w.clone()
        k, first = self.options["k"], self._first_layer
        if k and first is not None:
            w = weight_layers(ctx.model)[first].weight.detach()
            out[f"weights/first/{first}"] = [float(v) for v in w.flatten()[:k].cpu()]
        return out

    @property
    def invariant_layers(self) -> dict[str, str]:
        """Scale-invariant layer -> the norm that makes it so (set at ``on_fit_start``)."""
        return dict(self._invariant)
