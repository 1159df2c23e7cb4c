"""Pieces the three command lines share: ``normlab.cli``, ``normlab.cli.study``, ``normlab.cli.bn``.

* ``--set KEY=VALUE`` and ``--data SOURCE[:PATH]``: one definition each (:func:`add_set_argument`,
  :func:`add_data_argument`) and one reading each (:func:`parse_sets`, and
  :func:`normlab.data.split_data_spec` for ``--data``).
* Numbers with a range (:func:`int_in`, :func:`number_in`): argparse types that refuse 0,
  negatives, NaN and sizes no tensor can have, with a message naming the flag, before any
  command starts work.
* Output paths (:func:`output_dir`, :func:`output_file`): every command that writes checks its
  output once, before it starts, that the path can be written: a file where a directory is
  needed, a directory where a file is needed, a parent that is a file, or a directory the
  process cannot write into is a :class:`~normlab.errors.ConfigError` naming the flag and the
  path. The checks create nothing (a probe file or directory is removed at once), so a
  command refused later still leaves no trace.

This module sits below the command lines: it imports neither :mod:`normlab.cli` nor the study
and BN commands (they import it).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from normlab.errors import ConfigError

__all__ = [
    "DATA_SOURCES_HELP",
    "MAX_SIZE",
    "add_data_argument",
    "add_set_argument",
    "int_in",
    "number_in",
    "output_dir",
    "output_file",
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
    from normlab.config import parse_override  # here: `normlab --help` needs no torch

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


# ---- output paths ----------------------------------------------------------------------------


def output_dir(path: str | Path, flag: str) -> Path:
    """``path`` as a directory this process can write into, existing or to be created.

    ConfigError naming ``flag`` when ``path`` is empty, is an existing non-directory, lies under
    a file, or cannot be created or written (read-only, permissions, ``/proc``). Creates
    nothing.
    """
    p = _given(path, flag)
    with _named(flag, path):
        if p.exists() and not p.is_dir():
            raise ConfigError(
                f"{flag} {path}: exists and is not a directory (expected a directory to write into)"
            )
        _check_writable(p, flag, str(path), probe_file=None)
    return p


def output_file(path: str | Path, flag: str) -> Path:
    """``path`` as a file this process can write (replacing it if it exists).

    ConfigError naming ``flag`` when ``path`` is empty, is a directory or another non-regular
    file (a device, a FIFO), lies under a file, or its directory cannot be created or written.
    Creates nothing.
    """
    p = _given(path, flag)
    with _named(flag, path):
        if p.is_dir():
            raise ConfigError(
                f"{flag} {path}: is a directory (expected the name of a file to write)"
            )
        if p.exists() and not p.is_file():
            raise ConfigError(f"{flag} {path}: exists and is not a regular file")
        _check_writable(p.parent, flag, str(path), probe_file=p.name)
    return p


def _given(path: str | Path, flag: str) -> Path:
    if not str(path).strip():
        raise ConfigError(f"{flag}: expected a path, got {str(path)!r}")
    return Path(path)


@contextlib.contextmanager
def _named(flag: str, path: str | Path) -> Iterator[None]:
    """An OSError from looking at ``path`` (a name too long, a loop of links) as a ConfigError
    naming ``flag``."""
    try:
        yield
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror or type(exc).__name__}") from None


def _check_writable(directory: Path, flag: str, given: str, *, probe_file: str | None) -> None:
    """Raise unless files can be made in ``directory`` (created first if missing): probe the
    real thing (a temporary file or the first missing directory, removed at once), since
    permission bits do not tell (root, read-only mounts, ``/proc``)."""
    existing, first_missing = directory, None
    while not existing.exists():
        first_missing, existing = existing, existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {given}: {existing} is a file, not a directory")
    try:
        if first_missing is not None:
            try:
                first_missing.mkdir()
            except FileExistsError:  # made meanwhile by another process: it is not ours
                return
            first_missing.rmdir()
        else:
            prefix = f".{probe_file}." if probe_file else ".normlab-write-check."
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=existing)
            os.close(fd)
            os.unlink(tmp)
    except OSError as exc:
        where = first_missing if first_missing is not None else existing
        what = "create directory" if first_missing is not None else "write into"
        raise ConfigError(
            f"{flag} {given}: cannot {what} {where} ({exc.strerror or type(exc).__name__})"
        ) from None
