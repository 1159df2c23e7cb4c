"""Whether a saved run's config is the one a command asks for: one check for ``train
--resume`` and for resuming a study."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from normlab.config import TrainConfig, config_to_dict, flatten
from normlab.yamlio import as_text

# Settings that do not change what is computed: a run may resume under other values.
IGNORED = ("meta", "runtime.threads", "runtime.progress")


@functools.cache
def _defaults() -> dict[str, Any]:
    """TrainConfig's defaults, flattened (computed once; read, never modified)."""
    return flatten(config_to_dict(TrainConfig()))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, str) or isinstance(b, str):
        # a string field an old config.yaml wrote unquoted (path: 1e3) reads back as a
        # number spelled like that string (yamlio.Spelled): compare the text as written
        return bool(as_text(a) == as_text(b))
    return bool(a == b)


def config_differences(
    saved: Mapping[str, Any], given: Mapping[str, Any], *, giver: str = "given"
) -> list[str]:
    """``key: run has X, <giver> Y`` for every setting where ``given`` disagrees with the
    run's ``saved`` config (both as plain dicts, e.g. ``config_to_dict`` or a config.yaml).

    Agreement rules, the same for every caller:

    * thread count, progress display and ``meta`` (provenance) never disagree;
    * a ``runtime`` value given as ``auto`` (or null) agrees with whatever the run resolved;
    * a setting the saved config does not have at all, given at its default, agrees: the run
      was made before normlab had that setting, and a new setting's default keeps the old
      behaviour (so upgrading normlab does not orphan a run or a half-finished study).
    """
    a, b = flatten(saved), flatten(given)
    defaults = _defaults()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(IGNORED):
            continue
        va, vb = a.get(key), b.get(key)
        if key.startswith("runtime.") and vb in ("auto", None):
            continue
        if key not in a and key in defaults and _same(vb, defaults[key]):
            continue
        if not _same(va, vb):
            diffs.append(f"{key}: run has {as_text(va)!r}, {giver} {as_text(vb)!r}")
    return diffs
