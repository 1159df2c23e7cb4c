"""What this machine's CPU is, read once from ``/proc/cpuinfo``.

One reader for everything that asks (the bf16 decision of :mod:`normlab.engine.runtime`, the
CPU recorded with every run by :mod:`normlab.store.provenance`), so the two can never parse
the file differently. Where there is no ``/proc/cpuinfo`` (macOS, Windows, a sandbox that
hides it) every field is absent, and callers fall back on what they know.
"""

from __future__ import annotations

import functools
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The ``key : value`` fields of the first processor block of a ``/proc/cpuinfo`` text
    (every block repeats them; the first is the one reported), keys stripped of the padding
    the kernel aligns them with. Lines without a colon are skipped."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the end of the first processor's block
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


@functools.cache
def cpuinfo() -> dict[str, str]:
    """This machine's first-processor ``/proc/cpuinfo`` fields ({} where it cannot be read)."""
    try:
        return parse_cpuinfo(CPUINFO.read_text(encoding="utf-8"))
    except OSError:
        return {}


def cpu_model_name() -> str | None:
    """The CPU's ``model name`` (e.g. ``"AMD EPYC 7B13"``), or None where it is not known."""
    return cpuinfo().get("model name") or None


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set ``flags`` (e.g. ``avx2``, ``amx_bf16``); empty where unknown."""
    return frozenset(cpuinfo().get("flags", "").split())
