"""Typed, frozen training configuration, loaded from YAML and command-line overrides.

A :class:`TrainConfig` is a tree of frozen dataclasses. Every section validates itself on
construction, so a config that exists is a config that is valid. Values enter through
:func:`config_from_dict` (YAML files, ``--set key=value`` overrides), which checks types and
names the offending key with its full dotted path (``optim.lr``) and, when given, the file.

Conventions stated once, here:

* ``optim.weight_decay`` is applied by the optimizer: for ``adamw`` it is decoupled
  (Loshchilov & Hutter 2019, ``w -= lr * wd * w``); for ``sgd`` it is PyTorch's SGD
  ``weight_decay`` (``wd * w`` added to the gradient before momentum).
* ``optim.l2`` is a Keras-style penalty *added to the loss*: ``l2 * sum(w ** 2)`` over every
  conv/linear kernel (Keras' ``kernel_regularizer=l2(c)`` adds ``c * sum(w ** 2)``; its gradient
  is ``2 * c * w``), and over biases / norm parameters only when ``l2_biases`` /
  ``l2_norm_params`` say so. Reported separately as ``train/l2``.
* Epochs count from 1 in metrics and checkpoints; schedules are stepped per iteration.
* Numbers are read as YAML 1.2 writes them (:mod:`normlab.yamlio`): ``lr: 1e-3``,
  ``--set optim.weight_decay=5E-4`` and ``2.0e9`` are floats, an int is taken where a float is
  expected, and ``config.yaml`` stores floats. A string field keeps text that looks like a
  number (``--set data.path=1e3`` is the path ``1e3``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

from normlab.data import DataConfig
from normlab.errors import ConfigError
from normlab.norms import NormSpec
from normlab.yamlio import as_text, parse_value, plain_numbers, read_yaml_mapping

T = TypeVar("T")


MODEL_INITS = ("default", "lsuv")


def _check(cond: bool, key: str, expectation: str, value: object) -> None:
    if not cond:
        raise ConfigError(f"{key} must be {expectation}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Which network to build (``normlab models`` lists names and options)."""

    # a normlab architecture (normlab models), or a third-party one: "torchvision:resnet18",
    # "timm:resnet50" or "package.module:factory" (normlab.models.external)
    name: str = "resnet20"
    placement: str = "pre"  # "pre": layer -> norm -> act (BN paper); "post": layer -> act -> norm
    conv_bias: str | bool = "auto"  # "auto": a bias only where no norm directly follows the layer
    small_input: bool | None = None  # None: automatic (inputs of 32x32 or less)
    options: Mapping[str, Any] = field(default_factory=dict)  # model-specific, e.g. alpha, xbn
    # "default": the architecture's own (torchvision-style) init; "lsuv": data-dependent
    # layer-sequential unit variance (normlab.models.lsuv) on ``init_samples`` clean training
    # images, for networks without normalization. Applied on a fresh start, never on resume.
    init: str = "default"
    init_samples: int = 512

    def __post_init__(self) -> None:
        source, colon, rest = str(self.name).partition(":")
        _check(
            isinstance(self.name, str) and bool(source) and (not colon or bool(rest)),
            "model.name (--model)",
            "a model name, or torchvision:NAME, timm:NAME or module:callable",
            self.name,
        )
        _check(
            self.placement in ("pre", "post"), "model.placement", "'pre' or 'post'", self.placement
        )
        _check(
            self.init in MODEL_INITS, "model.init", " or ".join(map(repr, MODEL_INITS)), self.init
        )
        _check(self.init_samples >= 2, "model.init_samples", "at least 2", self.init_samples)
        _check(
            self.conv_bias in ("auto", True, False),
            "model.conv_bias",
            "'auto', true or false",
            self.conv_bias,
        )
        # untyped: a value written as a number (alpha: 5e-1) is stored as a plain float
        object.__setattr__(self, "options", plain_numbers(dict(self.options)))


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer, regularisation and learning-rate schedule (see the module docstring)."""

    name: str = "sgd"  # "sgd" (with momentum) | "adamw"
    lr: float = 0.1  # peak learning rate, reached after warm-up
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    weight_decay: float = 5e-4  # in the optimizer (module docstring)
    weight_decay_norm: bool = True  # False: no weight decay on norm parameters and biases
    l2: float = 0.0  # Keras-style penalty added to the loss: l2 * sum(kernel ** 2)
    l2_biases: bool = False  # also penalise biases (seed 001 penalises kernel and bias)
    l2_norm_params: bool = False  # also penalise norm gamma/beta
    schedule: str = "cosine"  # "constant" | "step" | "cosine"
    warmup_epochs: float = 0.0  # linear warm-up from 0 over this many epochs
    step_milestones: tuple[float, ...] = (0.5, 0.75)  # "step": fractions of the total steps
    step_gamma: float = 0.1  # "step": lr multiplier at each milestone
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global grad norm; None = off

    def __post_init__(self) -> None:
        _check(
            self.name in ("sgd", "adamw"), "optim.name (--optimizer)", "'sgd' or 'adamw'", self.name
        )
        _check(self.lr > 0, "optim.lr (--lr)", "> 0", self.lr)
        _check(0 <= self.momentum < 1, "optim.momentum", "in [0, 1)", self.momentum)
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            "two numbers in [0, 1)",
            self.betas,
        )
        _check(
            self.weight_decay >= 0, "optim.weight_decay (--weight-decay)", ">= 0", self.weight_decay
        )
        _check(self.l2 >= 0, "optim.l2 (--l2)", ">= 0", self.l2)
        _check(
            self.schedule in ("constant", "step", "cosine"),
            "optim.schedule",
            "'constant', 'step' or 'cosine'",
            self.schedule,
        )
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs", ">= 0", self.warmup_epochs)
        _check(
            all(0 < m < 1 for m in self.step_milestones)
            and list(self.step_milestones) == sorted(self.step_milestones),
            "optim.step_milestones",
            "increasing fractions of training in (0, 1)",
            self.step_milestones,
        )
        _check(0 < self.step_gamma <= 1, "optim.step_gamma", "in (0, 1]", self.step_gamma)
        _check(
            0 <= self.label_smoothing < 1,
            "optim.label_smoothing",
            "in [0, 1)",
            self.label_smoothing,
        )
        _check(
            self.grad_clip is None or self.grad_clip > 0,
            "optim.grad_clip",
            "> 0 or null",
            self.grad_clip,
        )


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the arithmetic runs. ``auto`` values are resolved before training and the
    resolved values are what a run's ``config.yaml`` records (every variant of a study must use
    the same precision, so the study copies them)."""

    device: str = "auto"  # "auto" (cuda if present) | "cpu" | "cuda" | "cuda:N"
    precision: str = "auto"  # "auto" | "fp32" | "bf16" (autocast)
    memory_format: str = "auto"  # "auto" | "channels_last" | "contiguous"
    compile: bool = False  # torch.compile (opt-in: it did not pay off for CPU training)
    threads: int | None = None  # torch intra-op threads; None = torch's default
    progress: str = "auto"  # progress bar: "auto" (only on a TTY) | "on" | "off"
    dist_timeout: float = 300.0  # seconds any collective may wait for the other ranks

    def __post_init__(self) -> None:
        _check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "runtime.device",
            "'auto', 'cpu', 'cuda' or 'cuda:N'",
            self.device,
        )
        _check(
            self.precision in ("auto", "fp32", "bf16"),
            "runtime.precision",
            "'auto', 'fp32' or 'bf16'",
            self.precision,
        )
        _check(
            self.memory_format in ("auto", "channels_last", "contiguous"),
            "runtime.memory_format",
            "'auto', 'channels_last' or 'contiguous'",
            self.memory_format,
        )
        _check(
            self.threads is None or 1 <= self.threads <= 1024,
            "runtime.threads",
            "from 1 to 1024",
            self.threads,
        )
        _check(
            self.progress in ("auto", "on", "off"), "runtime.progress", "auto|on|off", self.progress
        )
        _check(self.dist_timeout > 0, "runtime.dist_timeout", "> 0 seconds", self.dist_timeout)


def validates(epoch: int, eval_every: int, epochs: int) -> bool:
    """Whether the end of ``epoch`` (1-based) of an ``epochs``-epoch run validates: every
    ``eval_every``-th epoch and always the last, so a run's final accuracy and predictions
    never depend on ``eval_every``."""
    return epoch % eval_every == 0 or epoch >= epochs


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Equal configs give equal metrics."""

    model: ModelConfig = field(default_factory=ModelConfig)
    norm: NormSpec = field(default_factory=NormSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int | None = None  # None: 2 * batch_size
    # validate (and run the probes that validate) after every N-th epoch and after the last;
    # the epochs between are trained, checkpointed and logged exactly as with 1 (evaluation
    # never changes training), they just have no val/* (see TrainConfig.evaluates)
    eval_every: int = 1
    drop_last: bool = True  # drop the last partial training batch (BN needs > 1 sample)
    seed: int = 0
    probes: tuple[str, ...] = ()  # names, resolved by normlab.train.names before a run
    # Several processes (torchrun / --devices N): batch_size is the *global* batch.
    sync_bn: bool = False  # BN statistics over the global batch (SyncBatchNorm)
    dist_bn: str = "reduce"  # reconcile BN running stats before eval/save: reduce|broadcast|none

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs (--epochs)", ">= 1", self.epochs)
        _check(self.batch_size >= 1, "batch_size (--batch-size)", ">= 1", self.batch_size)
        _check(
            self.eval_batch_size is None or self.eval_batch_size >= 1,
            "eval_batch_size",
            ">= 1",
            self.eval_batch_size,
        )
        _check(self.eval_every >= 1, "eval_every", ">= 1", self.eval_every)
        # torch.manual_seed takes a 64-bit seed
        _check(0 <= self.seed < 2**63, "seed (--seed)", "an integer in [0, 2**63)", self.seed)
        _check(
            self.dist_bn in ("reduce", "broadcast", "none"),
            "dist_bn",
            "'reduce', 'broadcast' or 'none'",
            self.dist_bn,
        )

    def evaluates(self, epoch: int) -> bool:
        """Whether the end of ``epoch`` (1-based) validates (:func:`validates`)."""
        return validates(epoch, self.eval_every, self.epochs)


# --------------------------------------------------------------------------------------------
# dict <-> config


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where lossless (int -> float,
    list -> tuple, a number's spelling -> str: see :func:`normlab.yamlio.as_text`). Raise
    ConfigError naming ``key`` otherwise."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            f"{key} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}"
        )
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _from_mapping(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        value = as_text(value)
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            raise ConfigError(
                f"{key} must be a string, got {str(value).lower()} (YAML reads on/off/yes/no as "
                f"booleans: quote the value, e.g. {key.rsplit('.', 1)[-1]}: 'off')"
            )
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(
            _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin in (Mapping, dict) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


def _from_mapping(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown key '{_join(prefix, unknown[0])}' in {where}; known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {
        name: _coerce(value, hints[name], _join(prefix, name)) for name, value in data.items()
    }
    return cls(**kwargs)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def config_from_dict(data: Mapping[str, Any], *, source: str | None = None) -> TrainConfig:
    """Build and validate a TrainConfig from a (YAML-shaped) mapping.

    Unknown keys and wrong types raise :class:`ConfigError` naming the dotted key, and the
    file ``source`` when given. Keys under ``model`` that are not ModelConfig fields are taken
    as model options (``model.alpha`` is ``model.options.alpha``).
    """
    data = dict(data)
    data.pop("meta", None)  # provenance written by save_config; not part of the config
    model = data.get("model")
    if isinstance(model, Mapping):
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        extra = {k: v for k, v in model.items() if k not in model_fields}
        if extra:
            model = {k: v for k, v in model.items() if k in model_fields}
            model["options"] = {**dict(model.get("options") or {}), **extra}
            data["model"] = model
    try:
        return _from_mapping(TrainConfig, data, "")
    except ConfigError as exc:
        if source:
            raise ConfigError(f"{source}: {exc}") from None
        raise


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain (YAML-safe) dict of a config dataclass; tuples become lists."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    result: dict[str, Any] = plain(config)
    return result


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested (config-shaped) mapping as flat dotted keys: ``{"optim": {"lr": 0.1}}`` ->
    ``{"optim.lr": 0.1}``. ``options`` mappings (``model.options`` nested or dotted) and empty
    mappings stay whole values."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v and str(k).rsplit(".", 1)[-1] != "options":
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path``; ConfigError naming the file when missing or malformed."""
    return read_yaml_mapping(
        path, what="config file", expected="a mapping of config sections at the top"
    )


def load_config(path: str | Path) -> TrainConfig:
    """Load and validate a TrainConfig from a YAML file (a run's ``config.yaml`` works too)."""
    return config_from_dict(load_yaml(path), source=str(path))


def parse_override(item: str) -> tuple[str, Any]:
    """Parse one ``key=value`` override; the value is read as YAML (``0.1``, ``1e-3``, ``true``,
    ``[1,2]``; :mod:`normlab.yamlio`), and taken as text when it is not valid YAML."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (e.g. optim.lr=0.05), got {item!r}")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    value = parse_value(raw) if raw.strip() else ""
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # on/off/yes/no on the command line are words, not YAML booleans
    return key, value


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of the nested mapping ``data`` with dotted ``overrides`` set."""
    result: dict[str, Any] = _deep_copy(data)
    for key, value in overrides.items():
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"cannot set {key}: '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def replace(config: TrainConfig, **overrides: Any) -> TrainConfig:
    """A copy of ``config`` with dotted-key overrides applied and validated."""
    return config_from_dict(apply_overrides(config_to_dict(config), overrides))
