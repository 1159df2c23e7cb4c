"""The norm axis on a model normlab did not build: put another norm where each BatchNorm is.

:func:`replace_batchnorms` turns every BatchNorm layer of a module tree into the layer a
:class:`~normlab.norms.NormSpec` names (through :func:`~normlab.norms.swap.swap_modules`, the
one tree walker). Conventions, stated once:

* ``bn`` keeps the architecture's own BatchNorm layers as built (their eps and momentum, e.g.
  torchvision's MobileNetV3 uses 1e-3 and 0.01); ``norm.bn_eps`` / ``bn_momentum`` /
  ``bn_convention``, when set, are written into every layer.
* The batch-norm family (``frozen_bn``, ``brn``, ``ghost_bn``) keeps each layer's eps and
  momentum unless the spec sets them; ``gn``, ``ln`` and ``in`` use normlab's (PyTorch's eps).
* The new layer takes the old one's affine weight and bias (so an architecture's own init,
  e.g. timm's zero-initialised last norm of a block, survives the swap) and its
  ``requires_grad``; a layer without them keeps its own init (1 and 0).
* ``none`` puts ``nn.Identity`` in the layer's place (a graph normlab did not write cannot
  lose a module); the conv-bias rule is the caller's (:mod:`normlab.models.external`).
* ``gn``: the groups rule of :func:`~normlab.norms.gn_groups_for` (``min(gn_groups, C)``,
  which must divide C) is checked on every layer before anything changes; a refusal names
  the layers and the group counts that would fit all of them.
* Only plain ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` and the known norm+activation classes
  (:data:`NORM_ACT_CLASSES`: timm's ``BatchNormAct2d``) are replaced. Any other BatchNorm
  subclass is refused: its forward may do more than normalise, which a swap would drop.
  Other kinds of norm (LayerNorm, GroupNorm) are left as they are.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.errors import ConfigError
from normlab.norms.factory import NormSpec, make_norm
from normlab.norms.swap import swap_modules

__all__ = ["NORM_ACT_CLASSES", "NormAct", "batchnorm_layers", "replace_batchnorms"]

NORM_ACT_CLASSES: dict[str, tuple[str, ...]] = {
    "timm.layers.norm_act.BatchNormAct2d": ("drop", "act"),
}
"""BatchNorm subclasses that apply child modules after normalising: qualified class name ->
the children, in the order their forward applies them (read from their source)."""

_BN_FAMILY = ("frozen_bn", "brn", "ghost_bn")
_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


class NormAct(nn.Module):
    """A norm (or none) followed by the extra modules of a norm+activation layer it replaced
    (timm's ``BatchNormAct2d``: dropout, then activation), applied in that order."""

    def __init__(self, norm: nn.Module | None, extras: dict[str, nn.Module]) -> None:
        super().__init__()
        self.norm = norm if norm is not None else nn.Identity()
        for name, module in extras.items():
            self.add_module(name, module)
        self._extras = list(extras)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        for name in self._extras:
            x = self._modules[name](x)  # type: ignore[misc]
        return x


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Every BatchNorm layer of ``model`` by qualified name; ConfigError naming the first one
    whose class the norm axis cannot replace (see the module docstring)."""
    found: dict[str, _BatchNorm] = {}
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNorm):
            continue
        if type(m) not in _PLAIN and _qualname(m) not in NORM_ACT_CLASSES:
            raise ConfigError(
                f"layer {name!r} is a {_qualname(m)}, a BatchNorm subclass normlab does not "
                "know: its forward may do more than normalise, so replacing it could silently "
                f"change the network; known classes: BatchNorm1d, BatchNorm2d, "
                + ", ".join(NORM_ACT_CLASSES)
            )
        found[name] = m
    return found


def _bn_overrides(spec: NormSpec) -> bool:
    return spec.bn_eps is not None or spec.bn_momentum is not None or spec.bn_convention != "torch"


def _check_groups(spec: NormSpec, layers: dict[str, _BatchNorm], key: str) -> None:
    bad = [
        (n, m.num_features)
        for n, m in layers.items()
        if m.num_features % min(spec.gn_groups, m.num_features)
    ]
    if not bad:
        return
    common = math.gcd(*(m.num_features for m in layers.values()))
    fits = [d for d in range(1, common + 1) if common % d == 0]
    shown = ", ".join(f"{n!r} ({c} channels)" for n, c in bad[:3])
    raise ConfigError(
        f"{key}={spec.gn_groups} does not divide the channels of {len(bad)} norm "
        f"layer(s): {shown}{' ...' if len(bad) > 3 else ''}; group counts that divide every "
        f"layer: {', '.join(map(str, fits))} (set {key})"
    )


def _layer_spec(spec: NormSpec, old: _BatchNorm) -> NormSpec:
    """``spec`` for one layer: the batch-norm family inherits the layer's eps and momentum
    unless the spec sets them."""
    if spec.name not in _BN_FAMILY or _bn_overrides(spec):
        return spec
    momentum = old.momentum if old.momentum is not None else spec.bn_momentum
    return spec.replace(bn_eps=float(old.eps), bn_momentum=momentum)


@torch.no_grad()
def _take_affine(new: nn.Module, old: _BatchNorm) -> None:
    for attr in ("weight", "bias"):
        src, dst = getattr(old, attr, None), getattr(new, attr, None)
        if isinstance(src, Tensor) and isinstance(dst, Tensor) and src.shape == dst.shape:
            dst.copy_(src)
            if isinstance(dst, nn.Parameter):
                dst.requires_grad_(src.requires_grad)


def _new_layer(spec: NormSpec, old: _BatchNorm) -> nn.Module:
    kind = "dense" if isinstance(old, nn.BatchNorm1d) else "conv"
    new = make_norm(_layer_spec(spec, old), old.num_features, kind)
    if new is not None:
        ref = old.weight if isinstance(old.weight, Tensor) else old.running_mean
        if isinstance(ref, Tensor):
            new = new.to(device=ref.device, dtype=ref.dtype)
        _take_affine(new, old)
        new.train(old.training)
    extras = NORM_ACT_CLASSES.get(_qualname(old))
    if extras is not None:
        return NormAct(new, {e: getattr(old, e) for e in extras}).train(old.training)
    return new if new is not None else nn.Identity()


def replace_batchnorms(
    model: nn.Module,
    spec: NormSpec | str,
    *,
    only: Collection[str] | None = None,
    groups_key: str = "norm.gn_groups",
) -> tuple[nn.Module, list[str]]:
    """Put the norm ``spec`` names in place of every BatchNorm layer of ``model`` (or of those
    named in ``only``); returns ``(model, names of the layers replaced)``. ``model`` changes in
    place (use the returned one, as with :func:`~normlab.norms.swap.swap_modules`). Nothing
    changes when a check fails (unknown BatchNorm subclass, groups that do not divide: the
    message names ``groups_key``, the setting to change)."""
    spec = NormSpec(name=spec) if isinstance(spec, str) else spec
    layers = batchnorm_layers(model)
    if only is not None:
        layers = {n: m for n, m in layers.items() if n in only}
    if spec.name == "bn":
        if _bn_overrides(spec):
            for m in layers.values():
                m.eps, m.momentum = spec.eps(), spec.torch_momentum()
        return model, []
    if spec.name == "gn":
        _check_groups(spec, layers, groups_key)
    targets = {id(m): n for n, m in layers.items()}
    replaced: list[str] = []

    def replacement(name: str, m: nn.Module) -> nn.Module | None:
        if id(m) not in targets:
            return None
        replaced.append(name)
        return _new_layer(spec, m)  # type: ignore[arg-type]

    return swap_modules(model, replacement), replaced
