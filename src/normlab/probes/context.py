"""What a probe reads of the training it observes: the :class:`ProbeContext` interface.

A probe never sees a whole training loop. It reads the model, the run's seed, the training and
evaluation batch sizes, the autocast context, the learning rate of a parameter, and fixed data
samples, through this small interface, so that one implementation of every probe serves both

* normlab's own loop (:func:`normlab.train.fit`): :class:`FitContext` adapts its
  :class:`~normlab.engine.state.FitState`; the samples come from the run's data bundle;
* anyone's loop (:class:`normlab.probes.Instruments`): any ``nn.Module``, samples taken from any
  iterable of ``(x, y)`` batches (:mod:`normlab.probes.samples`).

Which images a sample holds is decided in one place, :func:`choose_sample`, with the probe's
own :func:`probe_generator`: never with a generator of the training.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from normlab.data import BatchLoader

if TYPE_CHECKING:
    from normlab.engine.state import FitState

__all__ = [
    "Batches",
    "FitContext",
    "ProbeContext",
    "choose_sample",
    "optimizer_lr",
    "probe_generator",
]

Batches = Iterable[tuple[Tensor, Tensor]]
"""A re-iterable of ``(x, y)`` batches that yields the same batches on every pass."""


class ProbeContext(Protocol):
    """What a probe may read. Implementations: :class:`FitContext`, and the plain API's
    context in :mod:`normlab.probes.instruments`."""

    @property
    def model(self) -> nn.Module:
        """The model observed (left bit-identical by every probe)."""
        ...

    @property
    def seed(self) -> int:
        """Seeds :func:`probe_generator`: which images the samples hold, and their order."""
        ...

    @property
    def batch_size(self) -> int:
        """The training batch size: batch statistics depend on it."""
        ...

    @property
    def eval_batch_size(self) -> int:
        """The batch size of evaluation passes (eval mode: it changes no value, only speed)."""
        ...

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """A fresh autocast context as the training uses (a no-op in fp32)."""
        ...

    def learning_rate(self, param: Tensor) -> float | None:
        """The learning rate the optimizer applies to ``param`` (None: no optimizer known)."""
        ...

    def split_size(self, split: str) -> int | None:
        """How many images ``split`` ("train" or "val") holds (None: not known)."""
        ...

    def sample(
        self, split: str, *, samples: int | None, batch_size: int, salt: str, drop_last: bool
    ) -> Batches | None:
        """A fixed sample of ``split`` in batches (see :func:`choose_sample`); None when there
        is no such data."""
        ...


def probe_generator(seed: int, salt: str) -> torch.Generator:
    """A CPU generator for probe ``salt``'s sampling, seeded from the run's ``seed``; the global
    generators and the training loaders' generator are never touched."""
    mixed = (int(seed) * 1_000_003 + zlib.crc32(salt.encode())) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def choose_sample(
    total: int,
    *,
    samples: int | None,
    batch_size: int,
    drop_last: bool,
    seed: int,
    salt: str,
) -> tuple[Tensor, int] | None:
    """``(indices, batch size)`` of a fixed random sample of ``total`` images; None if none.

    ``samples`` images (None or more than there are: all of them), chosen with
    :func:`probe_generator` (``salt`` names the probe and the split), in a random order that
    is the same on every call. With ``drop_last`` the sample is cut to whole batches (at least
    one batch, which holds all images when there are fewer than ``batch_size``).
    """
    if total == 0:
        return None
    k = total if samples is None else min(int(samples), total)
    if drop_last and k >= batch_size:
        k -= k % batch_size
    g = probe_generator(seed, salt)
    return torch.randperm(total, generator=g)[:k], min(batch_size, k)


def optimizer_lr(optimizers: Iterable[torch.optim.Optimizer], param: Tensor) -> float | None:
    """The ``lr`` of the first parameter group (of the first optimizer) that holds ``param``;
    0.0 when no group holds it (no optimizer moves it); None when there is no optimizer."""
    found_any = False
    for opt in optimizers:
        found_any = True
        for group in opt.param_groups:
            if any(p is param for p in group["params"]):
                return float(group["lr"])
    return 0.0 if found_any else None


class FitContext:
    """:class:`ProbeContext` over normlab's own loop: its :class:`FitState`.

    Samples are drawn from the run's data bundle (uint8 images), *without* augmentation,
    normalised like the training data, on the run's device and memory format; ``seed``,
    batch sizes and autocast are the run's. The learning rate is that of the optimizer's
    group holding the parameter (one rate for all groups in normlab's optimizers).
    """

    def __init__(self, state: FitState) -> None:
        self._state = state

    @property
    def model(self) -> nn.Module:
        return self._state.model

    @property
    def seed(self) -> int:
        return self._state.config.seed

    @property
    def batch_size(self) -> int:
        return self._state.config.batch_size

    @property
    def eval_batch_size(self) -> int:
        return self._state.config.eval_batch_size or 2 * self.batch_size

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self._state.autocast()

    def learning_rate(self, param: Tensor) -> float | None:
        return optimizer_lr([self._state.optimizer], param)

    def split_size(self, split: str) -> int:
        return int(self._labels(split).numel())

    def _images(self, split: str) -> Tensor:
        data = self._state.data
        return data.train_images if split == "train" else data.val_images

    def _labels(self, split: str) -> Tensor:
        data = self._state.data
        return data.train_labels if split == "train" else data.val_labels

    def sample(
        self, split: str, *, samples: int | None, batch_size: int, salt: str, drop_last: bool
    ) -> BatchLoader | None:
        """A :class:`BatchLoader` over the chosen images (no shuffle, no augmentation)."""
        images, labels = self._images(split), self._labels(split)
        chosen = choose_sample(
            int(labels.numel()),
            samples=samples,
            batch_size=batch_size,
            drop_last=drop_last,
            seed=self.seed,
            salt=f"{salt}/{split}",
        )
        if chosen is None:
            return None
        idx, bs = chosen
        state = self._state
        return BatchLoader(
            images[idx.to(images.device)],
            labels[idx.to(labels.device)],
            bs,
            shuffle=False,
            drop_last=drop_last,
            augment=False,
            crop_padding=0,
            flip=False,
            mean=state.data.mean,
            std=state.data.std,
            generator=torch.Generator(),  # never drawn from: no shuffle, no augmentation
            device=state.runtime.device,
            memory_format=state.runtime.torch_memory_format,
        )
