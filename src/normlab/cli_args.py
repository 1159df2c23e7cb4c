"""Pieces the three command lines share: ``normlab.cli``, ``normlab.study.cli``, ``normlab.bn.cli``.

* ``--set KEY=VALUE`` and ``--data SOURCE[:PATH]``: one definition each (:func:`add_set_argument`,
  :func:`add_data_argument`) and one reading each (:func:`parse_sets`, and
  :func:`normlab.data.split_data_spec` for ``--data``).

This module sits below the command lines: it imports neither :mod:`normlab.cli` nor the plugin
CLIs (they import it).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from normlab.config import parse_override

__all__ = ["DATA_SOURCES_HELP", "add_data_argument", "add_set_argument", "parse_sets"]

DATA_SOURCES_HELP = "digits | synthetic | cifar10[:PATH] | imagefolder:PATH"


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
