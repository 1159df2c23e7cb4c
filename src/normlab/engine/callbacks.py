"""Callbacks: how probes and other observers plug into the one training loop.

The loop calls a callback's methods in this order (a sketch of :func:`normlab.train.fit`)::

    cb.on_fit_start(state)                    # model built, data loaded, state restored
    for epoch in range(state.start_epoch, epochs + 1):
        model.train()
        cb.on_epoch_start(state, epoch)       # may put submodules in eval mode for the epoch
        for step in batches:
            ... forward, backward, optimizer step ...
            cb.on_step_end(state, epoch, step)
        ... evaluation ...
        row.update(cb.on_epoch_end(state, epoch, row))   # extra metrics for metrics.jsonl
        ... checkpoint ...
    cb.on_fit_end(state, status)              # always called, also after an error

Every method has a no-op default. ``on_epoch_end`` returns a mapping of extra metric keys
(e.g. ``weights/norm/<layer>``) that are written into that epoch's row; it must not change
the model's parameters or the random number generators' states (or runs would depend on which
probes were on).

The drivers that share one training among several runs (``fit_stacked``, ``fit_twins``) train
a model the runs' callbacks never see, so they refuse a callback that acts per step, or that
overrides ``on_fit_start`` or ``on_epoch_start`` without declaring ``observes_only = True``
(it only reads there: records, logs, chooses samples), since what such a callback changes
would silently not reach the shared training.

The probes are such callbacks, but read the loop only through
:class:`normlab.probes.context.ProbeContext` (``FitState`` adapted by ``FitContext``), so the
same probes also run in loops other than this one (:class:`normlab.probes.Instruments`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from normlab.engine.state import FitState


class Callback:
    """Base class; override what you need (see the module docstring for the call order)."""

    #: True when ``on_fit_start`` and ``on_epoch_start`` only read the training state, so
    #: the stacked and twin drivers may train the run in shared training (module docstring).
    observes_only: ClassVar[bool] = False

    def on_fit_start(self, state: FitState) -> None:
        """Called once before the first epoch (also on resume)."""

    def on_epoch_start(self, state: FitState, epoch: int) -> None:
        """Called before each epoch's first training step (``epoch`` counts from 1), after the
        model is put in training mode: a callback may put submodules in eval mode here for the
        epoch (e.g. to freeze BN statistics), and evaluation leaves them so."""

    def on_step_end(self, state: FitState, epoch: int, step: int) -> None:
        """Called after each optimizer step (``step`` counts from 0 within the epoch)."""

    def on_epoch_end(
        self, state: FitState, epoch: int, row: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        """Called after evaluation; return extra metrics for this epoch's row."""
        return {}

    def on_fit_end(self, state: FitState, status: str) -> None:
        """Called once at the end, whatever the outcome (``status`` as in summary.json)."""
