"""Names checked at the edge: :func:`resolve_names`.

Configs store names (a model, its options, a norm, probes, a data source). This is the one
function that resolves them all, so a bad name fails before anything runs: :func:`fit` calls it
before it builds data or writes a file, and the study planner calls it for every arm before
the first run starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from normlab.config import TrainConfig
from normlab.data.sources import SOURCES, Source
from normlab.errors import ConfigError
from normlab.models import ModelEntry, check_model_options
from normlab.models.external import check_external_settings, is_external
from normlab.norms import NORMS
from normlab.probes import Probe, build_probes


@dataclass(frozen=True)
class Resolved:
    """What the names of a config stand for."""

    model: ModelEntry
    source: Source
    probes: tuple[Probe, ...]


def resolve_names(config: TrainConfig, *, where: str = "") -> Resolved:
    """Resolve and check every name in ``config``: the model and its option names, the norm,
    the probes (names and options) and the data source.

    Raises :class:`ConfigError` whose message lists the known names (prefixed by ``where``,
    e.g. a study arm, when given); for a third-party model (``torchvision:NAME``, ...) also
    when the package is missing or a model setting cannot apply to it. Option *values* of models are checked when the model is
    built; everything else named here is fully checked.
    """
    try:
        m = config.model
        model = check_model_options(m.name, m.options)
        if is_external(m.name):  # what a third-party architecture cannot honour, up front
            check_external_settings(m.name, m.placement, m.small_input, m.conv_bias)
        NORMS.get(config.norm.name)
        source = SOURCES.get(config.data.name)
        probes = tuple(build_probes(config.probes))
    except ConfigError as exc:
        if where:
            raise ConfigError(f"{where}: {exc}") from None
        raise
    return Resolved(model=model, source=source, probes=probes)
