"""Find what in a model file would run code when its framework loads it, without running it.

:func:`unsafe_findings` reads a file's bytes and reports, never executes or imports, every
part that a framework's loader would turn into code:

==============================  ===============================================================
id                              what
==============================  ===============================================================
``unsafe-pickle-global``        a pickle (a raw/legacy torch file, or any ``.pkl`` inside a zip
                                torch file) imports a global outside torch's weights-only
                                allowlist, or computes the name it imports (``STACK_GLOBAL``
                                not fed by literal strings, ``EXT*`` registry codes):
                                ``torch.load(weights_only=False)`` would call it
``keras-lambda``                a Keras ``Lambda`` layer: its function runs when the model runs
                                (and loads only with ``safe_mode=False``)
``keras-marshalled-code``       Python bytecode in a Keras config (a Keras 3 ``__lambda__`` or
                                a Keras 2 ``function_type: lambda``): ``marshal`` + ``exec``
``keras-foreign-object``        a Keras config names an object from outside Keras (a
                                ``module`` not ``keras``/``keras.*``, or a custom
                                ``registered_name`` ``package>Name``): ``load_model`` imports it
``onnx-external-data-outside``  an ONNX tensor's external data lies outside the model's folder
                                (an absolute path, ``..``, a symlink out): reading the model
                                reads that file
``scan-limit-exceeded``         a part the scan must read is larger than its limit (a zip bomb,
                                a huge pickle or config): not read, so not known to be safe
==============================  ===============================================================

Every item is an error for the doctor. Guarantees: nothing in the file is unpickled,
unmarshalled, imported or evaluated; pickles are walked opcode by opcode with
:func:`pickletools.genops` (streaming: memory does not grow with the pickle's length beyond the
memo of imported names' strings); no zip member is decompressed past :data:`MAX_READ` bytes
(members the loaders read whole are streamed and counted, not kept). Damaged files are not this
module's business: a scan stops where a file stops making sense and reports what it saw before;
the loaders name the damage.

The pickle allowlist is torch's own (``torch._weights_only_unpickler._get_allowed_globals`` plus
globals added with ``torch.serialization.add_safe_globals``), with the Python 2 names that the
unpickler maps (``__builtin__.set``) mapped the same way. Why not picklescan, modelscan or
fickling: see ``tests/test_bn_scan.py`` (picklescan serves there as a second opinion).
"""

from __future__ import annotations

import io
import json
import mmap
import pickletools
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from normlab.errors import NormlabError

__all__ = [
    "MAX_READ",
    "UNSAFE_CHECKS",
    "UnsafeFileError",
    "UnsafeItem",
    "refuse_unsafe",
    "unsafe_findings",
]

UNSAFE_CHECKS: dict[str, str] = {
    "unsafe-pickle-global": "pickle imports a global outside torch's weights-only allowlist",
    "keras-lambda": "Keras Lambda layer (runs its function; needs safe_mode=False)",
    "keras-marshalled-code": "marshalled Python bytecode in a Keras config",
    "keras-foreign-object": "Keras config names an object from outside Keras",
    "onnx-external-data-outside": "ONNX external data outside the model's folder",
    "scan-limit-exceeded": "part of the file too large to scan (zip bomb? huge header?)",
}
"""Every id :func:`unsafe_findings` reports, with its title (all are errors)."""

MAX_READ = 256 * 2**20
"""Most bytes the scan decompresses or reads from one part of a file (a pickle, a config)."""

MAX_PICKLE_OPS = 20_000_000
"""Most opcodes walked in one pickle (a real state_dict pickle has ~30 per tensor)."""

MAX_ZIP_ENTRIES = 200_000
"""Most members a zip file may declare (its central directory is read into memory)."""

_LEGACY_PICKLES = 5
"""A legacy ``torch.save`` file starts with 5 pickles: magic number, protocol, system info,
the object, the storage keys; raw storage bytes follow (not pickles)."""


@dataclass(frozen=True)
class UnsafeItem:
    """One part of a file that would run code on loading (or could not be checked)."""

    id: str
    message: str
    location: str
    """Where in the file: ``data.pkl, byte 120``, ``config.json: config.layers[3]``, ..."""

    def __post_init__(self) -> None:
        if self.id not in UNSAFE_CHECKS:
            raise ValueError(f"unknown unsafe-content id {self.id!r}")


class UnsafeFileError(NormlabError):
    """A file holds content that would run code on loading; ``items`` says what and where."""

    def __init__(self, path: Path, items: list[UnsafeItem]) -> None:
        self.path = path
        self.items = items
        first = items[0]
        more = f" (+{len(items) - 1} more)" if len(items) > 1 else ""
        ids = ", ".join(sorted({i.id for i in items}))
        super().__init__(
            f"{path}: refused, it holds content that would run code when loaded [{ids}]: "
            f"{first.message} at {first.location}{more}. Nothing was loaded; `normlab doctor "
            f"{path}` lists every item; pass --unsafe-load only if you trust the file"
        )


def refuse_unsafe(path: str | Path) -> list[UnsafeItem]:
    """:func:`unsafe_findings`, raising :class:`UnsafeFileError` when there are any."""
    items = unsafe_findings(path)
    if items:
        raise UnsafeFileError(Path(path), items)
    return items


def unsafe_findings(path: str | Path) -> list[UnsafeItem]:
    """Everything in the file at ``path`` that its framework's loader would run (see the module
    docstring); [] for files that are not model files, are missing, or are directories."""
    path = Path(path)
    if not path.is_file():
        return []
    suffix = path.suffix.lower()
    try:
        if suffix == ".onnx":
            return _onnx_items(path)
        if suffix in (".keras", ".h5", ".hdf5"):
            return _keras_items(path)
        if suffix == ".safetensors":
            return []  # a JSON header and raw tensor bytes: nothing in it can run
        return _torch_items(path)
    except OSError:
        return []  # unreadable: the loader names the reason


# ---- pickles -----------------------------------------------------------------------------------


def _allowed_globals() -> set[str]:
    from torch import _weights_only_unpickler as wou
    from torch.serialization import get_safe_globals

    allowed = set(wou._get_allowed_globals())
    for entry in get_safe_globals():
        obj = entry[0] if isinstance(entry, tuple) else entry
        name = entry[1] if isinstance(entry, tuple) else f"{obj.__module__}.{obj.__qualname__}"
        allowed.add(name)
    return allowed


def _mapped(module: str, name: str) -> str:
    """``module.name`` as the unpickler resolves it (Python 2 names mapped)."""
    from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


def _pickle_globals(stream: IO[bytes]) -> Iterator[tuple[str, int]]:
    """``(module.name, byte offset)`` of every import in the pickle starting at the stream's
    position; ``"<computed>"`` where the name is not two literal strings. Ends with ``("<stop>",
    offset)`` after the pickle's STOP; ends early at damage (ValueError from genops), or at
    :data:`MAX_PICKLE_OPS` with ``"<too many opcodes>"``."""
    memo: dict[int, str | None] = {}
    recent: list[str | None] = []  # values of the last pushes, for STACK_GLOBAL
    try:
        for count, (op, arg, pos) in enumerate(pickletools.genops(stream)):
            if count >= MAX_PICKLE_OPS:
                yield "<too many opcodes>", pos or 0
                return
            name = op.name
            if name == "STOP":
                yield "<stop>", pos or 0
                return
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                yield _mapped(module, attr), pos or 0
                recent.append(None)
            elif name == "STACK_GLOBAL":
                if len(recent) >= 2 and recent[-1] is not None and recent[-2] is not None:
                    yield _mapped(recent[-2], recent[-1]), pos or 0
                else:
                    yield "<computed>", pos or 0
                recent.append(None)
            elif name in ("EXT1", "EXT2", "EXT4"):
                yield f"<copyreg extension {arg}>", pos or 0
                recent.append(None)
            elif name in _MEMO_PUT:
                key = len(memo) if name == "MEMOIZE" else int(arg or 0)
                memo[key] = recent[-1] if recent else None
                continue
            elif name in _MEMO_GET:
                recent.append(memo.get(int(arg or 0)))
            elif name in _STRING_OPS:
                recent.append(arg if isinstance(arg, str) else None)
            else:
                recent.append(None)
            del recent[:-2]
    except (ValueError, EOFError, OverflowError, struct.error):
        return  # damaged or truncated: the loader reports it


def _pickle_items(
    stream: IO[bytes], where: str, allowed: set[str], pickles: int = 1
) -> list[UnsafeItem]:
    """Items for up to ``pickles`` consecutive pickles from ``stream``."""
    items: list[UnsafeItem] = []
    seen: set[str] = set()
    for _ in range(pickles):
        stopped = False
        for full, pos in _pickle_globals(stream):
            if full == "<stop>":
                stopped = True
                continue
            if full == "<too many opcodes>":
                items.append(
                    UnsafeItem(
                        "scan-limit-exceeded",
                        f"a pickle of more than {MAX_PICKLE_OPS} opcodes was not scanned to its end",
                        f"{where}, byte {pos}",
                    )
                )
                return items
            if full in allowed or full in seen:
                continue
            seen.add(full)
            items.append(
                UnsafeItem(
                    "unsafe-pickle-global",
                    f"the pickle imports {full}, which torch's weights-only loader refuses; "
                    "torch.load(weights_only=False) would import and may call it",
                    f"{where}, byte {pos}",
                )
            )
        if not stopped:
            break  # damaged: what follows is not known to be a pickle
    return items


def _torch_items(path: Path) -> list[UnsafeItem]:
    with open(path, "rb") as fh:
        head = fh.read(4)
        if head.startswith(b"PK"):
            return _torch_zip_items(path, fh)
        if head[:1] != b"\x80":
            return []  # not a pickle: the loader says what it is
        size = path.stat().st_size
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            # an mmap reads pages on demand: a legacy file's storages are never pulled in
            view: Any = mm
            if size > MAX_READ:
                view = io.BytesIO(mm[:MAX_READ])
            return _pickle_items(view, path.name, _allowed_globals(), _LEGACY_PICKLES)


def _open_zip(path: Path, fh: IO[bytes]) -> tuple[zipfile.ZipFile | None, list[UnsafeItem]]:
    """The zip archive (None when not readable as one) and a limit item when it declares more
    than :data:`MAX_ZIP_ENTRIES` members (then not opened: its directory would fill memory)."""
    try:
        end = zipfile._EndRecData(fh)  # type: ignore[attr-defined]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # multi-disk, damaged
        end = None
    if end is not None and int(end[4]) > MAX_ZIP_ENTRIES:
        item = UnsafeItem(
            "scan-limit-exceeded",
            f"the zip archive declares {int(end[4])} members (limit {MAX_ZIP_ENTRIES})",
            path.name,
        )
        return None, [item]
    try:
        return zipfile.ZipFile(fh), []
    except (zipfile.BadZipFile, ValueError, NotImplementedError, EOFError, OSError):
        return None, []


def _read_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, keep: bool
) -> tuple[bytes | None, list[UnsafeItem]]:
    """Decompress ``info`` in chunks, at most :data:`MAX_READ` bytes; its bytes when ``keep``.
    A limit item when it is larger (declared or actual) or decompresses past its declared size
    (a zip bomb); (None, []) when it is damaged (the loader names that)."""
    too_big = UnsafeItem(
        "scan-limit-exceeded",
        f"member {info.filename!r} declares {info.file_size} bytes from {info.compress_size} "
        f"compressed (read limit {MAX_READ}): a zip bomb, or too large to check",
        f"{where}:{info.filename}",
    )
    if info.file_size > MAX_READ:
        return None, [too_big]
    chunks: list[bytes] = []
    total = 0
    try:
        with zf.open(info) as member:
            while chunk := member.read(2**20):
                total += len(chunk)
                if total > min(MAX_READ, info.file_size):
                    return None, [too_big]
                if keep:
                    chunks.append(chunk)
    except (zipfile.BadZipFile, ValueError, NotImplementedError, EOFError, OSError, RuntimeError):
        return None, []  # damaged, encrypted, unknown compression: the loader reports it
    return b"".join(chunks), []


def _torch_zip_items(path: Path, fh: IO[bytes]) -> list[UnsafeItem]:
    zf, items = _open_zip(path, fh)
    if zf is None:
        return items
    allowed: set[str] | None = None
    with zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            is_pickle = info.filename.endswith(".pkl")
            if not is_pickle and info.compress_type == zipfile.ZIP_STORED:
                continue  # raw bytes, never decompressed: no bomb, no code
            data, limit = _read_member(zf, info, path.name, keep=is_pickle)
            items += limit
            if data is not None and is_pickle:
                allowed = allowed if allowed is not None else _allowed_globals()
                items += _pickle_items(io.BytesIO(data), f"{path.name}:{info.filename}", allowed)
    return items


# ---- Keras -------------------------------------------------------------------------------------


def _keras_module(module: str) -> bool:
    return module == "keras" or module.startswith("keras.")


def _keras_config_items(obj: Any, where: str, trail: str = "") -> Iterator[UnsafeItem]:
    """Items for every object in a Keras config that loading would turn into code."""
    if isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _keras_config_items(value, where, f"{trail}[{i}]")
        return
    if not isinstance(obj, dict):
        return
    at = f"{where}: {trail or '<root>'}"
    cls, module, registered = obj.get("class_name"), obj.get("module"), obj.get("registered_name")
    config = obj.get("config")
    label = config.get("name") if isinstance(config, dict) else obj.get("name")
    if cls == "Lambda":
        yield UnsafeItem(
            "keras-lambda",
            f"Lambda layer {label!r}: its Python function runs with the model; Keras loads it "
            "only with safe_mode=False",
            at,
        )
    if cls == "__lambda__" or obj.get("function_type") == "lambda":
        yield UnsafeItem(
            "keras-marshalled-code",
            "marshalled Python bytecode (a lambda's code object): loading it with "
            "safe_mode=False unmarshals and runs it",
            at,
        )
    if isinstance(module, str) and module and not _keras_module(module):
        yield UnsafeItem(
            "keras-foreign-object",
            f"names {module}.{config if cls == 'function' else cls} (module {module!r} is not "
            "part of Keras): load_model would import it",
            at,
        )
    elif isinstance(registered, str) and ">" in registered:
        package = registered.split(">", 1)[0]
        if not _keras_module(package):
            yield UnsafeItem(
                "keras-foreign-object",
                f"names the custom object {registered!r}, registered outside Keras: loading "
                "needs (and runs) code from its package",
                at,
            )
    for key, value in obj.items():
        yield from _keras_config_items(value, where, f"{trail}.{key}" if trail else str(key))


def _parse_json(data: bytes | str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None  # not JSON: the reader reports it


def _keras_items(path: Path) -> list[UnsafeItem]:
    with open(path, "rb") as fh:
        if not fh.read(4).startswith(b"PK"):
            return _h5_items(path)
        fh.seek(0)
        zf, items = _open_zip(path, fh)
        if zf is None:
            return items
        with zf:
            for info in zf.infolist():
                is_config = info.filename == "config.json"
                if not is_config and info.compress_type == zipfile.ZIP_STORED:
                    continue
                data, limit = _read_member(zf, info, path.name, keep=is_config)
                items += limit
                if data is not None and is_config:
                    items += _keras_config_items(_parse_json(data), f"{path.name}:config.json")
    return items


def _h5_items(path: Path) -> list[UnsafeItem]:
    from normlab.bn.keras_file import bounded

    raw = bounded(_h5_config, path)  # libhdf5 can loop forever on a damaged file
    if raw is None:
        return []
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return list(_keras_config_items(_parse_json(text), f"{path.name}:model_config"))


def _h5_config(path: Path) -> Any:
    """The ``model_config`` attribute of an HDF5 file; None when there is none or the file is
    not readable HDF5 (the reader reports that)."""
    try:
        import h5py
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    from normlab.bn.keras_file import h5_attr

    try:
        with h5py.File(path, "r") as h5:
            return h5_attr(h5, "model_config")
    except (OSError, KeyError, ValueError, TypeError, RuntimeError):
        return None


# ---- ONNX --------------------------------------------------------------------------------------


def _onnx_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of ``graph`` and its subgraphs (initializers, sparse initializers,
    attribute tensors)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: Any) -> Iterator[Any]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        if attr.HasField("g"):
            yield from _onnx_tensors(attr.g)
        for sub in attr.graphs:
            yield from _onnx_tensors(sub)


def _onnx_items(path: Path) -> list[UnsafeItem]:
    try:
        import onnx
    except ImportError:  # pragma: no cover - depends on the environment
        return []
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX, damaged: read_onnx names it
        return []
    tensors = list(_onnx_tensors(model.graph))
    for function in model.functions:
        for node in function.node:
            tensors.extend(_node_tensors(node))
    base = path.parent.resolve()
    items = []
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(base):
            items.append(
                UnsafeItem(
                    "onnx-external-data-outside",
                    f"tensor {tensor.name!r} takes its data from {location!r}, outside the "
                    f"model's folder {base}: loading the model would read that file",
                    f"{path.name}: tensor {tensor.name!r}",
                )
            )
    return items
