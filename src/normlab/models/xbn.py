"""XBNBlock (Huang et al., CVPR 2022, arXiv 2203.10778) on architectures normlab did not build.

XBNBlock makes one norm per block GroupNorm. On a third-party model that is possible only
where the block is recognised: :data:`XBN_BLOCKS` maps a block class (qualified name) to the
conv whose norm becomes GroupNorm, at the position normlab's own architectures use:

=================================================  ==============================  =======
block                                              the norm after                  groups
=================================================  ==============================  =======
torchvision / timm ``resnet.BasicBlock``           ``conv1`` (the first 3x3)       32
torchvision / timm ``resnet.Bottleneck``           ``conv2`` (the 3x3; seed 004)   32
torchvision ``regnet.ResBottleneckBlock``          ``f.b`` (the grouped 3x3)       32
torchvision ``mobilenetv2/v3.InvertedResidual``,   the depthwise conv              16
``efficientnet.MBConv``; timm
``InvertedResidual``, ``DepthwiseSeparableConv``
=================================================  ==============================  =======

(the groups are the defaults of normlab's own resnet18/50 and mobilenetv2; ``model.xbn_groups``
overrides them). Which norm that conv feeds is read from a forward pass
(:mod:`normlab.models.trace`), not guessed from attribute names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from normlab.errors import ConfigError
from normlab.models.trace import GraphTrace

__all__ = ["XBN_BLOCKS", "XbnBlock", "xbn_positions"]

DEPTHWISE = "<depthwise>"
"""A block's ``conv``: its first depthwise conv (groups == in channels > 1), in module order."""


@dataclass(frozen=True)
class XbnBlock:
    conv: str
    """The conv (relative name, or :data:`DEPTHWISE`) whose norm becomes GroupNorm."""
    groups: int
    """Default GroupNorm groups (normlab's own architecture of the same kind)."""


XBN_BLOCKS: dict[str, XbnBlock] = {
    "torchvision.models.resnet.BasicBlock": XbnBlock("conv1", 32),
    "torchvision.models.resnet.Bottleneck": XbnBlock("conv2", 32),
    "torchvision.models.regnet.ResBottleneckBlock": XbnBlock("f.b.0", 32),
    "torchvision.models.mobilenetv2.InvertedResidual": XbnBlock(DEPTHWISE, 16),
    "torchvision.models.mobilenetv3.InvertedResidual": XbnBlock(DEPTHWISE, 16),
    "torchvision.models.efficientnet.MBConv": XbnBlock(DEPTHWISE, 16),
    "timm.models.resnet.BasicBlock": XbnBlock("conv1", 32),
    "timm.models.resnet.Bottleneck": XbnBlock("conv2", 32),
    "timm.models._efficientnet_blocks.InvertedResidual": XbnBlock("conv_dw", 16),
    "timm.models._efficientnet_blocks.DepthwiseSeparableConv": XbnBlock("conv_dw", 16),
}


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _conv_name(block: nn.Module, conv: str) -> str | None:
    if conv != DEPTHWISE:
        try:
            return conv if isinstance(block.get_submodule(conv), nn.Conv2d) else None
        except AttributeError:
            return None
    for name, m in block.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:
            return name
    return None


def xbn_positions(model: nn.Module, trace: GraphTrace, what: str) -> dict[str, int]:
    """The norm layer to make GroupNorm in each recognised block -> its default groups.

    ConfigError when no block is recognised (naming the classes looked for), or when a
    recognised block's conv feeds no norm directly (the block is not what its class says).
    """
    norm_of = {conv: norm for norm, conv in trace.fed_by.items()}
    found: dict[str, int] = {}
    for name, block in model.named_modules():
        entry = XBN_BLOCKS.get(_qualname(block))
        if entry is None:
            continue
        conv = _conv_name(block, entry.conv)
        norm = norm_of.get(f"{name}.{conv}") if conv is not None else None
        if norm is None:
            raise ConfigError(
                f"model {what!r}: block {name!r} ({_qualname(block)}) has no norm directly "
                f"after its conv {entry.conv!r}, where XBNBlock puts GroupNorm; model.xbn "
                "cannot be applied to it"
            )
        found[norm] = entry.groups
    if not found:
        raise ConfigError(
            f"model {what!r} has no block normlab recognises for model.xbn (XBNBlock needs to "
            "know which norm of a block becomes GroupNorm; a graph it cannot read is refused, "
            "not guessed); looked for: " + ", ".join(sorted(XBN_BLOCKS))
        )
    return found
