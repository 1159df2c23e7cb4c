"""Which third-party architectures take each norm swap and XBNBlock: a markdown table.

Builds every architecture of :data:`ARCHS` with every norm, without and with ``model.xbn``
(untrained, no download), on ``--channels``-channel ``--size`` x ``--size`` images, and prints
``ok`` or the first words of the refusal. Run:
``python benchmarks/third_party_swaps.py --size 32 --channels 3``.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from normlab.errors import ConfigError
from normlab.models import build_model

ARCHS = (
    "torchvision:resnet18",
    "torchvision:resnet50",
    "torchvision:mobilenet_v2",
    "torchvision:mobilenet_v3_small",
    "torchvision:efficientnet_b0",
    "torchvision:regnet_y_400mf",
    "torchvision:densenet121",
    "timm:resnet18",
    "timm:resnet50",
    "timm:mobilenetv2_100",
    "timm:efficientnet_b0",
    "timm:convnext_atto",
)
NORMS = ("bn", "gn", "ln", "in", "frozen_bn", "brn", "ghost_bn", "none")


def outcome(name: str, norm: str, xbn: bool, size: int, channels: int) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_model(name, 10, norm, in_channels=channels, input_size=size, xbn=xbn)
    except ConfigError as exc:
        return "refused: " + short(str(exc))
    return "ok"


def short(message: str) -> str:
    """A refusal in a few words (the full message is what a user sees)."""
    if "does not divide" in message:
        fits = message.rsplit("every layer: ", 1)[-1].split(" (")[0].split(", ")[-1]
        return f"groups do not divide C (gn_groups {fits} fits)"
    if "cannot run on" in message:
        return "cannot run at this size (" + message.split("(", 1)[1].split(",")[0][:40] + ")"
    if "no block normlab recognises" in message:
        return "no recognised block"
    if "no BatchNorm layer" in message:
        return "no BatchNorm to replace"
    return message[:60]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| model | " + " | ".join(NORMS) + " | xbn (+bn) |")
    print("|---" * (len(NORMS) + 2) + "|")
    for name in ARCHS:
        cells = [outcome(name, n, False, args.size, args.channels) for n in NORMS]
        cells.append(outcome(name, "bn", True, args.size, args.channels))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
