"""Layer-sequential unit-variance (LSUV) initialisation (Mishkin & Matas, ICLR 2016).

A data-dependent initialisation for networks *without* normalization layers: the fair control
arm for "does BN help?" studies. torchvision's init (Kaiming fan-out) assumes a plain ReLU
stack; in residual and inverted-residual networks without BN it leaves activations (and the
logits) orders of magnitude too small or too large, so the no-norm arm never trains and the
comparison says nothing about normalization.

LSUV first re-initialises every conv and linear weight orthogonally (biases 0), then, layer by
layer in the order the forward pass reaches them, rescales the weight until the layer's output
variance on a fixed batch is 1 within ``tol`` (at most ``max_iters`` rescalings per layer).
Earlier layers are finished before later ones are measured, so each layer sees the final
statistics of its input.

Guarantees: only conv/linear weights and biases change; buffers (e.g. BN running statistics)
and the train/eval flag are restored; the result is deterministic given the batch and the
``generator``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from normlab.errors import TrainingError
from normlab.models.modes import preserved_modes

__all__ = ["LsuvLayer", "lsuv_init", "weight_layers_in_forward_order"]


@dataclass(frozen=True)
class LsuvLayer:
    """What LSUV did to one layer: its output variance before and after, and how many
    rescalings it took (``converged`` is False when ``max_iters`` ran out first)."""

    name: str
    variance_before: float
    variance_after: float
    iterations: int
    converged: bool


class _Stop(Exception):
    """Raised from a forward hook to end a forward pass once the measured layer has run."""


def _is_weight_layer(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd | nn.Linear)


@torch.no_grad()
def weight_layers_in_forward_order(model: nn.Module, x: Tensor) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers of ``model`` in the order one forward pass on ``x`` first
    calls them (layers the pass never reaches are left out)."""
    order: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    handles = []
    for name, m in model.named_modules():
        if _is_weight_layer(m):

            def hook(mod: nn.Module, _inp: object, _out: object, name: str = name) -> None:
                if id(mod) not in seen:
                    seen.add(id(mod))
                    order.append((name, mod))

            handles.append(m.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return order


def _param(m: nn.Module, name: str) -> Tensor:
    value = getattr(m, name)
    assert isinstance(value, Tensor)
    return value


def _output_variance(model: nn.Module, layer: nn.Module, x: Tensor) -> float:
    """Variance (over all elements) of ``layer``'s output in a forward pass on ``x``; the pass
    stops right after the layer."""
    got: list[float] = []

    def hook(_mod: nn.Module, _inp: object, out: Tensor) -> None:
        got.append(float(out.detach().float().var(unbiased=False)))
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:  # pragma: no cover - the layer was found by a forward pass on the same input
        raise TrainingError("LSUV: a layer the forward pass reached before was not reached again")
    return got[0]


@torch.no_grad()
def lsuv_init(
    model: nn.Module,
    x: Tensor,
    *,
    tol: float = 0.1,
    max_iters: int = 10,
    orthogonal: bool = True,
    generator: torch.Generator | None = None,
) -> list[LsuvLayer]:
    """Initialise ``model`` in place by LSUV on the batch ``x`` (see the module doc).

    The forward passes run in train mode (BN, if any, normalises with batch statistics) and in
    the model's dtype; buffers and the train/eval flag are put back afterwards. Raises
    TrainingError when a layer's output variance is 0 or not finite (it cannot be rescaled to
    1: a dead or exploding layer), naming the layer.
    """
    if tol <= 0 or max_iters < 1:
        raise ValueError(f"LSUV needs tol > 0 and max_iters >= 1, got {tol}, {max_iters}")
    with preserved_modes(model), _restored_buffers(model):
        model.train()  # BN normalises with batch statistics, as in the first training step
        layers = weight_layers_in_forward_order(model, x)
        if orthogonal:
            for _, m in layers:
                weight = _param(m, "weight")
                # drawn on the CPU (where ``generator`` lives) into a contiguous tensor:
                # orthogonal_ cannot write a channels_last weight, nor use a CPU generator on
                # a GPU tensor; copy_ then converts layout and device
                fresh = torch.empty(weight.shape, dtype=torch.float32)
                weight.copy_(nn.init.orthogonal_(fresh, generator=generator))
                if isinstance(getattr(m, "bias", None), Tensor):
                    nn.init.zeros_(_param(m, "bias"))
        done: list[LsuvLayer] = []
        for name, m in layers:
            var = before = _output_variance(model, m, x)
            iterations = 0
            while True:
                if not math.isfinite(var) or var <= 0.0:
                    raise TrainingError(
                        f"LSUV: layer {name!r} has output variance {var} on the init batch; "
                        "it cannot be scaled to unit variance (a dead or exploding layer)"
                    )
                if abs(var - 1.0) < tol or iterations == max_iters:
                    break
                _param(m, "weight").div_(math.sqrt(var))
                iterations += 1
                var = _output_variance(model, m, x)
            done.append(LsuvLayer(name, before, var, iterations, abs(var - 1.0) < tol))
        return done


@contextlib.contextmanager
def _restored_buffers(model: nn.Module) -> Iterator[None]:
    """Every buffer (BN's running statistics) as it was on entry, also after an error."""
    buffers = [(b, b.clone()) for _, b in model.named_buffers()]
    try:
        yield
    finally:
        for buf, saved in buffers:
            buf.copy_(saved)
