"""ResNets (He et al. 2016, arXiv 1512.03385): ImageNet ResNet-18/50 and CIFAR ResNet-20..110.

Module names are torchvision's (``conv1, bn1, relu, maxpool, layer1.0.conv1, layer1.0.bn1, ...,
layer1.0.downsample.0/.1, fc``) for both families, so torchvision checkpoints load into
resnet18/resnet50. A ``bnK`` attribute holds whatever norm the spec builds (or is None for norm
``none``). ResNet-50 is torchvision's v1.5 (stride on the 3x3 conv): 25,557,032 parameters with
1000 classes; ResNet-18: 11,689,512.

Placement: ``post`` swaps norm and ReLU after ``conv1`` of the stem and after every conv that
a ReLU follows inside a block (conv1, and conv2 of a bottleneck); the last norm of a block
(before the addition) and the downsample norm have no activation of their own and stay
conv -> norm.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.errors import ConfigError
from normlab.models.blocks import (
    SKIP_INIT_OPTION,
    BuildContext,
    SkipInit,
    init_weights,
    norm_act,
    zero_init_last_norms,
)
from normlab.models.build import option_bool, option_int, register_model
from normlab.norms import NormSpec

__all__ = ["BasicBlock", "Bottleneck", "CifarResNet", "ResNet", "ShortcutA"]


class _Residual(nn.Module):
    """What both residual blocks end with: the branch's last norm (no activation before the
    addition), SkipInit's scalar when on, the shortcut, the sum, then ReLU."""

    relu: nn.Module
    skip: nn.Module | None
    downsample: nn.Module | None

    def last_norm(self) -> nn.Module | None:
        raise NotImplementedError

    def join(self, branch: Tensor, x: Tensor) -> Tensor:
        norm = self.last_norm()
        if norm is not None:
            branch = norm(branch)
        if self.skip is not None:
            branch = self.skip(branch)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(branch + identity)


class BasicBlock(_Residual):
    """Two 3x3 convs + identity. XBNBlock position (``first_norm`` = GroupNorm): ``bn1``.

    For the basic block, which seed 004 and the XBNBlock paper do not define, XBN replaces the
    norm after the *first* 3x3 conv: like the bottleneck's choice (``bn2``, after the 3x3 conv)
    it is a norm inside the branch that a ReLU follows, and it leaves ``bn2``, the norm that
    shapes the branch output at the addition (and that ``zero_init_residual`` zeroes), with the
    model's norm.
    """

    expansion = 1

    def __init__(
        self,
        ctx: BuildContext,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        first_norm: NormSpec | None = None,
        *,
        skip_init: bool = False,
    ) -> None:
        super().__init__()
        self.placement = ctx.placement
        bn1 = ctx.make_norm(planes, spec=first_norm)
        self.conv1 = ctx.conv(inplanes, planes, 3, stride, norm=bn1, act_follows=True)
        self.bn1: nn.Module | None = bn1
        self.relu = nn.ReLU(inplace=True)
        bn2 = ctx.make_norm(planes)
        self.conv2 = ctx.conv(planes, planes, 3, norm=bn2, act_follows=False)
        self.bn2: nn.Module | None = bn2
        self.downsample = downsample
        self.skip: nn.Module | None = SkipInit() if skip_init else None

    def last_norm(self) -> nn.Module | None:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = norm_act(self.conv1(x), self.bn1, self.relu, self.placement)
        return self.join(self.conv2(out), x)


class Bottleneck(_Residual):
    """1x1 reduce, 3x3 (stride here, v1.5), 1x1 expand x4, + identity. XBNBlock position: ``bn2``
    (the norm after the 3x3 conv, as seed 004's Keras ResNet-50 and the paper)."""

    expansion = 4

    def __init__(
        self,
        ctx: BuildContext,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        mid_norm: NormSpec | None = None,
        *,
        skip_init: bool = False,
    ) -> None:
        super().__init__()
        self.placement = ctx.placement
        width = planes
        bn1 = ctx.make_norm(width)
        self.conv1 = ctx.conv(inplanes, width, 1, norm=bn1, act_follows=True)
        self.bn1: nn.Module | None = bn1
        bn2 = ctx.make_norm(width, spec=mid_norm)
        self.conv2 = ctx.conv(width, width, 3, stride, norm=bn2, act_follows=True)
        self.bn2: nn.Module | None = bn2
        bn3 = ctx.make_norm(planes * self.expansion)
        self.conv3 = ctx.conv(width, planes * self.expansion, 1, norm=bn3, act_follows=False)
        self.bn3: nn.Module | None = bn3
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.skip: nn.Module | None = SkipInit() if skip_init else None

    def last_norm(self) -> nn.Module | None:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = norm_act(self.conv1(x), self.bn1, self.relu, self.placement)
        out = norm_act(self.conv2(out), self.bn2, self.relu, self.placement)
        return self.join(self.conv3(out), x)


def _projection(ctx: BuildContext, inplanes: int, outplanes: int, stride: int) -> nn.Sequential:
    """Option-B shortcut: 1x1 conv (stride) + norm, keys "0" and "1" as torchvision."""
    norm = ctx.make_norm(outplanes)
    conv = ctx.conv(inplanes, outplanes, 1, stride, norm=norm, act_follows=False)
    parts: list[tuple[str, nn.Module]] = [("0", conv)]
    if norm is not None:
        parts.append(("1", norm))
    return nn.Sequential(OrderedDict(parts))


class ShortcutA(nn.Module):
    """He et al. 2016's option A: parameter-free identity with stride-``s`` subsampling and zero
    channels appended (``out_channels - in_channels`` of them, after the existing ones)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"cannot shrink {in_channels} to {out_channels} channels")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class ResNet(nn.Module):
    """ImageNet ResNet (torchvision layout) with any norm and placement.

    ``small_input``: ``conv1`` is 3x3 stride 1 (padding 1) instead of 7x7 stride 2 and there is
    no max pooling (``maxpool`` is ``nn.Identity``): a 32x32 input reaches ``layer4`` at 4x4.
    ``xbn``: XBNBlock, one GroupNorm(``xbn_groups``, clamped) per residual block, at the block's
    documented position (``Bottleneck.bn2``, ``BasicBlock.bn1``).
    """

    def __init__(
        self,
        ctx: BuildContext,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int,
        *,
        zero_init_residual: bool = False,
        xbn: bool = False,
        xbn_groups: int = 32,
        skip_init: bool = False,
    ) -> None:
        super().__init__()
        self.skip_init = skip_init
        self.placement = ctx.placement
        xbn_spec = ctx.group_norm_spec(xbn_groups) if xbn else None
        self.inplanes = 64
        bn1 = ctx.make_norm(64)
        if ctx.small_input:
            self.conv1 = ctx.conv(ctx.in_channels, 64, 3, 1, norm=bn1, act_follows=True)
        else:
            self.conv1 = ctx.conv(ctx.in_channels, 64, 7, 2, norm=bn1, act_follows=True)
        self.bn1: nn.Module | None = bn1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.Identity() if ctx.small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )
        self.layer1 = self._make_layer(ctx, block, 64, layers[0], 1, xbn_spec)
        self.layer2 = self._make_layer(ctx, block, 128, layers[1], 2, xbn_spec)
        self.layer3 = self._make_layer(ctx, block, 256, layers[2], 2, xbn_spec)
        self.layer4 = self._make_layer(ctx, block, 512, layers[3], 2, xbn_spec)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self)
        if zero_init_residual:
            zero_init_last_norms(self)

    def _make_layer(
        self,
        ctx: BuildContext,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        stride: int,
        xbn_spec: NormSpec | None,
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = _projection(ctx, self.inplanes, planes * block.expansion, stride)
        skip = self.skip_init
        layers = [block(ctx, self.inplanes, planes, stride, downsample, xbn_spec, skip_init=skip)]
        self.inplanes = planes * block.expansion
        layers += [
            block(ctx, self.inplanes, planes, 1, None, xbn_spec, skip_init=skip)
            for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = norm_act(self.conv1(x), self.bn1, self.relu, self.placement)
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarResNet(nn.Module):
    """He et al. 2016 sec 4.2's CIFAR ResNet: 3x3 conv (16) -> 3 stages of n basic blocks at
    16/32/64 channels (stride 2 entering stages 2 and 3) -> global pool -> fc; depth = 6n + 2.

    ``shortcut``: "A" (parameter-free, :class:`ShortcutA`; the paper's CIFAR choice) or "B"
    (1x1 conv + norm) where the shape changes. Designed for 32x32 inputs: ``small_input`` does
    not apply. ``xbn``: GroupNorm(``xbn_groups``, clamped) as every block's ``bn1``.
    """

    def __init__(
        self,
        ctx: BuildContext,
        depth: int,
        num_classes: int,
        *,
        shortcut: str = "A",
        zero_init_residual: bool = False,
        xbn: bool = False,
        xbn_groups: int = 16,
        skip_init: bool = False,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.placement = ctx.placement
        xbn_spec = ctx.group_norm_spec(xbn_groups) if xbn else None
        bn1 = ctx.make_norm(16)
        self.conv1 = ctx.conv(ctx.in_channels, 16, 3, 1, norm=bn1, act_follows=True)
        self.bn1: nn.Module | None = bn1
        self.relu = nn.ReLU(inplace=True)
        inplanes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                s = stride if i == 0 else 1
                downsample: nn.Module | None = None
                if s != 1 or inplanes != planes:
                    downsample = (
                        ShortcutA(inplanes, planes, s)
                        if shortcut == "A"
                        else _projection(ctx, inplanes, planes, s)
                    )
                blocks.append(
                    BasicBlock(ctx, inplanes, planes, s, downsample, xbn_spec, skip_init=skip_init)
                )
                inplanes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)
        if zero_init_residual:
            zero_init_last_norms(self)

    def forward(self, x: Tensor) -> Tensor:
        x = norm_act(self.conv1(x), self.bn1, self.relu, self.placement)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_IMAGENET_OPTIONS: dict[str, tuple[object, str]] = {
    "zero_init_residual": (False, "zero the last norm weight of each block (Goyal et al. 2017)"),
    "xbn": (False, "XBNBlock: one GroupNorm per residual block (Huang et al. 2022)"),
    "xbn_groups": (32, "GroupNorm groups for xbn (clamped to the channel count)"),
    "skip_init": SKIP_INIT_OPTION,
}


def _imagenet_resnet(
    name: str,
    block: type[BasicBlock] | type[Bottleneck],
    layers: Sequence[int],
    num_classes: int,
    ctx: BuildContext,
    *,
    zero_init_residual: object,
    xbn: object,
    xbn_groups: object,
    skip_init: object,
) -> nn.Module:
    return ResNet(
        ctx,
        block,
        layers,
        num_classes,
        zero_init_residual=option_bool(name, "zero_init_residual", zero_init_residual),
        xbn=option_bool(name, "xbn", xbn),
        xbn_groups=option_int(name, "xbn_groups", xbn_groups),
        skip_init=option_bool(name, "skip_init", skip_init),
    )


@register_model(
    "resnet18",
    "ResNet-18 (He et al. 2016), torchvision layout; XBNBlock GN at bn1",
    _IMAGENET_OPTIONS,
)
def resnet18(num_classes: int, ctx: BuildContext, **options: object) -> nn.Module:
    return _imagenet_resnet("resnet18", BasicBlock, (2, 2, 2, 2), num_classes, ctx, **options)


@register_model(
    "resnet50",
    "ResNet-50 v1.5 (He et al. 2016), torchvision layout; XBNBlock GN at bn2 (seed 004)",
    _IMAGENET_OPTIONS,
)
def resnet50(num_classes: int, ctx: BuildContext, **options: object) -> nn.Module:
    return _imagenet_resnet("resnet50", Bottleneck, (3, 4, 6, 3), num_classes, ctx, **options)


_CIFAR_OPTIONS: dict[str, tuple[object, str]] = {
    "shortcut": ("A", "A: parameter-free zero-padding shortcut (the paper's); B: 1x1 conv + norm"),
    "zero_init_residual": (False, "zero the last norm weight of each block (Goyal et al. 2017)"),
    "xbn": (False, "XBNBlock: GroupNorm as each block's bn1 (Huang et al. 2022)"),
    "xbn_groups": (16, "GroupNorm groups for xbn (clamped to the channel count)"),
    "skip_init": SKIP_INIT_OPTION,
}


def _register_cifar(depth: int) -> None:
    name = f"resnet{depth}"

    def build(
        num_classes: int,
        ctx: BuildContext,
        *,
        shortcut: object,
        zero_init_residual: object,
        xbn: object,
        xbn_groups: object,
        skip_init: object,
    ) -> nn.Module:
        if not isinstance(shortcut, str) or shortcut.upper() not in ("A", "B"):
            raise ConfigError(
                f"model {name!r} option shortcut must be 'A' or 'B', got {shortcut!r}"
            )
        return CifarResNet(
            ctx,
            depth,
            num_classes,
            shortcut=shortcut.upper(),
            zero_init_residual=option_bool(name, "zero_init_residual", zero_init_residual),
            xbn=option_bool(name, "xbn", xbn),
            xbn_groups=option_int(name, "xbn_groups", xbn_groups),
            skip_init=option_bool(name, "skip_init", skip_init),
        )

    build.__name__ = build.__qualname__ = name
    n = (depth - 2) // 6
    register_model(
        name,
        f"CIFAR ResNet-{depth} (He et al. 2016 sec 4.2): 3 stages x {n} basic blocks, 16/32/64 ch",
        _CIFAR_OPTIONS,
    )(build)


for _depth in (20, 32, 44, 56, 110):
    _register_cifar(_depth)
