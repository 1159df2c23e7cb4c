"""MobileNetV2 (Sandler et al. 2018, arXiv 1801.04381), torchvision's layout and module names.

Same network as seed 000's Keras code (16 + 1 inverted residual blocks, ReLU6, no conv bias
before a norm, global average pooling + dense logits) and seed 004's (``alpha`` width multiplier,
``_make_divisible``). With 1000 classes, norm bn and placement pre it has torchvision's
3,504,872 parameters and its state_dict keys (``features.N...``, ``classifier.1``), so a
torchvision checkpoint loads. Padding is torchvision's symmetric ``k // 2``; Keras pads stride-2
convs asymmetrically (``correct_pad``), which gives the same output sizes for even inputs.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from normlab.models.blocks import (
    SKIP_INIT_OPTION,
    BuildContext,
    ConvNormAct,
    SkipInit,
    init_weights,
)
from normlab.models.build import option_bool, option_float, option_int, register_model
from normlab.norms import NormSpec

__all__ = ["InvertedResidual", "MobileNetV2", "make_divisible"]

# t (expansion), c (output channels), n (blocks), s (stride of the first block)
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor``, never going more than 10% below it.

    The rule of the TF-slim MobileNet code, used by torchvision and Keras for ``alpha`` scaling.
    """
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _relu6() -> nn.Module:
    return nn.ReLU6(inplace=True)


class InvertedResidual(nn.Module):
    """Expand 1x1 (skipped when t = 1) -> depthwise 3x3 -> linear projection 1x1 (+ identity).

    ``self.conv`` holds ``[expand ConvNormAct], depthwise ConvNormAct, projection conv, norm``
    under keys "0", "1", ... as torchvision; the projection has no activation, so it is
    conv -> norm in both placements. ``dw_norm`` overrides the depthwise conv's norm (XBNBlock).
    """

    def __init__(
        self,
        ctx: BuildContext,
        inp: int,
        oup: int,
        stride: int,
        expand_ratio: int,
        dw_norm: NormSpec | None = None,
        *,
        skip_init: bool = False,
    ) -> None:
        super().__init__()
        self.stride = stride
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        self.skip: nn.Module | None = SkipInit() if skip_init and self.use_res_connect else None
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ctx.conv_norm_act(inp, hidden, 1, act=_relu6))
        self._dw_index = len(layers)
        layers.append(
            ctx.conv_norm_act(
                hidden, hidden, 3, stride, groups=hidden, act=_relu6, norm_spec=dw_norm
            )
        )
        proj_norm = ctx.make_norm(oup)
        layers.append(ctx.conv(hidden, oup, 1, norm=proj_norm, act_follows=False))
        if proj_norm is not None:
            layers.append(proj_norm)
        self.conv = nn.Sequential(OrderedDict((str(i), m) for i, m in enumerate(layers)))
        self.out_channels = oup

    def depthwise(self) -> ConvNormAct:
        """The depthwise conv unit (whose norm XBNBlock replaces)."""
        dw = self.conv[self._dw_index]
        assert isinstance(dw, ConvNormAct)
        return dw

    def forward(self, x: Tensor) -> Tensor:
        if not self.use_res_connect:
            return self.conv(x)
        branch = self.conv(x)
        return x + (branch if self.skip is None else self.skip(branch))


class MobileNetV2(nn.Module):
    """MobileNetV2 with any norm and placement; see the module docstring.

    ``small_input`` (for ~32x32 images): the stem conv has stride 1 and the first 24-channel
    block stride 1 instead of 2, so the total stride is 8 instead of 32 and a 32x32 input ends
    at 4x4 (224x224 ends at 7x7 without it). ``xbn``: XBNBlock (Huang et al. CVPR 2022, arXiv
    2203.10778; seed 004): the norm after the depthwise conv of every inverted residual block is
    GroupNorm with ``xbn_groups`` groups (clamped to the channel count, with a warning).
    """

    def __init__(
        self,
        ctx: BuildContext,
        num_classes: int,
        alpha: float = 1.0,
        dropout: float = 0.2,
        xbn: bool = False,
        xbn_groups: int = 16,
        skip_init: bool = False,
    ) -> None:
        super().__init__()
        dw_norm = ctx.group_norm_spec(xbn_groups) if xbn else None
        input_channel = make_divisible(32 * alpha, 8)
        self.last_channel = make_divisible(1280 * max(1.0, alpha), 8)
        stem_stride = 1 if ctx.small_input else 2
        features: list[nn.Module] = [
            ctx.conv_norm_act(ctx.in_channels, input_channel, 3, stem_stride, act=_relu6)
        ]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            if ctx.small_input and c == 24:
                s = 1
            output_channel = make_divisible(c * alpha, 8)
            for i in range(n):
                features.append(
                    InvertedResidual(
                        ctx,
                        input_channel,
                        output_channel,
                        s if i == 0 else 1,
                        t,
                        dw_norm,
                        skip_init=skip_init,
                    )
                )
                input_channel = output_channel
        features.append(ctx.conv_norm_act(input_channel, self.last_channel, 1, act=_relu6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes)
        )
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


@register_model(
    "mobilenetv2",
    "MobileNetV2 (Sandler et al. 2018), torchvision layout; ReLU6; seed 000/004's network",
    {
        "alpha": (1.0, "width multiplier (channels rounded to multiples of 8)"),
        "dropout": (0.2, "dropout before the classifier"),
        "xbn": (False, "XBNBlock: GroupNorm after the depthwise conv of every block"),
        "xbn_groups": (16, "GroupNorm groups for xbn (clamped to the channel count)"),
        "skip_init": SKIP_INIT_OPTION,
    },
)
def mobilenetv2(
    num_classes: int,
    ctx: BuildContext,
    *,
    alpha: object,
    dropout: object,
    xbn: object,
    xbn_groups: object,
    skip_init: object,
) -> nn.Module:
    m = "mobilenetv2"
    return MobileNetV2(
        ctx,
        num_classes,
        alpha=option_float(m, "alpha", alpha, 0.0, float("inf"), low_open=True),
        dropout=option_float(m, "dropout", dropout, 0.0, 1.0, high_open=True),
        xbn=option_bool(m, "xbn", xbn),
        xbn_groups=option_int(m, "xbn_groups", xbn_groups),
        skip_init=option_bool(m, "skip_init", skip_init),
    )
