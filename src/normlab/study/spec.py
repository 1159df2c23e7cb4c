"""A study specification: one base training configuration, named variants, several seeds.

A study is a YAML file (``normlab studies --show placement`` prints a built-in one)::

    name: placement                 # letters, digits, '.', '_', '-'
    description: BN before or after the activation (seed 000/003)
    baseline: pre                   # the variant the others are compared with (default: first)
    seeds: 3                        # a count (seeds 0..2) or a list of distinct seeds
    base:                           # a TrainConfig, the same keys as a run's config.yaml
      data: {name: digits, image_size: 16}
      epochs: 10
    groups:                         # optional: every variant runs in every group, and
      resnet20: {model.name: resnet20}        # comparisons stay within a group
      mlp: {model.name: mlp}
    variants:                       # name -> overrides of the base (dotted or nested keys),
      pre: {model.placement: pre}   #   or {description: ..., set: {...overrides...}}
      post: {model.placement: post}
    comparisons:                    # optional: more paired comparisons, within each group,
      - [post, other]               #   [variant, reference] (every variant is compared with
                                    #   the baseline anyway)
    optional_probes: [weights]      # probes added to every run when normlab.probes has them
    log: [tensorboard, mlflow]      # optional: also log every run (normlab.engine.loggers):
                                    #   <run>/tensorboard, and one MLflow run per run directory
                                    #   in <study>/mlruns (or mlflow:DIR), tagged with the
                                    #   study, group, variant and seed
    lr_reference_batch_size: 128    # optional: optim.lr *= batch_size / 128 in every run
    devices: 1                      # optional: processes per run (DDP via torchrun); also a
                                    #   key of base, of a group or of a variant
    budgets:                        # optional: a ladder of training budgets, crossed with the
      x1: {}                        #   groups (see below)
      x4: {epochs: 4, train: 4}     #   eval_every: N (optional): the rung validates every N
    notes: free text shown in the report
    extends: other.yaml             # optional: start from another spec (see below)
    flip_defaults: {digits: false}  # written by the study runner (see below)

``extends: PATH`` (relative to this file; or a built-in study's name) starts from that study's
document and merges this one into it: mappings merge key by key at every depth (this file's
values win), anything else (lists, numbers, strings) is replaced. ``null`` keeps its meaning
as a value (``data.image_size: null`` is full size), except for an entry of ``groups`` or
``variants``, where it drops that group or variant. Chains are followed; a cycle is an error.
A study directory's ``study.yaml`` is always the merged, self-contained result.

``devices: N`` (default 1) trains a run in N processes (``normlab train --devices N``, one
subprocess per run); ``batch_size`` stays the *global* batch, so each process sees
``batch_size / N`` samples and ``batch_size`` must be divisible by N. A variant's ``devices``
wins over its group's, the group's over the study's (top-level or ``base.devices``; the two
must agree when both are given). ``sync_bn: true`` needs ``devices >= 2``.

``flip_defaults`` maps a data source name to the ``data.flip`` of every run that uses that
source and does not set ``data.flip`` itself. The study runner records it in ``study.yaml``
when it plans, with each source's default of the time (``Source.flip``), so resuming or adding
seeds later flips as the first runs did; a saved ``study.yaml`` without it was made when every
source was flipped, and resumes so (:func:`normlab.study.plan.saved_flips`).

``budgets`` turns a study into a ladder: each rung multiplies every arm's training length
(``epochs``, default 1) and training-set size (``train``: multiplies ``data.limit_train``,
which must then be set; default 1), on top of the base, its group and its variant. The rungs
are crossed with the groups: a study with groups ``bs8, bs32`` and rungs ``x1, x4`` runs the
groups ``bs8@x1, bs8@x4, bs32@x1, bs32@x4`` (without groups, the rungs are the groups), each a
group like any other: its runs live under its name, and the report compares arms within it,
so the study-level family covers every rung. A scaled length or size must be a whole number.
Other settings stay as the arm has them: ``optim.warmup_epochs`` stays in epochs, the
learning-rate schedule stretches over the longer run (it is defined per step over the total),
and a larger ``limit_train`` draws a class-stratified superset of the smaller one (same seed).
A rung may run only some of the declared groups, ``groups: [resnet20]`` (to spend a long
rung's compute where the question is; the report reads each group's ladder over the rungs it
ran). A rung may also set ``eval_every`` (a whole number >= 1): its runs validate, and run the probes
that validate, only every that many epochs and after the last (``TrainConfig.eval_every``).
That is the one setting a rung may change besides its budget, because it cannot change what
is trained (the final model, accuracy and predictions are the same; tested): it keeps a long
rung's validation cost near the short rungs' when the validation set is large.

A run's configuration is ``base`` < the group's overrides < the variant's overrides, then the
linear learning-rate scaling, then the rung's multipliers. Command-line overrides (``--set``, ``--epochs``, ``--data``)
change the *base*: a key that a group or variant sets keeps the group's or variant's value
(:func:`shadowed_keys` lists such keys so that the CLI can say so).

Validation happens on load, for every group x variant combination: a bad key raises
:class:`~normlab.errors.ConfigError` whose message starts with the file and names the key,
e.g. ``study.yaml: variants.post: unknown key 'optim.lrr' in section 'optim'; known keys: ...``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from normlab.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    flatten,
)
from normlab.data import DataConfig, split_data_spec
from normlab.engine.loggers import parse_loggers
from normlab.errors import ConfigError
from normlab.study.layout import STUDY_FILE
from normlab.yamlio import as_text, loads, read_yaml, read_yaml_mapping

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_TOP_KEYS = (
    "name",
    "description",
    "baseline",
    "seeds",
    "base",
    "groups",
    "variants",
    "comparisons",
    "optional_probes",
    "log",
    "lr_reference_batch_size",
    "devices",
    "notes",
    "flip_defaults",
    "budgets",
)
DEVICES_KEY = "devices"
"""The study key (top level, base, group, variant) giving the processes per run."""
_LONG_FORM_KEYS = ("description", "set")
# Data settings that survive --data switching the source (image_size, synthetic_* do not).
_PORTABLE_DATA_KEYS = (
    "val_split",
    "augment",
    "crop_padding",
    "flip",
    "limit_train",
    "limit_val",
    "cache_dir",
)
# Keys a variant or group may not set: the study owns them.
_STUDY_OWNED = ("seed",)


@dataclass(frozen=True)
class Entry:
    """One entry of ``variants`` or ``groups``: a name, overrides (flat dotted keys) of the base
    configuration, a description, and optionally its own processes per run.

    A variant and a group hold the same things and differ only in how the study uses them
    (every variant runs in every group; comparisons stay within a group), so both are this
    class, under the names :data:`Variant` and :data:`Group`.
    """

    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    devices: int | None = None  # processes per run; None: inherited (group, else study)


Variant = Entry
"""A variant of the study (one arm in each group): an :class:`Entry` of ``variants``."""

Group = Entry
"""A setting every variant is run in (a model, a batch size), compared within, not across: an
:class:`Entry` of ``groups``."""

RUNG_SEP = "@"
"""Joins a group and a budget rung into the name of the group the study runs (``bs8@x4``)."""


@dataclass(frozen=True)
class Budget:
    """One rung of a budget ladder (module docstring): multipliers of every arm's ``epochs``
    and ``data.limit_train``."""

    name: str
    epochs: float = 1.0
    train: float = 1.0
    eval_every: int | None = None  # the rung's runs' eval_every (None: the arm's own)
    groups: tuple[str, ...] | None = None  # the declared groups run at this rung (None: all)

    def multipliers(self, sep: str = ", ") -> str:
        """What the rung multiplies, in words: ``"4x epochs"``, ``"16x training images"``,
        ``"2x epochs, 2x training images"``, or ``"the base budget"`` (both x1)."""
        parts = [
            f"{factor:g}x {what}"
            for factor, what in ((self.epochs, "epochs"), (self.train, "training images"))
            if factor != 1.0
        ]
        return sep.join(parts) or "the base budget"


@dataclass(frozen=True)
class StudySpec:
    """A validated study (see the module docstring). Build with :func:`spec_from_dict` or
    :func:`load_spec`; every group x variant configuration is known to be valid."""

    name: str
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    base: Mapping[str, Any] = field(default_factory=dict)
    baseline: str = ""
    groups: tuple[Group, ...] = ()
    description: str = ""
    optional_probes: tuple[str, ...] = ()
    log: tuple[str, ...] = ()  # loggers of every run (normlab.engine.loggers.parse_loggers)
    lr_reference_batch_size: int | None = None
    notes: str = ""
    source: str | None = None  # where it was loaded from (not saved)
    devices: int = 1  # processes per run unless a group or variant says otherwise
    # extra (variant, reference) pairs the report compares, besides every variant vs baseline
    comparisons: tuple[tuple[str, str], ...] = ()
    # data source -> data.flip of the runs that leave it to their source (module docstring);
    # None: not recorded (each source's default applies)
    flip_defaults: Mapping[str, bool] | None = None
    budgets: tuple[Budget, ...] = ()  # the ladder's rungs, in order (module docstring)

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    @property
    def declared_groups(self) -> list[str | None]:
        """The ``groups`` names as the spec declares them, or ``[None]`` without groups."""
        return [g.name for g in self.groups] or [None]

    @property
    def group_names(self) -> list[str | None]:
        """The groups the study runs: the declared groups (``[None]`` without any), each crossed
        with the budget rungs when there are some (:func:`rung_group`; a rung with ``groups``
        runs only those)."""
        if not self.budgets:
            return self.declared_groups
        return [
            rung_group(g, b.name)
            for g in self.declared_groups
            for b in self.budgets
            if b.groups is None or g in b.groups
        ]

    def split_group(self, name: str | None) -> tuple[str | None, Budget | None]:
        """A run group's declared group and budget rung (``"bs8@x4"`` -> ``("bs8", x4)``)."""
        if not self.budgets or name is None:
            return name, None
        if self.groups:
            group, sep, rung = name.rpartition(RUNG_SEP)
            if not sep:
                raise ConfigError(
                    f"study '{self.name}' runs its groups per budget rung: a group name is "
                    f"GROUP{RUNG_SEP}RUNG, got '{name}'"
                )
        else:  # without declared groups, the rungs are the groups
            group, rung = "", name
        for b in self.budgets:
            if b.name == rung:
                return group or None, b
        raise ConfigError(
            f"study '{self.name}' has no budget rung '{rung}'; rungs: "
            + ", ".join(b.name for b in self.budgets)
        )

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ConfigError(f"study '{self.name}' has no variant '{name}'")

    def group(self, name: str | None) -> Group | None:
        """The declared group of a run group (its rung, if any, is :meth:`split_group`'s)."""
        name, _ = self.split_group(name)
        if name is None:
            return None
        for g in self.groups:
            if g.name == name:
                return g
        raise ConfigError(f"study '{self.name}' has no group '{name}'")

    def arm_overrides(self, group: str | None, variant: str) -> dict[str, Any]:
        """The overrides of one group x variant (variant wins), before lr scaling."""
        g = self.group(group)
        return {**(dict(g.overrides) if g else {}), **dict(self.variant(variant).overrides)}

    def arm_devices(self, group: str | None, variant: str) -> int:
        """Processes per run of one group x variant: the variant's, else the group's, else the
        study's ``devices``."""
        v = self.variant(variant).devices
        if v is not None:
            return v
        g = self.group(group)
        if g is not None and g.devices is not None:
            return g.devices
        return self.devices

    def arm_dict(self, group: str | None, variant: str) -> dict[str, Any]:
        """The config mapping of one arm: base < group < variant, then ``flip_defaults``, the
        lr scaling and the budget rung's multipliers."""
        data = apply_overrides(self.base, self.arm_overrides(group, variant))
        source = arm_flip_source(data)
        if source is not None and source in (self.flip_defaults or {}):
            data = apply_overrides(data, {"data.flip": (self.flip_defaults or {})[source]})
        if self.lr_reference_batch_size:
            config = config_from_dict(data)
            data = apply_overrides(
                data,
                {"optim.lr": config.optim.lr * config.batch_size / self.lr_reference_batch_size},
            )
        _, rung = self.split_group(group)
        return data if rung is None else scale_budget(data, rung)

    def arm_config(self, group: str | None, variant: str, seed: int = 0) -> TrainConfig:
        """The validated TrainConfig of one arm for ``seed``."""
        return config_from_dict(apply_overrides(self.arm_dict(group, variant), {"seed": seed}))


def rung_group(group: str | None, rung: str) -> str:
    """The name of the group that runs declared ``group`` at budget ``rung``."""
    return rung if group is None else f"{group}{RUNG_SEP}{rung}"


def _scaled(value: int, factor: float, what: str, rung: Budget) -> int:
    scaled = value * factor
    if abs(scaled - round(scaled)) > 1e-9 or round(scaled) < 1:
        raise ConfigError(
            f"budgets.{rung.name}: {what} {value} x {factor:g} = {scaled:g} is not a whole "
            "number >= 1; choose multipliers that give whole numbers"
        )
    return round(scaled)


def scale_budget(data: Mapping[str, Any], rung: Budget) -> dict[str, Any]:
    """The config mapping ``data`` at budget ``rung``: ``epochs`` and ``data.limit_train``
    multiplied, ``eval_every`` set when the rung gives it (ConfigError naming the rung when a product is not whole, or when ``train`` is
    not 1 and ``data.limit_train`` is unset: the full training set cannot grow)."""
    config = config_from_dict(data)
    changes: dict[str, Any] = {}
    if rung.epochs != 1:
        changes["epochs"] = _scaled(config.epochs, rung.epochs, "epochs", rung)
    if rung.train != 1:
        if config.data.limit_train is None:
            raise ConfigError(
                f"budgets.{rung.name}: train x{rung.train:g} multiplies data.limit_train, which "
                "is not set (the run uses the whole training split, which cannot grow); set "
                "data.limit_train in the base"
            )
        changes["data.limit_train"] = _scaled(
            config.data.limit_train, rung.train, "data.limit_train", rung
        )
    if rung.eval_every is not None:
        changes["eval_every"] = rung.eval_every
    return apply_overrides(data, changes) if changes else dict(data)


def arm_flip_source(config: Mapping[str, Any]) -> str | None:
    """The data source of a config mapping when the mapping leaves ``data.flip`` to it
    (absent or null), else None."""
    data = config.get("data") or {}
    if not isinstance(data, Mapping) or data.get("flip") is not None:
        return None
    name = data.get("name", DataConfig.name)
    return name if isinstance(name, str) else None


# --------------------------------------------------------------------------------------------
# loading and validation


def _fail(source: str | None, message: str) -> ConfigError:
    return ConfigError(f"{source}: {message}" if source else message)


def _check_name(value: Any, key: str, source: str | None) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise _fail(
            source,
            f"{key} must be a name of letters, digits, '.', '_', '+' or '-' "
            f"(it names a directory), got {value!r}",
        )
    return value


def _devices(value: Any, key: str, source: str | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _fail(
            source,
            f"{key} must be an integer >= 1 (processes per run, as `normlab train --devices`), "
            f"got {value!r}",
        )
    return value


def _overrides(value: Any, key: str, source: str | None) -> tuple[dict[str, Any], str, int | None]:
    """Parse a group/variant entry: a mapping of overrides, null, or the long form; the
    ``devices`` key is taken out of the overrides."""
    if value is None:
        return {}, "", None
    if not isinstance(value, Mapping):
        raise _fail(
            source,
            f"{key} must be a mapping of config overrides (e.g. {{model.placement: post}}) or "
            f"{{description: ..., set: {{...}}}}, got {value!r}",
        )
    description = ""
    if "set" in value:
        unknown = sorted(set(value) - set(_LONG_FORM_KEYS))
        if unknown:
            raise _fail(
                source,
                f"unknown key '{key}.{unknown[0]}'; with 'set', an entry takes only "
                f"{', '.join(_LONG_FORM_KEYS)}",
            )
        description = value.get("description") or ""
        if not isinstance(description, str):
            raise _fail(source, f"{key}.description must be a string, got {description!r}")
        body = value["set"]
        if body is None:
            body = {}
        if not isinstance(body, Mapping):
            raise _fail(source, f"{key}.set must be a mapping of config overrides, got {body!r}")
        value = body
    flat = flatten(value)
    devices = None
    if DEVICES_KEY in flat:
        devices = _devices(flat.pop(DEVICES_KEY), f"{key}.{DEVICES_KEY}", source)
    for owned in _STUDY_OWNED:
        if owned in flat:
            raise _fail(
                source,
                f"{key} sets '{owned}', which the study owns (give seeds with the top-level "
                "'seeds' key or --seeds)",
            )
    return flat, description, devices


MAX_SEEDS = 10_000
"""Most seeds a study may run (a larger count is a typo, not a study)."""


def _seeds(value: Any, source: str | None) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= MAX_SEEDS:
            raise _fail(
                source,
                f"seeds must be a count >= 1 (at most {MAX_SEEDS}) or a list of seeds, got {value!r}",
            )
        return tuple(range(value))
    if isinstance(value, list | tuple) and value:
        seeds = []
        for i, s in enumerate(value):
            if not isinstance(s, int) or isinstance(s, bool) or s < 0:
                raise _fail(source, f"seeds[{i}] must be an integer >= 0, got {s!r}")
            seeds.append(s)
        if len(set(seeds)) != len(seeds):
            raise _fail(source, f"seeds must be distinct, got {list(value)!r}")
        return tuple(seeds)
    raise _fail(source, f"seeds must be a count >= 1 or a list of seeds, got {value!r}")


def _entries(
    value: Any, key: str, source: str | None, required: bool
) -> list[tuple[str, dict[str, Any], str, int | None]]:
    if value is None and not required:
        return []
    if not isinstance(value, Mapping) or not value:
        raise _fail(
            source,
            f"{key} must be a non-empty mapping of name -> overrides"
            + (" (a study needs at least one variant)" if required else "")
            + f", got {value!r}",
        )
    out = []
    for name, body in value.items():
        _check_name(name, f"{key} name", source)
        flat, description, devices = _overrides(body, f"{key}.{name}", source)
        out.append((str(name), flat, description, devices))
    return out


EXTENDS_KEY = "extends"
_DROPPABLE = ("groups", "variants")  # where a null entry removes the parent's entry


def _merge(parent: Any, child: Any, path: tuple[str, ...] = ()) -> Any:
    """``child`` merged into ``parent`` (the ``extends`` rule in the module doc)."""
    if not (isinstance(parent, Mapping) and isinstance(child, Mapping)):
        return child
    out = dict(parent)
    for key, value in child.items():
        if value is None and len(path) == 1 and path[0] in _DROPPABLE:
            out.pop(key, None)
        elif key in out:
            out[key] = _merge(out[key], value, (*path, str(key)))
        else:
            out[key] = value
    return out


def resolve_extends(
    data: Mapping[str, Any], *, source: str | None = None, root: Path | None = None
) -> dict[str, Any]:
    """``data`` with its ``extends`` chain merged in (a copy without the key).

    A relative path is taken from ``root`` (the extending file's folder; default the working
    directory); a value that names no file is looked up among the built-in studies. Raises
    ConfigError naming ``source`` for a missing parent, a parent that is not a mapping, or a
    cycle.
    """
    start = source or "<study>"
    chain: list[str] = [str(Path(start).resolve()) if Path(start).is_file() else start]
    doc: dict[str, Any] = dict(data)
    layers: list[dict[str, Any]] = []
    here = root or Path.cwd()
    while EXTENDS_KEY in doc:
        ref = doc.pop(EXTENDS_KEY)
        layers.append(doc)
        if not isinstance(ref, str) or not ref:
            raise _fail(
                chain[-1], f"{EXTENDS_KEY} must be a study file or built-in name, got {ref!r}"
            )
        candidate = Path(ref) if Path(ref).is_absolute() else here / ref
        if candidate.is_file():
            where = str(candidate.resolve())
            if where in chain:
                raise _fail(source, f"{EXTENDS_KEY} cycle: {' -> '.join([*chain, where])}")
            try:
                parent = read_yaml(candidate, what="study file")
            except ConfigError as exc:
                raise _fail(chain[-1], f"{EXTENDS_KEY}: {exc}") from None
            here = candidate.parent
        elif "/" in ref or ref.endswith((".yaml", ".yml")):
            raise _fail(chain[-1], f"{EXTENDS_KEY}: no study file {candidate}")
        else:
            where = f"built-in study '{ref}'"
            if where in chain:
                raise _fail(source, f"{EXTENDS_KEY} cycle: {' -> '.join([*chain, where])}")
            parent = loads(builtin_text(ref))
        if not isinstance(parent, Mapping):
            raise _fail(chain[-1], f"{EXTENDS_KEY}: {where} is not a mapping of study keys")
        chain.append(where)
        doc = {k: v for k, v in parent.items() if k != "meta"}
    for layer in reversed(layers):
        doc = _merge(doc, layer)
    return doc


def spec_from_dict(
    data: Mapping[str, Any], *, source: str | None = None, root: Path | None = None
) -> StudySpec:
    """Build and validate a :class:`StudySpec` from a YAML-shaped mapping.

    An ``extends`` key is resolved first (:func:`resolve_extends`; relative paths from
    ``root``). Raises :class:`ConfigError` starting with ``source`` (the file) and naming the
    bad key. Every group x variant configuration is built once here, so a spec that loads plans.
    """
    if not isinstance(data, Mapping):
        raise _fail(source, f"a study must be a mapping of study keys, got {type(data).__name__}")
    if EXTENDS_KEY in data:
        data = resolve_extends(data, source=source, root=root)
    # (meta: provenance in a saved study.yaml.) The study's own text keys keep text that looks
    # like a number (a study named 1e3): normlab.yamlio.as_text
    data = {k: as_text(v) for k, v in data.items() if k != "meta"}
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise _fail(
            source,
            f"unknown key '{unknown[0]}' at the top level of the study; known keys: "
            + ", ".join(_TOP_KEYS),
        )
    for required in ("name", "variants"):
        if required not in data:
            raise _fail(source, f"missing key '{required}': a study needs a name and variants")
    name = _check_name(data["name"], "name", source)
    for key in ("description", "notes"):
        if not isinstance(data.get(key, ""), str | type(None)):
            raise _fail(source, f"{key} must be a string, got {data[key]!r}")
    base = data.get("base") or {}
    if not isinstance(base, Mapping):
        raise _fail(source, f"base must be a mapping of training config sections, got {base!r}")
    base = dict(base)
    base.pop("meta", None)
    if "seed" in base:
        raise _fail(
            source, "base sets 'seed', which the study owns (use the top-level 'seeds' key)"
        )
    devices = _devices(data.get(DEVICES_KEY, 1), DEVICES_KEY, source)
    if DEVICES_KEY in base:
        in_base = _devices(base.pop(DEVICES_KEY), f"base.{DEVICES_KEY}", source)
        if DEVICES_KEY in data and in_base != devices:
            raise _fail(
                source,
                f"base.{DEVICES_KEY} ({in_base}) and the top-level {DEVICES_KEY} ({devices}) "
                "disagree; give one",
            )
        devices = in_base
    try:
        config_from_dict(base)
    except ConfigError as exc:
        raise _fail(source, f"base: {exc}") from None

    variants = tuple(Variant(*e) for e in _entries(data["variants"], "variants", source, True))
    groups = tuple(Group(*e) for e in _entries(data.get("groups"), "groups", source, False))
    baseline = data.get("baseline", variants[0].name)
    if baseline not in [v.name for v in variants]:
        raise _fail(
            source,
            f"baseline must name one of the variants ({', '.join(v.name for v in variants)}), "
            f"got {baseline!r}",
        )
    seeds = _seeds(data.get("seeds", 3), source)
    comparisons = _comparisons(
        data.get("comparisons"), [v.name for v in variants], str(baseline), source
    )
    probes = data.get("optional_probes") or ()
    if isinstance(probes, list | tuple):
        probes = [as_text(p) for p in probes]
    if not isinstance(probes, list | tuple) or not all(isinstance(p, str) for p in probes):
        raise _fail(source, f"optional_probes must be a list of probe names, got {probes!r}")
    log = data.get("log") or ()
    if isinstance(log, str):
        log = [log]
    if not isinstance(log, list | tuple):
        raise _fail(source, f"log must be a list of logger names, got {log!r}")
    try:
        log = [str(s) for s in parse_loggers(list(log))]
    except ConfigError as exc:
        raise _fail(source, str(exc)) from None
    ref = data.get("lr_reference_batch_size")
    if ref is not None and (not isinstance(ref, int) or isinstance(ref, bool) or ref < 1):
        raise _fail(source, f"lr_reference_batch_size must be an integer >= 1 or null, got {ref!r}")
    flips = data.get("flip_defaults")
    if flips is not None and not (
        isinstance(flips, Mapping)
        and all(isinstance(k, str) and isinstance(v, bool) for k, v in flips.items())
    ):
        raise _fail(
            source,
            f"flip_defaults must map data source names to true or false, got {flips!r}",
        )
    budgets = _budgets(data.get("budgets"), source)
    spec = StudySpec(
        name=name,
        description=(data.get("description") or "").strip(),
        base=base,
        variants=variants,
        groups=groups,
        baseline=str(baseline),
        seeds=seeds,
        optional_probes=tuple(probes),
        log=tuple(log),
        lr_reference_batch_size=ref,
        notes=(data.get("notes") or "").strip(),
        source=source,
        devices=devices,
        comparisons=comparisons,
        flip_defaults=None if flips is None else dict(flips),
        budgets=budgets,
    )
    validate(spec)
    return spec


_BUDGET_KEYS = ("epochs", "train")
_RUNG_KEYS = (*_BUDGET_KEYS, "eval_every", "groups")


def _budgets(value: Any, source: str | None) -> tuple[Budget, ...]:
    """The ``budgets`` key: rung name -> {epochs: x, train: y} (positive numbers; an empty
    mapping or null is the arm's own budget), no two rungs alike."""
    if value is None:
        return ()
    if not isinstance(value, Mapping) or not value:
        raise _fail(
            source,
            "budgets must be a mapping of rung name -> {epochs: MULTIPLIER, train: MULTIPLIER}, "
            f"e.g. {{x1: {{}}, x4: {{epochs: 4}}}}, got {value!r}",
        )
    out: list[Budget] = []
    for name, body in value.items():
        _check_name(name, "budgets name", source)
        body = {} if body is None else body
        if not isinstance(body, Mapping):
            raise _fail(source, f"budgets.{name} must be a mapping of multipliers, got {body!r}")
        unknown = sorted(set(body) - set(_RUNG_KEYS))
        if unknown:
            raise _fail(
                source,
                f"unknown key 'budgets.{name}.{unknown[0]}'; known keys: {', '.join(_RUNG_KEYS)}",
            )
        factors = {}
        for key in _BUDGET_KEYS:
            x = body.get(key, 1)
            if isinstance(x, bool) or not isinstance(x, int | float) or not 0 < x < 1e6:
                raise _fail(source, f"budgets.{name}.{key} must be a number > 0, got {x!r}")
            factors[key] = float(x)
        every = body.get("eval_every")
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise _fail(
                source, f"budgets.{name}.eval_every must be a whole number >= 1, got {every!r}"
            )
        rung = Budget(
            str(name), **factors, eval_every=every, groups=_rung_groups(body, name, source)
        )
        same = [b.name for b in out if (b.epochs, b.train) == (rung.epochs, rung.train)]
        if same:
            raise _fail(source, f"budgets.{name} is the same budget as budgets.{same[0]}")
        out.append(rung)
    return tuple(out)


def _rung_groups(body: Mapping[str, Any], rung: str, source: str | None) -> tuple[str, ...] | None:
    """A rung's ``groups`` key: a non-empty list of distinct names (checked against the
    declared groups by :func:`validate`), or None."""
    value = body.get("groups")
    if value is None:
        return None
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(g, str) for g in value)
        or len(set(value)) != len(value)
    ):
        raise _fail(
            source,
            f"budgets.{rung}.groups must be a list of distinct group names, got {value!r}",
        )
    return tuple(value)


def _comparisons(
    value: Any, names: list[str], baseline: str, source: str | None
) -> tuple[tuple[str, str], ...]:
    """The ``comparisons`` key: a list of ``[variant, reference]`` pairs of distinct variant
    names, neither pair repeated nor already a comparison with the baseline."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise _fail(
            source, f"comparisons must be a list of [variant, reference] pairs, got {value!r}"
        )
    out: list[tuple[str, str]] = []
    for i, pair in enumerate(value):
        where = f"comparisons[{i}]"
        if isinstance(pair, list | tuple):
            pair = [as_text(x) for x in pair]  # variant names are text, as the keys they name
        if (
            not isinstance(pair, list | tuple)
            or len(pair) != 2
            or not all(isinstance(x, str) for x in pair)
        ):
            raise _fail(source, f"{where} must be a [variant, reference] pair, got {pair!r}")
        variant, reference = pair
        for name in (variant, reference):
            if name not in names:
                raise _fail(
                    source, f"{where}: unknown variant {name!r}; variants: {', '.join(names)}"
                )
        if variant == reference:
            raise _fail(source, f"{where} compares {variant!r} with itself")
        if reference == baseline:
            raise _fail(
                source,
                f"{where}: every variant is compared with the baseline {baseline!r} already",
            )
        if (variant, reference) in out:
            raise _fail(source, f"{where}: [{variant}, {reference}] is listed twice")
        out.append((variant, reference))
    return tuple(out)


def validate(spec: StudySpec) -> None:
    """Build every group x variant (x budget rung) configuration; ConfigError naming the entry
    and key."""
    many = [e.name for e in (*spec.groups, *spec.variants) if (e.devices or 1) > 1]
    if spec.log and (spec.devices > 1 or many):
        raise _fail(
            spec.source,
            "log: the loggers run in the study's own worker processes, and a run with "
            f"devices > 1 ({', '.join(many) or 'every run'}) trains in a torchrun subprocess "
            "that does not carry them yet; drop log or run with devices: 1",
        )
    declared = [g.name for g in spec.groups]
    for rung in spec.budgets:
        unknown = [g for g in rung.groups or () if g not in declared]
        if unknown:
            raise _fail(
                spec.source,
                f"budgets.{rung.name}.groups: no group '{unknown[0]}'; groups: "
                + (", ".join(declared) or "(none: the study has no groups)"),
            )
    for group in spec.group_names:
        g = spec.group(group)
        if g is not None:
            try:
                config_from_dict(apply_overrides(spec.base, g.overrides))
            except ConfigError as exc:
                raise _fail(spec.source, f"groups.{g.name}: {exc}") from None
        for variant in spec.variants:
            where = f"variants.{variant.name}" + (f" in group '{group}'" if group else "")
            try:
                config = spec.arm_config(group, variant.name)
            except ConfigError as exc:
                raise _fail(spec.source, f"{where}: {exc}") from None
            devices = spec.arm_devices(group, variant.name)
            if config.batch_size % devices:
                raise _fail(
                    spec.source,
                    f"{where}: batch_size {config.batch_size} is the global batch and must be "
                    f"divisible by {DEVICES_KEY} ({devices})",
                )
            if config.sync_bn and devices < 2:
                raise _fail(
                    spec.source,
                    f"{where}: sync_bn: true needs {DEVICES_KEY} >= 2 (processes to synchronise), "
                    f"got {DEVICES_KEY} {devices}",
                )


def spec_to_dict(spec: StudySpec) -> dict[str, Any]:
    """A YAML-safe mapping that :func:`spec_from_dict` turns back into an equal spec."""

    def entry(e: Entry) -> dict[str, Any]:
        body = {k: _plain(v) for k, v in e.overrides.items()}
        if e.devices is not None:
            body[DEVICES_KEY] = e.devices
        return {"description": e.description, "set": body} if e.description else body

    out: dict[str, Any] = {"name": spec.name}
    if spec.description:
        out["description"] = spec.description
    out["baseline"] = spec.baseline
    out["seeds"] = list(spec.seeds)
    out["base"] = _plain(spec.base)
    if spec.groups:
        out["groups"] = {g.name: entry(g) for g in spec.groups}
    out["variants"] = {v.name: entry(v) for v in spec.variants}
    if spec.comparisons:
        out["comparisons"] = [list(pair) for pair in spec.comparisons]
    if spec.optional_probes:
        out["optional_probes"] = list(spec.optional_probes)
    if spec.log:
        out["log"] = list(spec.log)
    if spec.lr_reference_batch_size:
        out["lr_reference_batch_size"] = spec.lr_reference_batch_size
    if spec.devices != 1:
        out[DEVICES_KEY] = spec.devices
    if spec.notes:
        out["notes"] = spec.notes
    if spec.flip_defaults is not None:
        out["flip_defaults"] = dict(spec.flip_defaults)
    if spec.budgets:
        out["budgets"] = {b.name: _rung_dict(b) for b in spec.budgets}
    return out


def _rung_dict(rung: Budget) -> dict[str, Any]:
    out: dict[str, Any] = {"epochs": rung.epochs, "train": rung.train}
    if rung.eval_every is not None:
        out["eval_every"] = rung.eval_every
    if rung.groups is not None:
        out["groups"] = list(rung.groups)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def with_overrides(
    spec: StudySpec,
    *,
    seeds: int | Sequence[int] | None = None,
    epochs: int | None = None,
    data: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> StudySpec:
    """The spec with command-line settings applied to its base (see the module docstring).

    ``seeds``: a count (seeds 0..N-1) or a list. ``data``: ``NAME[:PATH]`` as ``--data``; it
    replaces the base's data source, keeping only the source-independent data settings
    (val_split, augment, crop_padding, flip, limits, cache_dir): ``image_size`` and
    ``synthetic_*`` belong to the old source. ``overrides`` (``--set``) are applied last.
    The result is validated; errors name the command-line key.
    """
    base: dict[str, Any] = apply_overrides(spec.base, {})  # a deep copy
    if data is not None:
        name, path = split_data_spec(data)
        old = base.get("data") or {}
        kept = {k: v for k, v in old.items() if k in _PORTABLE_DATA_KEYS}
        base["data"] = {**kept, "name": name, "path": path or None}
    changes: dict[str, Any] = {}
    if epochs is not None:
        changes["epochs"] = epochs
    changes.update(overrides or {})
    if "seed" in changes:
        raise ConfigError("--set seed=...: a study's seeds are set with --seeds N")
    devices = None
    if DEVICES_KEY in changes:
        devices = _devices(changes.pop(DEVICES_KEY), f"--set {DEVICES_KEY}", None)
    base = apply_overrides(base, changes)
    try:
        config_from_dict(base)
    except ConfigError as exc:
        raise ConfigError(f"command-line settings for study '{spec.name}': {exc}") from None
    new = replace(spec, base=base)
    if devices is not None:
        new = replace(new, devices=devices)
    if seeds is not None:
        new = replace(new, seeds=_seeds(list(seeds) if not isinstance(seeds, int) else seeds, None))
    try:
        validate(new)
    except ConfigError as exc:
        raise ConfigError(f"with the command-line settings, {exc}") from None
    return new


def shadowed_keys(spec: StudySpec, keys: Sequence[str]) -> list[str]:
    """Of the dotted base ``keys`` a command line set, those some group or variant overrides
    (as ``"key (variant post)"``), so that the CLI can say the setting does not reach them."""
    out = []
    for key in keys:
        entries: list[tuple[Entry, str]] = [
            *((g, "group") for g in spec.groups),
            *((v, "variant") for v in spec.variants),
        ]
        for entry, kind in entries:
            devices = key == DEVICES_KEY and entry.devices is not None
            if devices or any(k == key or k.startswith(key + ".") for k in entry.overrides):
                out.append(f"{key} ({kind} {entry.name})")
    return out


# --------------------------------------------------------------------------------------------
# files and built-ins


def _builtin_dir() -> Any:
    return resources.files("normlab.study").joinpath("builtin")


def builtin_names() -> list[str]:
    """Names of the built-in studies (``normlab studies``)."""
    return sorted(
        p.name.removesuffix(".yaml") for p in _builtin_dir().iterdir() if p.name.endswith(".yaml")
    )


def builtin_text(name: str) -> str:
    """The YAML text of a built-in study; ConfigError listing the names when unknown."""
    if name not in builtin_names():  # not a path test: any string may come from the CLI
        raise ConfigError(
            f"unknown study '{name}'; built-in studies: {', '.join(builtin_names())} "
            "(or give a study YAML file or a study directory)"
        )
    text: str = _builtin_dir().joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return text


def load_spec_file(path: str | Path) -> StudySpec:
    """Load and validate a study YAML file (a study directory's ``study.yaml`` works too)."""
    p = Path(path)
    data = read_yaml_mapping(p, what="study file", expected="a mapping of study keys")
    return spec_from_dict(data, source=str(p), root=p.parent)


def load_spec(name_or_path: str | Path) -> StudySpec:
    """A study by built-in name, YAML file, or study directory (its ``study.yaml``)."""
    p = Path(name_or_path)
    if p.is_dir():
        if not (p / STUDY_FILE).is_file():
            raise ConfigError(f"{p} is a directory without a {STUDY_FILE}: not a study directory")
        return load_spec_file(p / STUDY_FILE)
    if p.is_file() or p.suffix in (".yaml", ".yml") or "/" in str(name_or_path):
        return load_spec_file(p)
    name = str(name_or_path)
    data = loads(builtin_text(name))
    return spec_from_dict(data, source=f"built-in study '{name}'")
