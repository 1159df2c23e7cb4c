"""Pieces the three command lines share: ``normlab.cli``, ``normlab.study.cli``, ``normlab.bn.cli``.

* ``--set KEY=VALUE`` and ``--data SOURCE[:PATH]``: one definition each (:func:`add_set_argument`,
  :func:`add_data_argument`) and one reading each (:func:`parse_sets`, and
  :func:`normlab.data.split_data_spec` for ``--data``).
* Numbers with a range (:func:`int_in`, :func:`number_in`): argparse types that refuse 0,
  negatives, NaN and sizes no tensor can have, with a message naming the flag, before any
  command starts work.

This module sits below the command lines: it imports neither :mod:`normlab.cli` nor the plugin
CLIs (they import it).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

from normlab.config import parse_override

__all__ = [
    "DATA_SOURCES_HELP",
    "MAX_SIZE",
    "add_data_argument",
    "add_set_argument",
    "int_in",
    "number_in",
    "parse_sets",
]

DATA_SOURCES_HELP = "digits | synthetic | cifar10[:PATH] | imagefolder:PATH"

MAX_SIZE = 2**31 - 1
"""Upper bound of counts that size a tensor or a loop (batch sizes, classes, repeats): larger
values overflow torch's index types (or no machine holds the tensor)."""


# ---- --set and --data --------------------------------------------------------------------------


def add_set_argument(p: argparse.ArgumentParser, help_: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``; read it with :func:`parse_sets`."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_
    )


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """The dotted-key overrides of ``--set`` items, in order (a later item wins); values are
    read as YAML scalars (:func:`normlab.config.parse_override`)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, value = parse_override(item)
        overrides[key] = value
    return overrides


def add_data_argument(p: argparse.ArgumentParser, help_: str | None = None) -> None:
    """``--data SOURCE[:PATH]`` into ``args.data``; read it with
    :func:`normlab.data.split_data_spec` (or :func:`normlab.data.parse_data_spec`)."""
    p.add_argument("--data", metavar="SOURCE[:PATH]", help=help_ or DATA_SOURCES_HELP)


# ---- numbers ---------------------------------------------------------------------------------


def int_in(low: int, high: int = MAX_SIZE) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low and high == MAX_SIZE:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"expected an integer from {low} to {high}, got {text!r}"
            )
        return value

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


def number_in(low: float = 0.0) -> Callable[[str], float]:
    """An argparse ``type`` accepting finite numbers ``>= low`` (no NaN, no infinity)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"expected a finite number >= {low:g}, got {text!r}")
        return value

    parse.__name__ = f"number >= {low:g}"
    return parse
