"""The probe catalogue: every probe by name, and building probes from their specs."""

from __future__ import annotations

from collections.abc import Sequence

from normlab.errors import ConfigError
from normlab.probes.acts import ActsProbe
from normlab.probes.base import Probe, parse_probe_spec
from normlab.probes.bn import BNProbe
from normlab.probes.gap import GapProbe
from normlab.probes.shift import ShiftProbe
from normlab.probes.weights import WeightsProbe
from normlab.registry import Registry

__all__ = ["PROBES", "build_probes", "validate_probes"]

PROBES: Registry[type[Probe]] = Registry("probe")
for _cls in (WeightsProbe, BNProbe, ShiftProbe, ActsProbe, GapProbe):
    PROBES.register(_cls.name, _cls)


def build_probes(names: Sequence[str]) -> list[Probe]:
    """One probe per spec in ``names`` (``"shift"``, ``"shift:batches=8"``), in that order.

    Raises :class:`ConfigError` for an unknown name (listing the known probes), a probe given
    twice, or a bad option (naming the probe and the option).
    """
    if isinstance(names, str):
        names = [names]
    probes: list[Probe] = []
    seen: set[str] = set()
    for spec in names:
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"probes: each probe must be a non-empty name, got {spec!r}")
        name, _ = parse_probe_spec(spec, {})
        if name not in PROBES:
            raise ConfigError(
                f"probes: unknown probe {name!r} (in {spec!r}); known probes: "
                + ", ".join(PROBES.names())
            )
        cls = PROBES.get(name)
        _, options = parse_probe_spec(spec, cls.OPTIONS)
        if name in seen:
            raise ConfigError(f"probes: probe {name!r} is given twice (its keys would collide)")
        seen.add(name)
        probes.append(cls(**options))
    return probes


def validate_probes(names: Sequence[str]) -> None:
    """Raise :class:`ConfigError` if :func:`build_probes` would (cheap: builds nothing heavy)."""
    build_probes(names)
