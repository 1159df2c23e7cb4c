r"""YAML as normlab reads and writes it: numbers as people write them, files named in errors.

PyYAML implements YAML 1.1, whose floats need a dot and a *signed* exponent, so ``1e-3``,
``5E-4``, ``2e-1``, ``1e3`` and ``2.0e9`` are strings there (and ``lr: 1e-3`` used to be
refused as "not a number"). :class:`Loader` reads the floats of the YAML 1.2 core schema,
``[-+]? ( \.[0-9]+ | [0-9]+ ( \.[0-9]* )? ) ( [eE] [-+]? [0-9]+ )?`` (plus ``.inf`` and
``.nan``), and keeps every float PyYAML's SafeLoader already read (``1_000.5`` too); ints,
booleans, null and timestamps resolve exactly as in SafeLoader. Everything normlab reads goes
through it: config files and ``--set`` values (:mod:`normlab.config`), study specs, their
``extends`` parents and the built-in studies, a run's ``config.yaml``, a study's
``study.yaml``, the BN toolbox's ``key=value`` options.

Strings stay strings where a string is expected. A scalar that YAML 1.1 read as a string and
the core schema reads as a float (``1e3``) is loaded as a :class:`Spelled` float, which is a
float in every arithmetic sense and also keeps the text as written; :func:`as_text` gives that
text back, so a field that takes a string (a data path, a model name) reads ``1e3`` exactly as
before. Mapping keys are always loaded as text. :class:`Dumper` writes a :class:`Spelled` as a
plain float and quotes strings that :class:`Loader` would read as numbers (``'1e3'``), so what
normlab writes reads back as it was.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from normlab.errors import ConfigError

__all__ = [
    "Dumper",
    "Loader",
    "Spelled",
    "as_text",
    "dumps",
    "loads",
    "parse_value",
    "plain_numbers",
    "read_yaml",
    "read_yaml_mapping",
]

_FLOAT = "tag:yaml.org,2002:float"
# The YAML 1.2 core-schema floats that need a resolver of their own: those with an exponent
# or a dot (a bare integer stays an int; PyYAML tries its int resolver first anyway).
_CORE_FLOAT = re.compile(
    r"^[-+]?(?:(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)$"
)
_FIRST_CHARS = list("-+0123456789.")
# PyYAML's own (YAML 1.1) float pattern: a float it matches was a float before normlab's loader
_YAML11_FLOAT = next(
    rx for tag, rx in yaml.SafeLoader.yaml_implicit_resolvers["1"] if tag == _FLOAT
)


class Spelled(float):
    """A float whose spelling YAML 1.1 read as a string (``1e3``, ``5E-4``): keeps ``text``.

    Compares, hashes and computes as the float; pickles, copies and dumps as a plain float."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, value: float, text: str) -> Spelled:
        self = super().__new__(cls, value)
        self.text = text
        return self

    def __reduce__(self) -> tuple[type[float], tuple[float]]:
        return float, (float(self),)


def as_text(value: Any) -> Any:
    """The text a :class:`Spelled` was written as; any other value unchanged."""
    return value.text if isinstance(value, Spelled) else value


def plain_numbers(value: Any) -> Any:
    """``value`` with every :class:`Spelled` inside mappings and lists made a plain float (for
    untyped settings such as model options, where a value spelled as a number is a number)."""
    if isinstance(value, Spelled):
        return float(value)
    if isinstance(value, Mapping):
        return {k: plain_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_numbers(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_numbers(v) for v in value)
    return value


class Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema floats (see the module docstring)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        mapping = super().construct_mapping(node, deep=deep)
        return {as_text(k): v for k, v in mapping.items()}


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    number = loader.construct_yaml_float(node)
    text = loader.construct_scalar(node)
    if isinstance(text, str) and not _YAML11_FLOAT.match(text):
        return Spelled(number, text)
    return number


Loader.add_implicit_resolver(_FLOAT, _CORE_FLOAT, _FIRST_CHARS)
Loader.add_constructor(_FLOAT, _construct_float)


class Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings :class:`Loader` reads as numbers and writes
    :class:`Spelled` as a plain float."""


Dumper.add_implicit_resolver(_FLOAT, _CORE_FLOAT, _FIRST_CHARS)
Dumper.add_representer(Spelled, yaml.SafeDumper.represent_float)


def loads(text: str) -> Any:
    """YAML ``text`` read with :class:`Loader` (``yaml.YAMLError`` when it is not YAML)."""
    return yaml.load(text, Loader=Loader)  # a SafeLoader: builds plain data only


def parse_value(text: str) -> Any:
    """A value given on a command line (``--set key=VALUE``, ``normlab:NAME,key=VALUE``): read
    as YAML (``0.1``, ``1e-3``, ``true``, ``[1, 2]``), or the text itself when it is not YAML."""
    try:
        return loads(text)
    except yaml.YAMLError:
        return text


def dumps(data: Any) -> str:
    """``data`` as YAML text, keys in their given order (:class:`Dumper`)."""
    text: str = yaml.dump(data, Dumper=Dumper, sort_keys=False)
    return text


def read_yaml(path: str | Path, *, what: str = "YAML file") -> Any:
    """The YAML document in the file ``path`` (None when empty).

    Raises ConfigError: ``<what> <path> does not exist``, ``<path>: not UTF-8 text``,
    ``<path>: not valid YAML: <the parser's message>``.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text, so not a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    try:
        return loads(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None


def read_yaml_mapping(
    path: str | Path, *, what: str = "YAML file", expected: str = "a mapping"
) -> dict[str, Any]:
    """The YAML mapping in the file ``path``; an empty file is ``{}``.

    Errors as :func:`read_yaml`, and ``<path>: expected <expected>, got <type>`` when the
    document is not a mapping (``what="config file"``, ``expected="a mapping of config
    sections at the top"`` gives the config loader's messages).
    """
    data = read_yaml(path, what=what)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected {expected}, got {type(data).__name__}")
    return dict(data)
