"""The random number generators a probe must leave as it found them: save, then restore.

:func:`preserved_random_state` saves, and restores in ``finally``, the state of

* torch's global CPU generator, and every CUDA device's generator once CUDA is initialised
  (it never initialises CUDA itself);
* numpy's global generator (``np.random``) and Python's (``random``);
* any generator passed in: ``torch.Generator``, ``numpy.random.Generator`` /
  ``RandomState``, ``random.Random``, or an object holding some, such as a
  ``torch.utils.data.DataLoader`` (see :func:`reachable_generators`).

Inside the block anything may draw (iterating a shuffling DataLoader, a model that draws in
eval mode); after it, the next number each generator gives is the one it would have given.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["preserved_random_state", "reachable_generators"]

# Where a DataLoader keeps generators: its own (seeds of the sampler and the workers), its
# sampler's and batch sampler's (RandomSampler, SubsetRandomSampler, WeightedRandomSampler),
# and a dataset's attribute of that name.
_HOLDERS = ("sampler", "batch_sampler", "dataset")


def _is_generator(obj: object) -> bool:
    return isinstance(
        obj, torch.Generator | np.random.Generator | np.random.RandomState | random.Random
    )


def reachable_generators(obj: object) -> list[Any]:
    """The generators :func:`preserved_random_state` can see in ``obj``: ``obj`` itself, or its
    ``generator`` attribute and that of its ``sampler``, ``batch_sampler``,
    ``batch_sampler.sampler`` and ``dataset`` (each found once).

    Not reachable: generators a dataset keeps under another name, and the generators of
    DataLoader worker processes (each worker reseeds from a seed drawn in this process, which
    is restored; persistent workers keep theirs across passes and are refused by the probes).
    """
    found: list[Any] = []

    def add(candidate: object) -> None:
        if _is_generator(candidate) and all(candidate is not g for g in found):
            found.append(candidate)

    add(obj)
    add(getattr(obj, "generator", None))
    for name in _HOLDERS:
        holder = getattr(obj, name, None)
        add(getattr(holder, "generator", None))
        add(getattr(getattr(holder, "sampler", None), "generator", None))
    return found


def _get(g: Any) -> Any:
    if isinstance(g, torch.Generator):
        return g.get_state()
    if isinstance(g, np.random.Generator):
        return g.bit_generator.state
    if isinstance(g, np.random.RandomState):
        return g.get_state()
    return g.getstate()


def _set(g: Any, state: Any) -> None:
    if isinstance(g, torch.Generator):
        g.set_state(state)
    elif isinstance(g, np.random.Generator):
        g.bit_generator.state = state
    elif isinstance(g, np.random.RandomState):
        g.set_state(state)
    else:
        g.setstate(state)


@contextlib.contextmanager
def preserved_random_state(*holders: object) -> Iterator[None]:
    """Restore, on exit (also on error), the global generators and those of ``holders``."""
    generators: list[Any] = []
    for holder in holders:
        for g in reachable_generators(holder):
            if all(g is not seen for seen in generators):
                generators.append(g)
    saved = [(g, _get(g)) for g in generators]
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)
        for g, state in saved:
            _set(g, state)
