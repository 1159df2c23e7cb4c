"""The probes in anyone's training loop, on any ``nn.Module``: :class:`Instruments`.

Three lines in a plain PyTorch loop (``model`` any module whose output is class logits, e.g.
``torchvision.models.resnet18(num_classes=10)``)::

    from normlab.probes import Instruments

    probes = Instruments(model, ["weights", "bn", "shift", "acts", "gap"],
                         data=train_loader, val=val_loader, optimizer=optimizer)
    for epoch in range(1, epochs + 1):
        train_one_epoch(model, train_loader, optimizer)   # your loop, unchanged
        metrics = probes.measure(epoch)   # {"bn/shift/mean/layer1.0.bn1": 0.03, ...}

``measure`` returns the keys the same probes write into ``metrics.jsonl`` in normlab's
``fit`` (the table in :mod:`normlab.probes`), computed by the same code: both read the
training through :class:`~normlab.probes.context.ProbeContext`.

Guarantees (each checked by ``tests/test_probe_api.py``):

* the model is left bit-identical by construction and by every ``measure``: parameters,
  buffers (running statistics restored bit for bit), train/eval flags, gradients; hooks are
  removed in ``finally``;
* no random number is drawn from the caller's generators: the fixed samples are collected
  once, at construction, inside :func:`~normlab.probes.rng.preserved_random_state` over the
  global torch (CPU, and CUDA once initialised) / numpy / Python generators and every
  generator reachable from ``data`` and ``val`` (a DataLoader's, its sampler's, its batch
  sampler's, its dataset's ``generator``); each ``measure`` runs inside the same guard.
  Out of reach, and documented as such: generators a dataset keeps under another name (they
  are left alone unless the dataset draws from them when read: pass data that does not
  augment) and DataLoader workers' streams (persistent workers are refused);
* which images the probes look at, and their order, is chosen by normlab's own
  :func:`~normlab.probes.context.probe_generator` from ``seed``: the same every epoch.

Conventions, where a user's loop differs from normlab's:

* Construct it *before* the first training step (it records the starting weights: the first
  ``weights/angle`` is measured from there) and call ``measure`` at each epoch's end.
* ``data`` are the images the probes forward in training mode (estimation shift, activations,
  train/eval gap); normlab's ``fit`` uses its training split without augmentation, so pass a
  loader without augmentation for the same definition. A loader is read once, up to the
  images the probes need (the first ``n`` it yields; a shuffling loader's generator is
  restored afterwards, so the training's order does not change); tensors ``(x, y)`` are
  sampled from as a whole. The samples are held on the CPU (for ``shift``: ``batches`` x
  ``batch_size`` training and ``val_samples`` validation images) and moved to the model's
  device at each pass.
* ``batch_size``: the training batch size (batch statistics depend on it); default the
  DataLoader's ``batch_size``, else its first batch's length (required for tensors).
* ``weights/eff_lr/<layer>`` is ``lr / ||w||^2`` with the ``lr`` of the optimizer's parameter
  group holding ``w`` when ``measure`` is called (0 for a weight no group holds); without an
  optimizer there are no ``eff_lr`` keys. normlab's ``fit`` uses the lr of the epoch's last
  step: call ``measure`` before stepping an epoch-wise scheduler to get the same.
* Without ``val`` there are no ``shift/val/*`` keys. ``autocast``: the dtype the training
  autocasts to (``torch.bfloat16``; None: fp32), on the model's device type.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from normlab.errors import ConfigError
from normlab.probes.base import Probe
from normlab.probes.catalog import build_probes
from normlab.probes.context import Batches, choose_sample, optimizer_lr
from normlab.probes.rng import preserved_random_state
from normlab.probes.samples import FixedBatches, Source

__all__ = ["DEFAULT_PROBES", "Instruments"]

DEFAULT_PROBES: tuple[str, ...] = ("weights", "bn", "shift", "acts", "gap")
"""Every probe, with its default options."""


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` lives: its first parameter's (or buffer's) device; CPU if it has none."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


class _LoopContext:
    """:class:`~normlab.probes.context.ProbeContext` over a user's model, data and optimizer."""

    def __init__(
        self,
        model: nn.Module,
        sources: dict[str, Source],
        optimizers: list[torch.optim.Optimizer],
        seed: int,
        batch_size: int,
        eval_batch_size: int,
        autocast: torch.dtype | None,
    ) -> None:
        self._model = model
        self._sources = sources
        self._optimizers = optimizers
        self._seed = seed
        self._batch_size = batch_size
        self._eval_batch_size = eval_batch_size
        self._autocast = autocast

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def eval_batch_size(self) -> int:
        return self._eval_batch_size

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=model_device(self._model).type, dtype=self._autocast)

    def learning_rate(self, param: Tensor) -> float | None:
        return optimizer_lr(self._optimizers, param)

    def split_size(self, split: str) -> int | None:
        return None  # an iterable's length is not known before reading it all

    def sample(
        self, split: str, *, samples: int | None, batch_size: int, salt: str, drop_last: bool
    ) -> Batches | None:
        source = self._sources.get(split)
        if source is None:
            return None
        total = source.total(samples)
        chosen = choose_sample(
            total,
            samples=samples,
            batch_size=batch_size,
            drop_last=drop_last,
            seed=self._seed,
            salt=f"{salt}/{split}",
        )
        if chosen is None:
            return None
        idx, bs = chosen
        x, y = source.images()[:total], source.labels()[:total]
        return FixedBatches(
            x[idx], y[idx], bs, drop_last=drop_last, device=lambda: model_device(self._model)
        )


def _optimizers(optimizer: object) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    opts = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    if not isinstance(opts, Iterable) or not all(
        isinstance(o, torch.optim.Optimizer) for o in opts
    ):
        raise ConfigError(
            f"probes: optimizer must be a torch.optim.Optimizer (or a list of them), got "
            f"{type(optimizer).__name__}"
        )
    return list(opts)


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"probes: {name} must be an integer >= 1, got {value!r}")
    return value


class Instruments:
    """normlab's probes attached to any model in any training loop (see the module docstring).

    Args:
        model: any ``nn.Module`` whose output is class logits ``[B, classes]``.
        probes: probe specs as on the command line (``"shift:batches=8"``); default all five.
        data: the training images for the probes that forward samples (all but ``bn``): a
            re-iterable of ``(x, y)`` batches (a DataLoader) or the tensors ``(x, y)``.
        val: validation images for ``shift/val/*``, in the same forms (optional).
        optimizer: the optimizer (or a list of them), for ``weights/eff_lr/*`` (optional).
        seed: seeds which images the samples hold and their order.
        batch_size: the training batch size (default: read from ``data``).
        eval_batch_size: batch size of the eval-mode passes (default ``2 * batch_size``).
        autocast: the autocast dtype of the training (None: fp32).

    Construction attaches: it checks everything (a :class:`~normlab.errors.ConfigError`
    names what is wrong), collects the fixed samples, and records the starting weights.
    """

    def __init__(
        self,
        model: nn.Module,
        probes: Sequence[str] = DEFAULT_PROBES,
        *,
        data: object = None,
        val: object = None,
        optimizer: object = None,
        seed: int = 0,
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
        autocast: torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"probes: model must be a torch nn.Module, got {type(model).__name__}"
            )
        self.probes: list[Probe] = build_probes(probes)
        needing = [p.name for p in self.probes if p.NEEDS_DATA]
        if needing and data is None:
            raise ConfigError(
                f"probes: {', '.join(needing)} forward samples of the training data: pass "
                "data= (a DataLoader of (x, y) batches, or the tensors (x, y))"
            )
        if autocast is not None and not (
            isinstance(autocast, torch.dtype) and autocast.is_floating_point
        ):
            raise ConfigError(
                f"probes: autocast must be a floating dtype or None, got {autocast!r}"
            )
        sources = {
            split: Source(d, what)
            for split, d, what in (("train", data, "data"), ("val", val, "val"))
            if d is not None
        }
        if batch_size is None:
            batch_size = sources["train"].batch_size() if "train" in sources else 1
        bs = _positive("batch_size", batch_size)
        ebs = _positive("eval_batch_size", eval_batch_size or 2 * bs)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"probes: seed must be an integer, got {seed!r}")
        self.model = model
        self._holders = (data, val)
        self._context = _LoopContext(
            model, sources, _optimizers(optimizer), seed, bs, ebs, autocast
        )
        self._epoch = 0
        with preserved_random_state(*self._holders):
            for probe in self.probes:
                probe.start(self._context)

    @property
    def batch_size(self) -> int:
        """The training batch size the probes use."""
        return self._context.batch_size

    def measure(self, epoch: int | None = None) -> dict[str, Any]:
        """Every probe's keys now (call at an epoch's end; ``epoch`` counts from 1, default
        one more than the last call's). Values are floats, ints, or a list (``weights/first``)."""
        self._epoch = self._epoch + 1 if epoch is None else int(epoch)
        out: dict[str, Any] = {}
        with preserved_random_state(*self._holders):
            for probe in self.probes:
                out.update(probe.measure(self._context, self._epoch, {}))
        return out

    def fixed_batches(self, samples: int | None = None) -> Batches | None:
        """A fixed sample of the training data in training-size batches (for the doctor)."""
        with preserved_random_state(*self._holders):
            return self._context.sample(
                "train", samples=samples, batch_size=self.batch_size, salt="doctor", drop_last=True
            )
