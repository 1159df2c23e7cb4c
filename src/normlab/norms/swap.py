"""Swapping layers in a model's module tree, and rebuilding a BatchNorm as another BN class.

Every conversion of norm layers has the same two halves: walk the tree and put a new module
where an old one was (:func:`swap_modules`), and build the new layer so that it is the old one
in everything but its class (:func:`rebuild_batchnorm`). Both directions of the SyncBN
conversion use them -- :func:`normlab.norms.sync.convert_sync_batchnorm` (BN -> SyncBN) and
:func:`normlab.bn.convert.sync_to_batchnorm` (SyncBN -> BN) -- so what carries over is
defined once, here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["rebuild_batchnorm", "swap_modules"]

BN = TypeVar("BN", bound=_BatchNorm)


def rebuild_batchnorm(old: _BatchNorm, cls: type[BN]) -> BN:
    """A new ``cls`` layer that is ``old`` in everything but its class.

    ``cls`` is built with ``old``'s ``num_features``, ``eps``, ``momentum``, ``affine`` and
    ``track_running_stats``, moved to the device and floating dtype of ``old``'s tensors (its
    first floating parameter or buffer), and then given ``old``'s state_dict -- weight, bias,
    running mean and variance, ``num_batches_tracked`` -- bit for bit (the move comes first, so
    nothing is rounded through float32 on the way). Each parameter keeps its ``requires_grad``
    (a frozen gamma/beta stays frozen) and the layer its train/eval flag. Not carried over:
    hooks, a process group, and attributes set on the instance by other code.
    """
    new = cls(
        old.num_features,
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
    )
    ref = next((t for t in old.state_dict().values() if t.is_floating_point()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(old.state_dict())
    for name, param in old.named_parameters(recurse=False):
        getattr(new, name).requires_grad_(param.requires_grad)
    new.train(old.training)
    return new


def swap_modules(
    model: nn.Module, replacement: Callable[[str, nn.Module], nn.Module | None]
) -> nn.Module:
    """Put ``replacement(name, module)`` in place of every module for which it is not None.

    Modules are visited in ``model.named_modules()`` order (pre-order; ``name`` is the qualified
    name, ``""`` for the root), and a replaced module's children are not visited. A module that
    sits at several places in the tree (shared) is asked about once, under its first name, and
    its one replacement goes to every place, so sharing survives the swap. ``model`` is changed
    in place; the return value is ``model``, or the replacement of the root itself (use it, as
    with ``nn.SyncBatchNorm.convert_sync_batchnorm``).
    """
    # id(old module) -> (old module, what stands in its place); holding the old module keeps
    # its id from being reused by a module built during the walk
    done: dict[int, tuple[nn.Module, nn.Module]] = {}

    def visit(name: str, module: nn.Module) -> nn.Module:
        if id(module) in done:
            return done[id(module)][1]
        new = replacement(name, module)
        done[id(module)] = (module, module if new is None else new)
        if new is not None:
            return new
        # every slot, not named_children(): that lists a child registered twice only once
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            swapped = visit(f"{name}.{child_name}" if name else child_name, child)
            if swapped is not child:
                setattr(module, child_name, swapped)
        return module

    return visit("", model)
