"""What one forward pass shows of a graph normlab did not write: :func:`trace_graph`.

Module attributes do not say which conv feeds which norm (``nn.Sequential`` order is a hint,
a custom ``forward`` can do anything). A forward pass does: a hook on every conv/linear keeps
the tensor object it returns, and a hook on every norm layer asks whether its input *is* one of
them (the same object, so nothing was applied between). The conv-bias rule and XBNBlock's
position use this; the pass also proves the network runs at the given image size.

Guarantees: the pass is made in eval mode on a zero image under ``torch.no_grad`` (no running
statistic moves, no dropout draws a random number, no random number is drawn at all); every
module's train/eval flag is restored and every hook removed, also when the forward fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.errors import ConfigError
from normlab.norms import is_norm

__all__ = ["GraphTrace", "first_conv_channels", "trace_graph"]

_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class GraphTrace:
    """What the forward pass showed."""

    fed_by: dict[str, str]
    """Norm layer name -> the conv/linear whose output tensor is that norm's input."""
    readers: tuple[str, ...]
    """Convs whose input is the image tensor itself."""


def first_conv_channels(model: nn.Module) -> int | None:
    """Input channels of the first 2-d conv in module order (the stem of every architecture
    normlab has tried), or None when there is none."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.in_channels


def trace_graph(model: nn.Module, channels: int, size: int, *, what: str) -> GraphTrace:
    """One forward pass of a zero ``(1, channels, size, size)`` image (see the module
    docstring). ConfigError naming ``what`` (the model) when the network cannot run on it."""
    ref = next((t for t in model.parameters()), None)
    x = torch.zeros(
        1,
        channels,
        size,
        size,
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None else None,
    )
    outputs: dict[int, tuple[str, Tensor]] = {}  # holding the tensor keeps its id unique
    fed_by: dict[str, str] = {}
    readers: list[str] = []
    handles: list[Any] = []

    def on_output(name: str) -> Any:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                outputs[id(out)] = (name, out)

        return hook

    def on_input(name: str, producer: bool) -> Any:
        def hook(_m: nn.Module, args: Any) -> None:
            arg = args[0] if args else None
            if producer and arg is x and name not in readers:
                readers.append(name)
            if not producer and isinstance(arg, Tensor) and name not in fed_by:
                source = outputs.get(id(arg))
                if source is not None and source[1] is arg:
                    fed_by[name] = source[0]

        return hook

    flags = {m: m.training for m in model.modules()}
    try:
        for name, m in model.named_modules():
            if isinstance(m, _PRODUCERS):
                handles.append(m.register_forward_pre_hook(on_input(name, True)))
                handles.append(m.register_forward_hook(on_output(name)))
            elif is_norm(m) or isinstance(m, _BatchNorm):
                handles.append(m.register_forward_pre_hook(on_input(name, False)))
        model.eval()
        with torch.no_grad():
            model(x)
    except Exception as exc:
        raise ConfigError(
            f"model {what!r} cannot run on {channels}-channel {size}x{size} images "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); give the "
            "data a larger size (data.image_size, e.g. 32 or 64)"
        ) from None
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return GraphTrace(fed_by=fed_by, readers=tuple(readers))
