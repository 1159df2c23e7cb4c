"""Architectures normlab did not write, by name: ``torchvision:NAME``, ``timm:NAME`` and
``module:callable``, with the norm axis and XBNBlock applied by module replacement.

A name with a ``:`` is one of these (normlab's own names have none):

* ``torchvision:resnet18``: ``torchvision.models.get_model(NAME, weights=None,
  num_classes=N, **kwargs)`` (classification models, ``torchvision.models.list_models()``);
* ``timm:resnet50``: ``timm.create_model(NAME, pretrained=False, num_classes=N,
  in_chans=C, **kwargs)`` (``timm.list_models()``);
* ``package.module:factory``: ``factory(num_classes=N, **kwargs)``, which must return an
  ``nn.Module`` taking ``(batch, channels, H, W)`` images.

Nothing is downloaded: models are built untrained, with their own initialisation (drawn from
torch's global generator, which training seeds first). ``kwargs`` is the model option
``model.kwargs``. Then, in this order:

1. **One forward pass** at the data's image size (:func:`~normlab.models.trace.trace_graph`;
   224 when no size is given) proves the network runs on that size (a refusal names
   ``data.image_size``; normlab never upsamples behind the config's back, nor changes a stem
   stride) and shows which conv feeds which norm.
2. **Channels**: timm builds for C channels itself (``in_chans``). torchvision and factory
   models are built for the channels of their first conv (3); for C < 3 the convs that read
   the image keep the first C input slices of their kernel (values the architecture's own init
   drew; for a fan-out init, torchvision's, exactly its distribution for C channels, for a
   fan-in init a sqrt(3 / C) larger scale); C > 3 is refused.
3. **XBNBlock** (``model.xbn``): :mod:`normlab.models.xbn`.
4. **The norm axis**: :func:`~normlab.norms.replace.replace_batchnorms` (``bn`` = the
   architecture as built).
5. **Conv-bias rule**: with ``norm: none`` a conv whose output went straight into a removed
   norm gets a bias (zeros), as ``bias = norm is None`` in torchvision; other convs keep theirs.
6. A second forward pass proves the swapped network runs (e.g. InstanceNorm needs more than
   one pixel per channel).

Refused, with the reason: ``placement: post`` (the order of norm and activation is fixed by
the architecture's forward code, which a module swap cannot reorder), ``small_input: true``
(normlab's small-input stems exist only for its own architectures: use ``data.image_size``),
``conv_bias`` other than ``auto``, and any norm but ``bn`` on a model without BatchNorm layers
(nothing would change, and the run would be labelled with a norm it does not have).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from normlab.errors import ConfigError, first_line
from normlab.models.blocks import BuildContext
from normlab.models.trace import GraphTrace, first_conv_channels, trace_graph
from normlab.models.xbn import xbn_positions
from normlab.norms.replace import batchnorm_layers, replace_batchnorms

__all__ = [
    "EXTERNAL_OPTIONS",
    "build_external",
    "check_external_settings",
    "external_constructor",
    "is_external",
]

EXTERNAL_OPTIONS: dict[str, tuple[object, str]] = {
    "xbn": (False, "XBNBlock: one GroupNorm per recognised block (normlab.models.xbn)"),
    "xbn_groups": (None, "GroupNorm groups for xbn; null: 32 in residual, 16 in inverted blocks"),
    "kwargs": ({}, "keyword arguments for the model's constructor (not num_classes/weights)"),
}

TRACE_SIZE = 224
"""Image side of the forward pass when no input size is given (ImageNet's)."""

_RESERVED = ("num_classes", "weights", "pretrained", "in_chans", "pretrained_cfg")


def is_external(name: object) -> bool:
    """True for ``source:name`` model names (normlab's own names have no colon)."""
    return isinstance(name, str) and ":" in name


def _install(name: str, package: str) -> ConfigError:
    return ConfigError(
        f"model {name!r} needs {package}, which is not installed: pip install 'normlab[zoo]'"
    )


def _unknown(name: str, known: list[str], listing: str) -> ConfigError:
    close = difflib.get_close_matches(name.partition(":")[2], known, n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}; " if close else ""
    return ConfigError(f"unknown model {name!r}; {hint}list the names with {listing}")


def external_constructor(name: str) -> Callable[..., nn.Module]:
    """``ctor(num_classes, in_channels, **kwargs) -> nn.Module`` for an external name.
    ConfigError for a malformed or unknown name (with close matches) or a missing package."""
    source, _, rest = name.partition(":")
    if not source or not rest:
        raise ConfigError(
            f"model name {name!r} must be torchvision:NAME, timm:NAME or module:callable"
        )
    if source == "torchvision":
        try:
            import torchvision.models as tvm
        except ImportError:
            raise _install(name, "torchvision") from None
        known = tvm.list_models(module=tvm)
        if rest not in known:
            raise _unknown(name, known, "torchvision.models.list_models()")
        return lambda n, c, **kw: tvm.get_model(rest, weights=None, num_classes=n, **kw)
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise _install(name, "timm") from None
        if not timm.is_model(rest):
            raise _unknown(name, timm.list_models(), "timm.list_models()")
        return lambda n, c, **kw: timm.create_model(
            rest, pretrained=False, num_classes=n, in_chans=c, **kw
        )
    return _factory(name, source, rest)


def _factory(name: str, module: str, attr: str) -> Callable[..., nn.Module]:
    obj = import_callable(
        f"model {name!r}",
        module,
        attr,
        missing_hint="a third-party model is torchvision:NAME, timm:NAME or an importable "
        "module:callable",
    )
    return lambda n, c, **kw: obj(num_classes=n, **kw)


def import_callable(prefix: str, module_name: str, attr: str, *, missing_hint: str) -> Any:
    """``module_name``'s attribute ``attr`` (dotted: ``a.b``), checked to be a callable that
    can build a model. Raises ConfigError, its message starting with ``prefix``, when the
    module is missing (``missing_hint`` says what to do), its own code fails while importing,
    the attribute does not exist, or it is not callable or is a built-in function. The one
    resolver of ``module:callable`` names (the model registry and the BN toolbox both use it).
    """
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{prefix}: cannot import module {module_name!r} ({exc}); {missing_hint}"
        ) from None
    except (Exception, SystemExit) as exc:  # the module's own code failed while importing
        raise ConfigError(
            f"{prefix}: importing module {module_name!r} failed ({first_line(exc)})"
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{prefix}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{prefix}: {attr!r} in {module_name!r} is not callable")
    if inspect.isbuiltin(obj):
        raise ConfigError(
            f"{prefix}: {attr!r} is a built-in function, not a model class or a function that "
            "builds one"
        )
    return obj


def check_external_settings(
    name: str, placement: str, small_input: bool | None, conv_bias: object
) -> None:
    """ConfigError for a model setting a third-party architecture cannot honour (why: see the
    module docstring)."""
    if placement != "pre":
        raise ConfigError(
            f"model.placement: {placement!r} cannot be applied to the third-party model "
            f"{name!r}: where its norms sit relative to its activations is decided by its own "
            "forward code, which a module swap cannot reorder; use placement: pre (its own "
            "order) or a normlab architecture (normlab models)"
        )
    if small_input:
        raise ConfigError(
            f"model.small_input: true applies to normlab's own architectures, not {name!r} "
            "(normlab does not rewrite a third-party stem); leave it null and set "
            "data.image_size if the images are too small"
        )
    if conv_bias != "auto":
        raise ConfigError(
            f"model.conv_bias: {conv_bias!r} cannot be applied to {name!r}: a third-party model "
            "keeps its own conv biases, plus one on each conv whose norm norm: none removes "
            "(auto)"
        )


def _options(name: str, xbn: object, xbn_groups: object, kwargs: object) -> dict[str, Any]:
    if not isinstance(xbn, bool):
        raise ConfigError(f"model {name!r} option xbn must be true or false, got {xbn!r}")
    ok = xbn_groups is None or (
        isinstance(xbn_groups, int) and not isinstance(xbn_groups, bool) and xbn_groups >= 1
    )
    if not ok:
        raise ConfigError(
            f"model {name!r} option xbn_groups must be an integer >= 1 or null, got {xbn_groups!r}"
        )
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"model {name!r} option kwargs must be a mapping, got {kwargs!r}")
    reserved = sorted(set(map(str, kwargs)) & set(_RESERVED))
    if reserved:
        raise ConfigError(
            f"model {name!r} option kwargs may not set {', '.join(reserved)}: normlab passes the "
            "class count from the data and builds every model untrained"
        )
    return dict(kwargs)


def _adapt_channels(
    model: nn.Module, trace: GraphTrace, built: int, wanted: int, name: str
) -> None:
    if built == wanted:
        return
    if wanted > built or not trace.readers:
        raise ConfigError(
            f"model {name!r} is built for {built}-channel images and cannot be given "
            f"{wanted}-channel ones"
            + ("" if trace.readers else " (no conv reads the image directly)")
        )
    for reader in trace.readers:
        conv = model.get_submodule(reader)
        assert isinstance(conv, nn.Conv2d)
        if conv.groups != 1:
            raise ConfigError(f"model {name!r}: the stem conv {reader!r} is grouped")
        conv.weight = nn.Parameter(conv.weight.detach()[:, :wanted].clone())
        conv.in_channels = wanted


@torch.no_grad()
def _add_biases(model: nn.Module, convs: list[str]) -> None:
    for name in convs:
        layer = model.get_submodule(name)
        w = layer.weight
        if getattr(layer, "bias", None) is None and isinstance(w, torch.Tensor):
            layer.bias = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))


def build_external(name: str, num_classes: int, ctx: BuildContext, **options: Any) -> nn.Module:
    """The third-party model ``name`` with ``ctx``'s norm (see the module docstring).
    ``ctx.small_input`` is ignored (:func:`check_external_settings` ran on the raw value)."""
    kwargs = _options(name, options["xbn"], options["xbn_groups"], options["kwargs"])
    check_external_settings(name, ctx.placement, None, ctx.conv_bias)
    try:
        model = external_constructor(name)(num_classes, ctx.in_channels, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"model {name!r} could not be built: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model {name!r}: the factory returned {type(model).__name__}, not a Module"
        )
    size = ctx.input_size or TRACE_SIZE
    built = first_conv_channels(model) or ctx.in_channels
    trace = trace_graph(model, built, size, what=name)
    _adapt_channels(model, trace, built, ctx.in_channels, name)
    spec = ctx.norm
    if spec.name != "bn" and not batchnorm_layers(model):
        raise ConfigError(
            f"model {name!r} has no BatchNorm layer, so norm {spec.name!r} would change nothing "
            "(the norm axis replaces BatchNorm layers); use norm: bn, the architecture as built"
        )
    xbn_norms: list[str] = []
    if options["xbn"]:
        positions = xbn_positions(model, trace, name)
        for groups in sorted(set(positions.values())):
            chosen = [n for n, g in positions.items() if g == groups]
            gn = spec.replace(name="gn", gn_groups=options["xbn_groups"] or groups)
            model, done = replace_batchnorms(model, gn, only=chosen, groups_key="model.xbn_groups")
            xbn_norms += done
    model, replaced = replace_batchnorms(model, spec)
    if spec.name == "none":
        _add_biases(model, [trace.fed_by[n] for n in replaced if n in trace.fed_by])
    trace_graph(model, ctx.in_channels, size, what=name)
    return model
