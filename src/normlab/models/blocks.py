"""Building blocks shared by every architecture: the build context, conv/linear-norm-act units,
weight initialisation.

Placement (``BuildContext.placement``) decides the order wherever a norm and an activation meet:

* ``pre``:  layer -> norm -> act   (the BN paper; torchvision)
* ``post``: layer -> act -> norm   (seed 000, experiment 2)

A norm that no activation follows (MobileNetV2's projection conv, the last norm of a residual
branch before the addition, a downsample shortcut) is layer -> norm in both placements.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from normlab.errors import ConfigError
from normlab.norms import NormSpec, is_norm, make_norm

__all__ = [
    "PLACEMENTS",
    "BuildContext",
    "ConvNormAct",
    "init_weights",
    "norm_act",
    "zero_init_last_norms",
]

PLACEMENTS = ("pre", "post")

ActFactory = Callable[[], nn.Module]


@dataclass(frozen=True)
class BuildContext:
    """Everything a model builder needs besides its own options. Built by ``build_model``."""

    norm: NormSpec
    """The norm every layer gets (``norm.name == "none"``: no norm modules)."""
    placement: str = "pre"
    """``pre`` (layer -> norm -> act) or ``post`` (layer -> act -> norm)."""
    in_channels: int = 3
    small_input: bool = False
    """Adapt the stem/strides of ImageNet architectures to ~32x32 inputs."""
    conv_bias: str | bool = "auto"
    """``auto``: a layer has a bias exactly when no norm directly follows it; True / False."""
    input_size: int | None = None
    """Image side in pixels, when known (required by models without global pooling: mlp)."""

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(
                f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}"
            )
        if not (self.conv_bias == "auto" or isinstance(self.conv_bias, bool)):
            raise ConfigError(f"conv_bias must be 'auto', true or false, got {self.conv_bias!r}")

    def make_norm(
        self, num_features: int, kind: str = "conv", spec: NormSpec | None = None
    ) -> nn.Module | None:
        """The context's norm (or ``spec``) for ``num_features`` channels; None for no norm."""
        return make_norm(self.norm if spec is None else spec, num_features, kind)

    def group_norm_spec(self, groups: int) -> NormSpec:
        """The context's spec turned into GroupNorm with ``groups`` groups (for XBNBlock)."""
        return self.norm.replace(name="gn", gn_groups=groups)

    def bias(self, norm: nn.Module | None, act_follows: bool) -> bool:
        """Whether a conv/linear gets a bias, given the norm and activation that come after it.

        ``auto``: no bias when a norm *directly* follows (its beta makes a bias redundant), i.e.
        a norm in ``pre`` placement or a norm with no activation before it; a bias otherwise
        (no norm, or ``post`` placement where the activation sits between layer and norm).
        """
        if isinstance(self.conv_bias, bool):
            return self.conv_bias
        norm_directly_follows = norm is not None and (self.placement == "pre" or not act_follows)
        return not norm_directly_follows

    def conv(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        *,
        norm: nn.Module | None,
        act_follows: bool,
    ) -> nn.Conv2d:
        """A 'same'-padded (``(k - 1) // 2``, as torchvision) conv with the bias rule applied."""
        return nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            bias=self.bias(norm, act_follows),
        )

    def conv_norm_act(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        *,
        act: ActFactory | None,
        norm_spec: NormSpec | None = None,
    ) -> ConvNormAct:
        """Conv (+ norm) (+ activation) in this context's placement."""
        norm = self.make_norm(out_channels, "conv", norm_spec)
        conv = self.conv(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            groups,
            norm=norm,
            act_follows=act is not None,
        )
        return ConvNormAct(conv, norm, None if act is None else act(), self.placement)

    def linear_norm_act(
        self, in_features: int, out_features: int, *, act: ActFactory | None
    ) -> ConvNormAct:
        """Linear (+ dense norm) (+ activation) in this context's placement."""
        norm = self.make_norm(out_features, "dense")
        linear = nn.Linear(in_features, out_features, bias=self.bias(norm, act is not None))
        return ConvNormAct(linear, norm, None if act is None else act(), self.placement)


class ConvNormAct(nn.Sequential):
    """A layer, its norm and its activation, registered as children ``"0"``, ``"1"``, ``"2"``.

    The names never depend on placement (an absent norm or activation leaves its index unused), so
    state_dict keys are torchvision's ``Conv2dNormActivation`` keys in both placements;
    :meth:`forward` applies the children in placement order: ``pre`` 0 -> 1 -> 2, ``post``
    0 -> 2 -> 1. Despite the name the layer may be an ``nn.Linear``.
    """

    def __init__(
        self,
        layer: nn.Module,
        norm: nn.Module | None,
        act: nn.Module | None,
        placement: str = "pre",
    ) -> None:
        super().__init__()
        if placement not in PLACEMENTS:
            raise ConfigError(
                f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}"
            )
        self.add_module("0", layer)
        if norm is not None:
            self.add_module("1", norm)
        if act is not None:
            self.add_module("2", act)
        self.placement = placement
        order = ("0", "1", "2") if placement == "pre" else ("0", "2", "1")
        self._order = [key for key in order if key in self._modules]

    def forward(self, x: Tensor) -> Tensor:
        for key in self._order:
            module = self._modules[key]
            assert module is not None
            x = module(x)
        return x


def norm_act(x: Tensor, norm: nn.Module | None, act: nn.Module, placement: str) -> Tensor:
    """Apply ``norm`` (if any) and ``act`` to ``x`` in ``placement`` order."""
    if placement == "post":
        x = act(x)
        return x if norm is None else norm(x)
    if norm is not None:
        x = norm(x)
    return act(x)


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """torchvision's initialisation, for every norm type.

    Convs: Kaiming normal, fan_out, ReLU gain; conv biases 0. Linear: N(0, 0.01) weights, 0 bias.
    Every normalization layer (:func:`normlab.norms.is_norm`, so GN/LN/BRN/frozen BN too):
    weight 1 and bias 0 where it has them (parameters or, for FrozenBatchNorm, buffers).
    Running statistics are left alone.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif is_norm(m):
            weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(weight, Tensor):
                weight.fill_(1.0)
            if isinstance(bias, Tensor):
                bias.zero_()


@torch.no_grad()
def zero_init_last_norms(model: nn.Module) -> int:
    """Zero the weight of the last norm of every residual block (Goyal et al. 2017, sec 5.1).

    Each block then starts as the identity. A block says which norm is last through a
    ``last_norm()`` method; blocks without a norm, or whose last norm has no trainable weight
    (FrozenBatchNorm's is a buffer: zeroing it would silence the block for good), are skipped.
    Returns the number of weights zeroed.
    """
    count = 0
    for m in model.modules():
        last_norm = getattr(m, "last_norm", None)
        if not callable(last_norm):
            continue
        norm = last_norm()
        weight = getattr(norm, "weight", None)
        if isinstance(weight, nn.Parameter):
            weight.zero_()
            count += 1
    return count


class SkipInit(nn.Module):
    """A learnable scalar ``alpha``, initialised to 0, that scales a residual branch:
    ``x + alpha * f(x)`` (De & Smith, NeurIPS 2020, "Batch Normalization Biases Residual Blocks
    Towards the Identity Function in Deep Networks"). Every block then starts as the identity,
    which is what lets deep residual networks train *without* normalization layers.
    ``init_weights`` leaves it alone (it is neither a conv, a linear nor a norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.alpha


SKIP_INIT_OPTION: tuple[object, str] = (
    False,
    "SkipInit: a learnable scalar, 0 at init, scales each residual branch (De & Smith 2020), "
    "for training without norm layers",
)
"""The ``skip_init`` model option (default, help) of every architecture with residual blocks."""
