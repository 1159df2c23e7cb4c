"""Exceptions that carry a message meant for the user.

Every error normlab raises on bad input derives from :class:`NormlabError`; the CLI prints its
message (no traceback) and exits with status 2. Messages name the field or file at fault and
what was expected.
"""

from __future__ import annotations


class NormlabError(Exception):
    """Base class: an error whose message is complete enough to show to a user as is."""


class ConfigError(NormlabError, ValueError):
    """A configuration value, option or name is invalid (names the field and the expectation)."""


class DataError(NormlabError):
    """A data source is missing, empty or corrupt (names the path or file)."""


class TrainingError(NormlabError):
    """Training cannot proceed with this combination of settings (says why and what to change)."""


def first_line(exc: BaseException) -> str:
    """``"TypeError: first line of the message"`` (``struct.error``, ``zlib.error``: with the
    module, so the text never reads like a second ``error:`` line)."""
    text = str(exc).strip()
    kind = type(exc).__name__
    if kind == "error":
        kind = f"{type(exc).__module__}.error"
    return f"{kind}: {text.splitlines()[0]}" if text else kind
