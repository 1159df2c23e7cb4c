"""What a training run in progress shows its callbacks: :class:`FitState`."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from normlab.config import TrainConfig
from normlab.data import BatchLoader, DataBundle
from normlab.engine.distributed import DistContext
from normlab.engine.runtime import ResolvedRuntime
from normlab.store import RunDir


@dataclass
class FitState:
    """What callbacks can see of a training run in progress (the probes read it through
    :class:`normlab.probes.context.FitContext`, their narrower interface)."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: DataBundle
    runtime: ResolvedRuntime
    run: RunDir
    train_loader: BatchLoader
    val_loader: BatchLoader
    start_epoch: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    dist: DistContext = field(default_factory=DistContext)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context the loop uses (a no-op in fp32)."""
        dtype = self.runtime.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.runtime.device.type, dtype=dtype)
