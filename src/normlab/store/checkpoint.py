"""The schema of a run's ``checkpoint.pt``: :class:`Checkpoint`.

A checkpoint is a plain dict of tensors and containers (loadable with ``weights_only=True``):

    epoch         last finished epoch (counts from 1)
    model         the model's state_dict (rank 0's in a multi-process run)
    optimizer     optimizer.state_dict()
    scheduler     the learning-rate scheduler's state_dict()
    torch_rng     torch.get_rng_state() after the epoch
    cuda_rng      torch.cuda.get_rng_state_all(), or None without CUDA
    data_rng      the state of the generator that draws batch order and augmentation
    scaler        None (bf16 autocast needs no loss scaling; kept for the format)
    best          {"acc": best validation accuracy so far, "epoch": its epoch}
    wall_seconds  training wall time up to this epoch
    predictions   {"final": [N] int64, "best": [N] int64} each validation image's predicted
                  class by the model after ``epoch`` and by the best epoch's (the content of
                  ``predictions.npz``, kept here so a resumed run knows the best epoch's);
                  ``best`` absent when unknown; None in checkpoints written before normlab
                  kept predictions
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from normlab.errors import NormlabError


@dataclass
class Checkpoint:
    """What resuming a run needs (see the module docstring for each field)."""

    epoch: int
    model: Mapping[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    torch_rng: Tensor
    data_rng: Tensor
    best: Mapping[str, Any]
    wall_seconds: float
    cuda_rng: list[Tensor] | None = None
    scaler: None = None
    predictions: dict[str, Tensor] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any], *, source: str) -> Checkpoint:
        """Validate a loaded checkpoint dict; NormlabError naming ``source`` and the missing
        keys when it is not one of normlab's training checkpoints."""
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in state]
        if missing:
            raise NormlabError(
                f"{source}: not a normlab training checkpoint (missing {', '.join(missing)}); "
                "move it away to restart the run from scratch"
            )
        return cls(
            epoch=int(state["epoch"]),
            model=state["model"],
            optimizer=state["optimizer"],
            scheduler=state["scheduler"],
            torch_rng=state["torch_rng"],
            data_rng=state["data_rng"],
            best=dict(state["best"]),
            wall_seconds=float(state["wall_seconds"]),
            cuda_rng=state.get("cuda_rng"),
            predictions=dict(state["predictions"]) if state.get("predictions") else None,
        )
