"""Read a sharded checkpoint: an index JSON naming the weight file of every tensor.

The Hugging Face hub ships large models as several weight files and an index,
``model.safetensors.index.json`` or ``pytorch_model.bin.index.json``::

    {"metadata": {"total_size": 123}, "weight_map": {"conv.weight": "model-00001-of-00002.safetensors", ...}}

:func:`read_sharded` returns the one state_dict the shards make up. Guarantees, each a
:class:`~normlab.errors.DataError` naming the index and the key or file otherwise: the index is a
JSON object with a non-empty ``weight_map`` of string keys to string file names; every shard lies
inside the index's folder (no absolute paths, no ``..``, no symlink out) and exists; every shard
holds tensors only (a state_dict); every key of the map is in the shard it names; no key is in
two shards; no shard holds a key the map does not list. Each shard is read by the caller's
``load`` (which scans it for unsafe content first).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from normlab.bn.scan import UnsafeItem
from normlab.errors import DataError

__all__ = ["MAX_INDEX_BYTES", "read_index", "read_sharded"]

MAX_INDEX_BYTES = 64 * 2**20
"""Largest index file read (a 100k-tensor model's index is ~10 MB)."""

Loader = Callable[[Path], tuple[Any, bool, list[UnsafeItem]]]


def read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of the index at ``path`` (key -> shard file name), validated."""
    what = "expected a sharded-checkpoint index: a JSON object with a 'weight_map' of tensor names to weight files"
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_INDEX_BYTES + 1)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(raw) > MAX_INDEX_BYTES:
        raise DataError(f"{path}: larger than {MAX_INDEX_BYTES} bytes ({what})")
    twice: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen and isinstance(value, str):
                twice.append(key)
            seen[key] = value
        return seen

    try:
        index = json.loads(raw, object_pairs_hook=pairs)
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{path}: not valid JSON ({type(exc).__name__}: {exc}) ({what})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        found = "no 'weight_map'" if isinstance(index, dict) else f"a JSON {type(index).__name__}"
        raise DataError(f"{path}: holds {found} ({what})")
    if twice:
        raise DataError(f"{path}: {twice[0]!r} is listed twice in the index (a key in two shards?)")
    bad = next(
        ((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v.strip()), None
    )
    if bad is not None:
        raise DataError(f"{path}: weight_map[{bad[0]!r}] is {bad[1]!r}, not a file name")
    return dict(weight_map)


def _shard_path(index: Path, name: str) -> Path:
    folder = index.parent.resolve()
    shard = (folder / name).resolve()
    if Path(name).is_absolute() or not shard.is_relative_to(folder):
        raise DataError(
            f"{index}: shard {name!r} lies outside the index's folder {folder} (shards must sit "
            "beside the index)"
        )
    if not shard.is_file():
        raise DataError(f"{index}: shard {name!r} is missing (no file {shard})")
    return shard


def read_sharded(path: Path, load: Loader) -> tuple[dict[str, Tensor], list[UnsafeItem], str]:
    """(state_dict of all shards, unsafe items of all shards, a note naming the shards)."""
    weight_map = read_index(path)
    by_shard: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        by_shard.setdefault(name, []).append(key)
    state: dict[str, Tensor] = {}
    where: dict[str, str] = {}
    items: list[UnsafeItem] = []
    for name, keys in by_shard.items():
        obj, _, found = load(_shard_path(path, name))
        items += found
        tensors = _tensors(obj, path, name)
        for key, value in tensors.items():
            if key in where:
                raise DataError(
                    f"{path}: key {key!r} is in two shards, {where[key]!r} and {name!r}"
                )
            if weight_map.get(key) != name:
                listed = weight_map.get(key)
                said = (
                    f"the index puts it in {listed!r}" if listed else "the index does not list it"
                )
                raise DataError(f"{path}: shard {name!r} holds {key!r}, but {said}")
            where[key] = name
            state[key] = value
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise DataError(
                f"{path}: shard {name!r} lacks {missing[0]!r} ({len(missing)} of its "
                f"{len(keys)} key(s) in the index are not in the file)"
            )
    note = f"sharded checkpoint: {len(state)} tensors from {len(by_shard)} shard file(s)"
    return state, items, note


def _tensors(obj: Any, index: Path, name: str) -> Mapping[str, Tensor]:
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    ):
        raise DataError(
            f"{index}: shard {name!r} is not a state_dict (a mapping of tensor names to "
            f"tensors; it holds a {type(obj).__name__})"
        )
    return obj
