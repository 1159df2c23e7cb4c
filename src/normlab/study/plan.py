"""Expand a study into runs: ``plan_study(spec, out) -> StudyPlan`` of :class:`RunSpec`.

Every group x variant x seed becomes one run with its own run directory (the same layout
``normlab train`` writes) under ``<out>/runs/[<group>/]<variant>/seed-<seed>``, and the number
of processes it trains in (``RunSpec.devices``, from the study's ``devices`` keys).

Arithmetic is resolved once per study, not per run: ``runtime.device``, ``precision`` and
``memory_format`` left at ``auto`` are decided here for the study as a whole and written into
every run's config, so all variants compute the same way. Precision: each distinct network of
the study is asked what :func:`~normlab.engine.runtime.resolve_runtime` would choose on this
machine, and if any would train in fp32 the whole study does (the most precise choice wins; a
study never compares bf16 runs with fp32 runs by accident). Memory format: ``channels_last``
when any network has convolutions (it changes speed, not values: an MLP flattens the same
numbers either way). A group or variant that *explicitly* sets a runtime field keeps it —
then the arithmetic is what is being compared.

Names are checked before any run starts: every arm's config goes through
:func:`~normlab.train.names.resolve_names` (model, model options, norm, probes, data source),
so a misspelt name fails the study at once, naming the arm.

Flips too: a run that does not set ``data.flip`` gets its data source's default
(``Source.flip``), and the plan records that decision per source in the spec's
``flip_defaults``, so the study keeps it when it is resumed or grows seeds (see
:func:`saved_flips` for studies saved before the record existed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab.config import RuntimeConfig, TrainConfig, apply_overrides, config_from_dict
from normlab.data import SOURCES
from normlab.engine.runtime import resolve_runtime
from normlab.errors import ConfigError, NormlabError
from normlab.models import build_model, is_external
from normlab.probes import build_probes
from normlab.study.layout import run_dir_for
from normlab.study.spec import StudySpec, arm_flip_source, spec_from_dict, spec_to_dict
from normlab.train.names import resolve_names


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: which arm (group, variant), which seed, its config and directory."""

    group: str | None
    variant: str
    seed: int
    config: TrainConfig
    run_dir: Path
    devices: int = 1  # processes the run trains in (``normlab train --devices``)

    @property
    def arm(self) -> str:
        """``group/variant``, or just ``variant`` in a study without groups."""
        return f"{self.group}/{self.variant}" if self.group else self.variant

    @property
    def key(self) -> str:
        """A unique, stable name of the run within its study: ``<arm>/seed-<seed>``."""
        return f"{self.arm}/seed-{self.seed}"


@dataclass(frozen=True)
class StudyPlan:
    """A study expanded into runs (in group, variant, seed order)."""

    spec: StudySpec
    out: Path
    runs: tuple[RunSpec, ...]
    runtime: Mapping[str, str] = field(default_factory=dict)  # the study-wide resolved fields
    # optional probes left out: those a saved study was started without (kept out on resume)
    probes_dropped: tuple[str, ...] = ()

    def run(self, key: str) -> RunSpec:
        for r in self.runs:
            if r.key == key:
                return r
        raise KeyError(key)

    @property
    def arms(self) -> list[tuple[str | None, str]]:
        """(group, variant) pairs in plan order."""
        return [(g, v) for g in self.spec.group_names for v in self.spec.variant_names]


# --------------------------------------------------------------------------------------------
# runtime and probes, decided once per study


def _placeholder_model(config: TrainConfig) -> Any:
    """The config's network at a nominal size: enough to see its layer types, no data needed.
    A third-party model gets the data's size when the config gives it: it is built with a
    forward pass at that size, which must not refuse a size the runs will not use."""
    d, size = config.data, 32
    if is_external(config.model.name):
        size = d.image_size or (d.synthetic_image_size if d.name == "synthetic" else 32)
    return build_model(
        config.model.name,
        10,
        norm=config.norm,
        placement=config.model.placement,
        in_channels=3,
        input_size=size,
        small_input=config.model.small_input,
        conv_bias=config.model.conv_bias,
        **dict(config.model.options),
    )


def resolve_study_runtime(spec: StudySpec) -> dict[str, str]:
    """The ``runtime`` fields that are ``auto`` in the base, resolved once for the study
    (see the module docstring). Returns only fields that were ``auto``."""
    base_rt = config_from_dict(spec.base).runtime
    auto = [
        name
        for name in ("device", "precision", "memory_format")
        if getattr(base_rt, name) == "auto"
    ]
    if not auto:
        return {}
    seen: dict[str, Any] = {}
    for group in spec.group_names:
        for variant in spec.variant_names:
            config = spec.arm_config(group, variant)
            key = repr((config.model, config.norm))
            if key in seen:
                continue
            where = f"variant '{variant}'" + (f" in group '{group}'" if group else "")
            try:
                model = _placeholder_model(config)
            except NormlabError as exc:
                raise ConfigError(f"study '{spec.name}', {where}: {exc}") from None
            seen[key] = resolve_runtime(
                RuntimeConfig(device=base_rt.device, precision="auto", memory_format="auto"),
                model,
            )
    resolved = list(seen.values())
    out: dict[str, str] = {}
    if "device" in auto:
        out["device"] = str(resolved[0].device)
    if "precision" in auto:
        out["precision"] = "fp32" if any(r.precision == "fp32" for r in resolved) else "bf16"
    if "memory_format" in auto:
        out["memory_format"] = (
            "channels_last"
            if any(r.memory_format == "channels_last" for r in resolved)
            else "contiguous"
        )
    return out


def available_probes(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(names, [])`` once every name is checked: the probes are part of normlab, so an
    optional probe is never missing, and a misspelt one (or a bad option) is a ConfigError
    listing the known probes, not a probe silently left out. The second list, always empty,
    keeps the shape of :attr:`StudyPlan.probes_dropped` for study directories made when
    probes could be absent."""
    for name in names:
        try:
            build_probes([name])
        except ConfigError as exc:
            raise ConfigError(f"optional_probes: {exc}") from None
    return list(names), []


Flips = Mapping[str, bool] | bool | None
"""Flip decisions handed to :func:`freeze`: by source name, one bool for every source, or
None (the spec's own ``flip_defaults``, else each source's default)."""

LEGACY_FLIP = True
"""``data.flip`` of the runs of a study saved before studies recorded ``flip_defaults``: every
source was flipped then."""


def saved_flips(saved: StudySpec) -> Mapping[str, bool] | bool:
    """The flip decisions of a saved study (its ``study.yaml``): its ``flip_defaults``, or
    :data:`LEGACY_FLIP` for every source when it records none."""
    return LEGACY_FLIP if saved.flip_defaults is None else dict(saved.flip_defaults)


def decide_flips(spec: StudySpec, flips: Flips = None) -> dict[str, bool]:
    """``data.flip`` per data source, for the arms of ``spec`` that leave it to their source:
    from ``flips`` (see :data:`Flips`), else the spec's ``flip_defaults``, else the source's
    default."""
    out: dict[str, bool] = {}
    for group in spec.group_names:
        for variant in spec.variant_names:
            source = arm_flip_source(apply_overrides(spec.base, spec.arm_overrides(group, variant)))
            if source is None or source in out:
                continue
            if isinstance(flips, bool):
                out[source] = flips
            elif flips is not None and source in flips:
                out[source] = bool(flips[source])
            elif spec.flip_defaults is not None and source in spec.flip_defaults:
                out[source] = bool(spec.flip_defaults[source])
            else:
                out[source] = SOURCES.get(source).flip
    return out


# --------------------------------------------------------------------------------------------
# plan


def freeze(
    spec: StudySpec,
    *,
    runtime: Mapping[str, str] | None = None,
    probes: Sequence[str] | None = None,
    flips: Flips = None,
) -> tuple[StudySpec, dict[str, str], list[str]]:
    """Decide what a study leaves to the machine or to its data, once, and write it into the
    spec.

    Returns ``(frozen, runtime, dropped)``: ``frozen`` has the resolved runtime fields in its
    base (``runtime``, default :func:`resolve_study_runtime`), the optional probes this
    installation has (``probes``, default :func:`available_probes`) in ``base.probes``, and
    no optional probes left, and the flips its runs leave to their data source in
    ``flip_defaults`` (:func:`decide_flips` with ``flips``); ``dropped`` lists the optional
    probes left out. Freezing a frozen spec changes nothing, and a saved frozen spec plans to
    the same configs on any machine.
    """
    if runtime is None:
        runtime = resolve_study_runtime(spec)
    if probes is None:
        probes, dropped = available_probes(spec.optional_probes)
    else:
        probes = [p for p in spec.optional_probes if p in probes]
        dropped = [p for p in spec.optional_probes if p not in probes]
    flip_defaults = decide_flips(spec, flips)
    if not runtime and not spec.optional_probes and flip_defaults == spec.flip_defaults:
        return spec, {}, []
    data = spec_to_dict(spec)
    data["flip_defaults"] = flip_defaults
    changes: dict[str, Any] = {f"runtime.{k}": v for k, v in runtime.items()}
    if probes:
        have = list(config_from_dict(spec.base).probes)
        changes["probes"] = [*have, *(p for p in probes if p not in have)]
    data["base"] = apply_overrides(data["base"], changes)
    data.pop("optional_probes", None)
    return spec_from_dict(data, source=spec.source), dict(runtime), list(dropped)


def plan_study(
    spec: StudySpec,
    out: str | Path,
    *,
    runtime: Mapping[str, str] | None = None,
    probes: Sequence[str] | None = None,
    flips: Flips = None,
) -> StudyPlan:
    """Expand ``spec`` into one :class:`RunSpec` per group x variant x seed under ``out``.

    The spec is first frozen (:func:`freeze`, with ``runtime``, ``probes`` and ``flips``);
    the plan holds the frozen spec. Raises ConfigError naming the arm when a network of the
    study cannot be built.
    """
    out = Path(out)
    frozen, resolved, dropped = freeze(spec, runtime=runtime, probes=probes, flips=flips)
    for group in frozen.group_names:
        for variant in frozen.variant_names:
            where = f"study '{frozen.name}', variant '{variant}'" + (
                f" in group '{group}'" if group else ""
            )
            resolve_names(frozen.arm_config(group, variant), where=where)
    runs = [
        RunSpec(
            group,
            variant,
            seed,
            frozen.arm_config(group, variant, seed),
            run_dir_for(out, group, variant, seed),
            frozen.arm_devices(group, variant),
        )
        for group in frozen.group_names
        for variant in frozen.variant_names
        for seed in frozen.seeds
    ]
    return StudyPlan(
        spec=frozen,
        out=out,
        runs=tuple(runs),
        runtime=resolved,
        probes_dropped=tuple(dropped),
    )
