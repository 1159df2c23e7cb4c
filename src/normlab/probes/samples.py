"""Fixed samples from anyone's data: ``(x, y)`` batches from any iterable, or two tensors.

The plain API (:class:`normlab.probes.Instruments`) takes what a user's loop already has:

* a re-iterable of ``(x, y)`` batches (a ``torch.utils.data.DataLoader``, a list of pairs):
  ``x`` a tensor ``[B, ...]`` as the model takes it, ``y`` integer class labels ``[B]``;
  extra items of a batch (``(x, y, meta)``) are ignored;
* or the tensors themselves, ``(x, y)`` with ``x`` ``[N, ...]`` and ``y`` ``[N]``.

:class:`Source` collects, once, the first ``n`` images the data yields (for tensors: all of
them are at hand), on the CPU, each collection inside
:func:`~normlab.probes.rng.preserved_random_state` over the data's generators, so collecting
never moves the caller's streams and two collections of the same data give the same images.
Which of them a probe looks at, and in which order, :func:`~normlab.probes.context.
choose_sample` decides with the probe's own generator; for an iterable that does not shuffle,
the first images are the data's first images (pass a shuffling loader, or tensors, for a random
sample of the whole set: a shuffling loader's generator is restored afterwards).

Refused, with the reason: a one-shot iterator (reading it would take batches away from the
training), a DataLoader with persistent workers (their random streams would move and cannot
be restored from here), and batches that are not ``(x, y)`` pairs of tensors with integer
labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from normlab.errors import ConfigError
from normlab.probes.rng import preserved_random_state

__all__ = ["FixedBatches", "Source"]


def _is_tensor_pair(data: object) -> bool:
    return (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
        and data[1].dim() == 1
        and data[0].dim() >= 1
        and data[0].shape[0] == data[1].shape[0]
    )


def _check_batch(batch: object, index: int, what: str) -> tuple[Tensor, Tensor]:
    if isinstance(batch, tuple | list) and len(batch) >= 2:
        x, y = batch[0], batch[1]
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            if y.dim() != 1 or x.dim() < 1 or x.shape[0] != y.shape[0]:
                raise ConfigError(
                    f"probes: {what}: batch {index} has x of shape {tuple(x.shape)} and y of "
                    f"shape {tuple(y.shape)}; expected x [B, ...] and class labels y [B]"
                )
            if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
                raise ConfigError(
                    f"probes: {what}: batch {index} has labels of dtype {y.dtype}; the probes "
                    "need integer class indices (loss and accuracy are cross-entropy and top-1)"
                )
            return x, y
    kind = type(batch).__name__
    raise ConfigError(
        f"probes: {what}: batch {index} is a {kind}; expected (x, y) pairs of tensors "
        "(x the model's input, y integer class labels)"
    )


class Source:
    """The images a probe may sample from one split: a prefix of an iterable, or tensors.

    ``total(n)`` collects (at most) the first ``n`` images (None: all) and returns how many
    there are; ``images()`` / ``labels()`` are the collected tensors (CPU).
    """

    def __init__(self, data: object, what: str) -> None:
        self.what = what
        self._data = data
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._exhausted = False
        self._tensors = _is_tensor_pair(data)
        if self._tensors:
            assert isinstance(data, tuple | list)
            self._x, self._y = _check_batch(tuple(data), 0, what)
            self._x, self._y = self._x.detach().cpu(), self._y.detach().cpu().long()
            self._exhausted = True
            return
        if not isinstance(data, Iterable):
            raise ConfigError(
                f"probes: {what} must be an iterable of (x, y) batches (e.g. a DataLoader) or "
                f"a pair of tensors (x, y); got a {type(data).__name__}"
            )
        if isinstance(data, Iterator):  # (not iter(data): a DataLoader's iter() draws a seed)
            raise ConfigError(
                f"probes: {what} is a one-shot iterator ({type(data).__name__}): reading it "
                "would take batches away from the training; pass a re-iterable (a DataLoader, "
                "a list of batches) or the tensors (x, y)"
            )
        if getattr(data, "persistent_workers", False) and getattr(data, "num_workers", 0) > 0:
            raise ConfigError(
                f"probes: {what} is a DataLoader with persistent workers: reading it would move "
                "the workers' random streams (augmentation) for the rest of training, which "
                "cannot be restored from here; pass a loader without persistent_workers (e.g. "
                "one without augmentation, for the probes only) or the tensors (x, y)"
            )

    def batch_size(self) -> int:
        """The data's batch size: a DataLoader's ``batch_size``, else its first batch's."""
        bs = getattr(self._data, "batch_size", None)
        if isinstance(bs, int) and not isinstance(bs, bool) and bs > 0:
            return bs
        if self._tensors:
            raise ConfigError(
                f"probes: {self.what} is given as tensors: pass batch_size= (the training "
                "batch size, which batch statistics depend on)"
            )
        x, _ = self._first_batch()
        return int(x.shape[0])

    def _first_batch(self) -> tuple[Tensor, Tensor]:
        assert isinstance(self._data, Iterable)
        with preserved_random_state(self._data):
            for batch in self._data:
                return _check_batch(batch, 0, self.what)
        raise ConfigError(f"probes: {self.what} yields no batch")

    def total(self, n: int | None) -> int:
        """How many images a sample of ``n`` (None: all) is chosen from: every image of
        tensors; for an iterable its first ``n`` (fewer when it holds fewer), collected now
        if not yet."""
        have = 0 if self._y is None else int(self._y.numel())
        if self._tensors:
            return have
        if self._exhausted or (n is not None and have >= n):
            return have if n is None else min(have, n)
        self._collect(n)
        have = 0 if self._y is None else int(self._y.numel())
        return have if n is None else min(have, n)

    def _collect(self, n: int | None) -> None:
        assert isinstance(self._data, Iterable)
        xs: list[Tensor] = []
        ys: list[Tensor] = []
        count = 0
        self._exhausted = True
        with preserved_random_state(self._data):
            iterator: Iterator[Any] = iter(self._data)
            try:
                for index, batch in enumerate(iterator):
                    x, y = _check_batch(batch, index, self.what)
                    if xs and x.shape[1:] != xs[0].shape[1:]:
                        raise ConfigError(
                            f"probes: {self.what}: batch {index} has inputs of shape "
                            f"{tuple(x.shape[1:])}, batch 0 of {tuple(xs[0].shape[1:])}: the "
                            "probes need inputs of one shape"
                        )
                    xs.append(x.detach().cpu())
                    ys.append(y.detach().cpu().long())
                    count += int(y.numel())
                    if n is not None and count >= n:
                        self._exhausted = False  # (it may hold more)
                        break
            finally:
                del iterator  # a DataLoader's workers shut down here
        if not xs:
            self._x, self._y = None, None
            return
        x_all, y_all = torch.cat(xs), torch.cat(ys)
        self._x, self._y = (x_all, y_all) if n is None else (x_all[:n], y_all[:n])

    def images(self) -> Tensor:
        assert self._x is not None
        return self._x

    def labels(self) -> Tensor:
        assert self._y is not None
        return self._y


class FixedBatches:
    """Batches of fixed tensors, the same on every pass, each moved to ``device()`` (the
    model's device when iterated, so a model moved after the samples were chosen still
    gets its inputs where it is)."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        drop_last: bool,
        device: Callable[[], torch.device],
    ) -> None:
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.drop_last = drop_last
        self._device = device

    def __len__(self) -> int:
        n = int(self.y.numel())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        device = self._device()
        bs = self.batch_size
        for b in range(len(self)):
            sl = slice(b * bs, (b + 1) * bs)
            yield self.x[sl].to(device), self.y[sl].to(device)
