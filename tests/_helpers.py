"""Helpers shared by the test modules: tiny configs and specs, trained-looking BN models.

Imported as ``from _helpers import ...`` (pytest puts ``tests/`` on ``sys.path``; the folder has
no ``__init__.py``). Fixtures live in ``conftest.py``; plain functions and constants live here.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.config import TrainConfig, config_from_dict
from normlab.train import Callback

SRC = Path(__file__).resolve().parents[1] / "src"

# Metric-row keys that depend on wall time: left out when two runs are compared for equality.
VOLATILE = frozenset({"seconds", "images_per_s"})

# The smallest data set that still trains: 4 classes of 16x16 synthetic images.
TINY_DATA: dict[str, Any] = {
    "name": "synthetic",
    "synthetic_samples": 64,
    "synthetic_image_size": 16,
    "synthetic_classes": 4,
    "val_split": 0.25,
}


def tiny_base(**top: Any) -> dict[str, Any]:
    """A fresh training-config dict (ResNet-20, TINY_DATA, 2 epochs of batch 16, one thread);
    keyword arguments replace top-level entries."""
    return {
        "model": {"name": "resnet20"},
        "data": dict(TINY_DATA),
        "epochs": 2,
        "batch_size": 16,
        "optim": {"lr": 0.05},
        "runtime": {"threads": 1, "progress": "off"},
        **top,
    }


def set_dotted(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``tree`` with ``{"a.b.c": v}`` entries set (missing levels created)."""
    out = copy.deepcopy(tree)
    for key, value in overrides.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def tiny_config(base: dict[str, Any] | None = None, **dotted: Any) -> TrainConfig:
    """``config_from_dict`` of ``base`` (default :func:`tiny_base`) with dotted overrides; pass
    them as ``**{"optim.lr": 0.1}``."""
    return config_from_dict(set_dotted(base if base is not None else tiny_base(), dotted))


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment with ``src/`` first on PYTHONPATH (a child ``python -m
    normlab`` then runs this checkout's code, installed or not), plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def stable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metric rows without their wall-time keys (VOLATILE)."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def settle(
    model: nn.Module,
    x: torch.Tensor,
    *,
    steps: int = 3,
    seed: int = 0,
    noise: float = 0.1,
    offset: float = 0.0,
    biases: bool = False,
) -> nn.Module:
    """Make ``model`` look trained, then switch it to eval mode.

    Every affine BN gets weight ~ U(0.5, 1.5) and bias ~ U(-0.5, 0.5); with ``biases`` every
    conv/linear bias gets U(-0.5, 0.5) too. Running statistics come from ``steps`` train-mode
    passes over ``x + noise * N(0, 1) + offset``. Deterministic given ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
            elif biases and isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
        model.train()
        for _ in range(steps):
            model(x + noise * torch.randn(x.shape, generator=g) + offset)
    return model.eval()


class InterruptAt(Callback):
    """Raises KeyboardInterrupt (as Ctrl-C would) at the end of step ``step`` of ``epoch``."""

    def __init__(self, epoch: int, step: int) -> None:
        self.epoch, self.step = epoch, step

    def on_step_end(self, state: Any, epoch: int, step: int) -> None:
        if (epoch, step) == (self.epoch, self.step):
            raise KeyboardInterrupt
