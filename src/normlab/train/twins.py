"""Runs that differ only in BN momentum, trained once: :func:`fit_twins`.

BN's moving statistics never feed back into training: in training mode every BN layer
normalises with the batch's statistics, and the running ones are only written. So runs whose
configs differ in nothing but ``norm.bn_momentum`` (e.g. correct statistics and statistics that
are never updated, or Keras' momentum 0.99 and 0.999) train the *same* network, step for step;
only the statistics used at inference differ. ``fit_twins`` trains the first run and, for each
other run, keeps its own running statistics alongside: before every BN layer's training
forward pass, the same native ``batch_norm`` call the layer makes is made on the same input
with that run's buffers and momentum (its output discarded). The buffers are therefore exactly
what the run trained on its own would hold. After every epoch the network, optimizer,
schedule and data-order state are copied into each run, with its own statistics, and each run
is evaluated, probed and checkpointed exactly as ``fit`` does; a twin's checkpoint is an
ordinary one and resumes with ``fit``. Every member's summary records ``shared_training``:
the momenta trained together, whether this run took the steps (``trained``), the run that
did, and the shared training seconds (which a report counts once).

Bit-identical to training each run on its own (the tests compare every tensor, metric row and
prediction, on the CPU; on a GPU it holds as far as the BN kernel is deterministic), so
``normlab study --momentum-twins`` needs no tolerance. Refused
(:class:`~normlab.errors.ConfigError`, before anything is trained): configs that differ in
more than ``norm.bn_momentum``, models whose normalization layers are not plain BatchNorm
with a momentum (a layer such as Batch Renormalization reads its running statistics while
training; a momentum of None, PyTorch's cumulative average, is not shared here), models
whose initial weights differ, several processes, ``runtime.compile``, callbacks that act per
step (they would observe the first run only), and checkpoints at different epochs.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from normlab.config import TrainConfig, config_to_dict
from normlab.data import DataBundle
from normlab.engine.callbacks import Callback
from normlab.errors import ConfigError
from normlab.train.epoch import train_epoch
from normlab.train.fit import RunLoop, RunResult, fit_together, together_refusal

__all__ = ["fit_twins", "twinnable", "without_momentum"]

_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def without_momentum(config: TrainConfig) -> dict[str, Any]:
    """``config`` as a plain dict without ``norm.bn_momentum``: equal for momentum twins."""
    d = config_to_dict(config)
    d["norm"].pop("bn_momentum", None)
    return d


def twinnable(configs: Sequence[TrainConfig]) -> str | None:
    """Why ``configs`` cannot train as momentum twins, or None when the configs allow it (the
    models are checked when they are built)."""
    if len(configs) < 2:
        return "fewer than two runs"
    first = without_momentum(configs[0])
    if any(without_momentum(c) != first for c in configs[1:]):
        return "the runs differ in more than norm.bn_momentum"
    if configs[0].runtime.compile:
        return "runtime.compile is on"
    return None


def fit_twins(
    configs: Sequence[TrainConfig],
    outs: Sequence[str | Path],
    *,
    callbacks: Sequence[Sequence[Callback]] | None = None,
    data: DataBundle | None = None,
    verbose: bool = False,
) -> list[RunResult]:
    """Train (or resume) the runs ``configs`` (equal but for ``norm.bn_momentum``) into
    ``outs``, the network once (module docstring).

    Each ``outs[i]`` is created or resumed as ``fit(configs[i], out=outs[i], resume=True)``
    would; runs that already finished are returned as they are. ``callbacks[i]`` observe run
    i (epoch-level methods only). Raises ConfigError, before anything is trained, when the runs
    cannot share their training; the caller can then train them one at a time.
    """
    why = twinnable(configs)
    if why is not None:
        raise ConfigError(f"these runs cannot share their training: {why}")
    return fit_together(
        configs,
        outs,
        callbacks=callbacks,
        data=data,
        verbose=verbose,
        shares_data=lambda a, b: True,  # equal but for the momentum: the same split and images
        check=_check_active,
        train=_train,
    )


def _check_active(loops: Sequence[RunLoop]) -> None:
    why = together_refusal(loops, "only the first run's model takes the steps")
    if why is not None:
        raise ConfigError(f"these runs cannot share their training: {why}")
    first = loops[0].s.model
    for lp in loops[1:]:
        _check_same_network(first, lp.s.model)


def _check_same_network(a: nn.Module, b: nn.Module) -> None:
    """The two models have the same layers, the same plain BN settings but momentum, and the
    same parameters and non-statistics buffers (same initialisation or checkpoint)."""
    mods_a, mods_b = dict(a.named_modules()), dict(b.named_modules())
    if list(mods_a) != list(mods_b):
        raise ConfigError("these runs cannot share their training: their models differ")
    for name, ma in mods_a.items():
        mb = mods_b[name]
        if type(ma) is not type(mb):
            raise ConfigError(f"these runs cannot share their training: {name} differs in type")
        keeps_statistics = isinstance(ma, nn.modules.batchnorm._NormBase) or any(
            hasattr(ma, b) for b in _BUFFERS[:2]
        )
        if keeps_statistics and (type(ma) not in _PLAIN_BN or not ma.track_running_stats):
            raise ConfigError(
                f"these runs cannot share their training: {name} ({type(ma).__name__}) is not "
                "a plain BatchNorm with running statistics"
            )
        if isinstance(ma, _PLAIN_BN) and (ma.eps, ma.affine) != (mb.eps, mb.affine):
            raise ConfigError(f"these runs cannot share their training: {name} differs in eps")
        if isinstance(ma, _PLAIN_BN) and (ma.momentum is None or mb.momentum is None):
            raise ConfigError(
                f"these runs cannot share their training: {name} has momentum None "
                "(a cumulative average)"
            )
    sa, sb = a.state_dict(), b.state_dict()
    for key, value in sa.items():
        if key.rsplit(".", 1)[-1] in _BUFFERS:
            continue
        if not torch.equal(value, sb[key]):
            raise ConfigError(
                f"these runs cannot share their training: their networks differ at {key}"
            )


class _Shadows:
    """Each twin's running statistics, updated by the first run's BN layers in training."""

    def __init__(self, source: nn.Module, twins: Sequence[nn.Module]) -> None:
        self.active = False
        self.layers = [(n, m) for n, m in source.named_modules() if isinstance(m, _PLAIN_BN)]
        # per twin, per layer: (mean, var, count, momentum), the twin's own tensors cloned
        self.sets: list[list[tuple[Tensor, Tensor, Tensor, float]]] = []
        for twin in twins:
            mods = dict(twin.named_modules())
            entries = []
            for name, _ in self.layers:
                t = mods[name]
                assert isinstance(t, _PLAIN_BN) and t.momentum is not None
                assert t.running_mean is not None and t.running_var is not None
                assert t.num_batches_tracked is not None
                entries.append(
                    (
                        t.running_mean.detach().clone(),
                        t.running_var.detach().clone(),
                        t.num_batches_tracked.detach().clone(),
                        float(t.momentum),
                    )
                )
            self.sets.append(entries)
        self.handles = [
            m.register_forward_pre_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)
        ]

    def _hook(self, index: int) -> Any:
        def update(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not (self.active and module.training) or not args:
                return
            assert isinstance(module, _PLAIN_BN)
            x = args[0]
            with torch.no_grad():
                for entries in self.sets:
                    mean, var, count, momentum = entries[index]
                    # the call BatchNorm.forward makes, with this twin's buffers and momentum
                    F.batch_norm(
                        x, mean, var, module.weight, module.bias, True, momentum, module.eps
                    )
                    count.add_(1)

        return update

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Update the shadows only inside: not in evaluation or the probes' passes."""
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def write_into(self, k: int, twin: nn.Module) -> None:
        mods = dict(twin.named_modules())
        with torch.no_grad():
            for (name, _), (mean, var, count, _m) in zip(self.layers, self.sets[k], strict=True):
                t = mods[name]
                assert isinstance(t, _PLAIN_BN)
                assert t.running_mean is not None and t.running_var is not None
                assert t.num_batches_tracked is not None
                t.running_mean.copy_(mean)
                t.running_var.copy_(var)
                t.num_batches_tracked.copy_(count)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _write_back(source: RunLoop, twins: Sequence[RunLoop], shadows: _Shadows) -> None:
    """The network, optimizer, schedule and data-order state of ``source`` into every twin,
    each with its own running statistics."""
    state = source.s.model.state_dict()
    optimizer = source.s.optimizer.state_dict()
    scheduler = source.s.scheduler.state_dict()
    generator = source.s.generator.get_state()
    for k, lp in enumerate(twins):
        lp.s.model.load_state_dict(state)
        shadows.write_into(k, lp.s.model)
        lp.s.optimizer.load_state_dict(copy.deepcopy(optimizer))
        lp.s.scheduler.load_state_dict(scheduler)
        lp.s.generator.set_state(generator)


def _train(loops: Sequence[RunLoop]) -> None:
    source, twins = loops[0], list(loops[1:])
    momenta = [lp.config.norm.bn_momentum for lp in loops]
    before = (source.run.read_summary() or {}).get("shared_training") or {}
    training_seconds = float(before.get("training_seconds") or 0.0)  # of earlier invocations
    for lp in loops:
        lp.extra_summary["shared_training"] = {
            "bn_momenta": momenta,
            "trained": lp is source,  # the others' networks are copies of the first's
            "trained_by": str(source.run.path),
            "training_seconds": training_seconds,
        }
    shadows = _Shadows(source.s.model, [lp.s.model for lp in twins])
    try:
        with contextlib.ExitStack() as runs:
            for lp in loops:
                runs.enter_context(lp.running())
            for epoch in source.epochs():
                for lp in loops:
                    lp.epoch_start(epoch)
                with shadows.training():
                    row, diverged_at = train_epoch(
                        source.state,
                        source.train_model,
                        source.s.l2,
                        epoch,
                        source.show_progress,
                        source.callbacks,
                    )
                if diverged_at is not None:
                    for lp in loops:
                        lp.diverged(epoch, diverged_at)
                    break
                _write_back(source, twins, shadows)
                training_seconds += float(row["seconds"])
                for lp in loops:
                    lp.extra_summary["shared_training"]["training_seconds"] = round(
                        training_seconds, 3
                    )
                for lp in loops:
                    lp.end_epoch(epoch, dict(row))
            else:
                for lp in loops:
                    lp.complete()
    finally:
        shadows.remove()
