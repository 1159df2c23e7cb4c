"""Train/eval flags, restored module by module: :func:`preserved_modes`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """On exit, also after an exception, set every module's ``training`` flag back to what it
    was on entry. ``model.train(flag)`` would set one flag for all and lose a submodule that a
    fine-tuning loop keeps in eval mode (e.g. BN frozen with ``bn.eval()``), so that its
    statistics would silently start updating again."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag
