"""The model registry and :func:`build_model`, the one entry point that builds a network.

An architecture registers a builder ``builder(num_classes, ctx, **options) -> nn.Module`` with
:func:`register_model`, declaring its options with defaults and help. :func:`build_model`
resolves the norm, validates placement, bias rule and options, and calls the builder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from normlab.errors import ConfigError
from normlab.models.blocks import PLACEMENTS, BuildContext
from normlab.models.external import (
    EXTERNAL_OPTIONS,
    build_external,
    check_external_settings,
    external_constructor,
    is_external,
)
from normlab.norms import NormSpec
from normlab.registry import Registry

__all__ = ["MODELS", "ModelEntry", "build_model", "list_models", "model_entry", "register_model"]


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture."""

    name: str
    builder: Callable[..., nn.Module]
    """``builder(num_classes, ctx: BuildContext, **options) -> nn.Module``."""
    description: str
    options: dict[str, tuple[object, str]]
    """Option name -> (default, help)."""


MODELS: Registry[ModelEntry] = Registry("model")

F = TypeVar("F", bound=Callable[..., nn.Module])

# NormSpec fields that build_model accepts as options (everything but the name).
NORM_OPTIONS = tuple(f.name for f in dataclasses.fields(NormSpec) if f.name != "name")


def register_model(
    name: str, description: str, options: Mapping[str, tuple[object, str]]
) -> Callable[[F], F]:
    """Decorator: register ``builder`` under ``name`` with its options (name -> (default, help))."""

    def add(builder: F) -> F:
        MODELS.register(name, ModelEntry(name, builder, description, dict(options)))
        return builder

    return add


def list_models() -> list[ModelEntry]:
    """Every registered architecture, sorted by name."""
    return [MODELS.get(name) for name in MODELS.names()]


def model_entry(name: str) -> ModelEntry:
    """The entry of a registered model, or of a third-party one (``torchvision:NAME``,
    ``timm:NAME``, ``module:callable``: :mod:`normlab.models.external`), whose name is checked
    here (ConfigError with close matches, or naming the extra to install)."""
    if not is_external(name):
        return MODELS.get(name)
    external_constructor(name)

    def builder(num_classes: int, ctx: BuildContext, **options: Any) -> nn.Module:
        return build_external(name, num_classes, ctx, **options)

    return ModelEntry(name, builder, f"third-party model {name}", dict(EXTERNAL_OPTIONS))


def _resolve_norm(norm: NormSpec | str | None, overrides: dict[str, Any]) -> NormSpec:
    if norm is None:
        norm = "none"
    if isinstance(norm, str):
        return NormSpec(name=norm, **overrides)
    if isinstance(norm, NormSpec):
        return norm.replace(**overrides) if overrides else norm
    raise ConfigError(f"norm must be a NormSpec, a norm name or None, got {type(norm).__name__}")


def _check_positive_int(field: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{field} must be an integer >= 1, got {value!r}")


def build_model(
    name: str,
    num_classes: int,
    norm: NormSpec | str | None = "bn",
    placement: str = "pre",
    *,
    in_channels: int = 3,
    input_size: int | None = None,
    small_input: bool | None = None,
    conv_bias: str | bool = "auto",
    **options: Any,
) -> nn.Module:
    """Build the registered architecture ``name`` with the given normalization and placement.

    Args:
        name: a registered model (``list_models()``), or a third-party one:
            ``torchvision:NAME``, ``timm:NAME``, ``module:callable``
            (:mod:`normlab.models.external`: placement ``pre`` only, ``small_input`` and
            ``conv_bias`` left at their defaults).
        num_classes: size of the output layer.
        norm: a :class:`NormSpec`, a norm name, or None (= ``"none"``: no norm modules at all).
        placement: ``"pre"`` (layer -> norm -> act) or ``"post"`` (layer -> act -> norm).
        in_channels: image channels (1 for grayscale).
        input_size: image side in pixels; needed by ``mlp``, and decides ``small_input``.
        small_input: adapt ImageNet architectures to ~32x32 images (see each model);
            None: True exactly when ``input_size`` is given and <= 32.
        conv_bias: ``"auto"`` (a conv/linear has a bias exactly when no norm directly follows
            it), True or False.
        **options: NormSpec fields (``gn_groups``, ``bn_momentum``, ...), which override ``norm``,
            and the model's own options (``ModelEntry.options``).

    The model comes initialised by :func:`~normlab.models.init_weights` (architectures call it
    at the end of their constructor, then apply ``zero_init_residual`` where they offer it).
    """
    entry = model_entry(name)
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    if input_size is not None:
        _check_positive_int("input_size", input_size)
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if is_external(name):  # the raw value: an automatic small_input does not apply
        check_external_settings(name, placement, small_input, conv_bias)
        small_input = False
    if small_input is None:
        small_input = input_size is not None and input_size <= 32
    elif not isinstance(small_input, bool):
        raise ConfigError(f"small_input must be true, false or null, got {small_input!r}")

    check_model_options(name, options)
    norm_overrides = {k: options.pop(k) for k in list(options) if k in NORM_OPTIONS}
    spec = _resolve_norm(norm, norm_overrides)
    ctx = BuildContext(
        norm=spec,
        placement=placement,
        in_channels=in_channels,
        small_input=small_input,
        conv_bias=conv_bias,
        input_size=input_size,
    )
    values = {opt: default for opt, (default, _) in entry.options.items()}
    values.update(options)
    return entry.builder(num_classes, ctx, **values)


def check_model_options(name: str, options: Mapping[str, Any]) -> ModelEntry:
    """The registry entry of model ``name``, after checking that every key of ``options`` is
    one of its options or a NormSpec field. ConfigError listing the known models or options;
    option *values* are checked by the builder."""
    entry = model_entry(name)
    unknown = sorted(set(options) - set(entry.options) - set(NORM_OPTIONS))
    if unknown:
        known = "; ".join(
            f"{opt} (default {default!r}): {help_}"
            for opt, (default, help_) in entry.options.items()
        )
        raise ConfigError(
            f"model {name!r} has no option {', '.join(map(repr, unknown))}; its options: "
            f"{known or '(none)'}; norm options: {', '.join(NORM_OPTIONS)}"
        )
    return entry


# Option checks for builders: messages name the model and option.


def option_bool(model: str, option: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"model {model!r} option {option} must be true or false, got {value!r}")
    return value


def option_int(model: str, option: str, value: object, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(
            f"model {model!r} option {option} must be an integer >= {minimum}, got {value!r}"
        )
    return value


def option_float(
    model: str,
    option: str,
    value: object,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"model {model!r} option {option} must be in {interval}, got {value!r}")
    return float(value)  # type: ignore[arg-type]
