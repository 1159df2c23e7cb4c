"""Load whatever the user points the BN tools at: a TARGET.

================================  ==============================================================
TARGET                            how it is read
================================  ==============================================================
run directory                     ``config.yaml`` + ``summary.json`` rebuild the model,
                                  ``checkpoint.pt`` fills it (trained when an epoch finished)
normlab checkpoint file           a ``{"model": state_dict, "epoch": ...}`` file; the model is
                                  rebuilt from ``config.yaml`` beside it, or from ``--arch``
state_dict file (.pt/.pth/.bin)   tensors only; rebuilt with ``--arch``, else read as bare tensors
                                  (statistics checks only: the graph is unknown)
whole pickled module              refused unless ``unsafe_load=True`` (``--unsafe-load``): unpickling
                                  runs code from the file
``module:callable[,k=v...]``      imported and called (with the keyword arguments given), e.g.
                                  ``torchvision.models:resnet50``; ``normlab:NAME[,k=v...]``
                                  builds a normlab model (``num_classes`` default 10), e.g.
                                  ``normlab:resnet20,placement=post``
``.onnx``                         :func:`normlab.bn.onnx_file.read_onnx` (layer records only)
``.keras`` / ``.h5``              :func:`normlab.bn.keras_file.read_keras` (layer records only)
sharded index ``*.json``          ``{"metadata": ..., "weight_map": {key: shard file}}`` as the
                                  Hugging Face hub ships large models
                                  (``model.safetensors.index.json``,
                                  ``pytorch_model.bin.index.json``): every shard is read and
                                  checked, and their tensors are one state_dict (as above)
================================  ==============================================================

Every file is scanned before it is read (:func:`normlab.bn.scan.unsafe_findings`): content that
would run code when its framework loads it (pickle globals outside torch's weights-only
allowlist, Keras ``Lambda`` layers and objects from outside Keras, ONNX external data outside
the model's folder, zip bombs) raises :class:`~normlab.bn.scan.UnsafeFileError` listing every
item, before anything is loaded, unless ``unsafe_load=True``; then the items are kept in
``Target.unsafe``.

Every torch file is read with ``torch.load(weights_only=True)`` first. ``--arch`` takes a
``module:callable`` or ``normlab:NAME`` and ``--weights FILE`` loads a state_dict into a callable's
model. The mode of a model rebuilt from tensors is meaningless (it is the constructor's default),
so such targets report ``mode_recorded=False`` and are examined in eval mode.

Multi-process runs trained with ``dist_bn: none`` also hold ``bn_buffers.rank<R>.pt`` in the run
directory: every rank's BN buffers (a weights-only dict keyed by state_dict key, rewritten at
each checkpoint). :func:`rank_buffer_files` finds them and :func:`read_rank_buffers` reads them,
for the doctor's rank-set check and ``convert --op reduce-ranks``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normlab.bn.graph import NormLayer
from normlab.bn.scan import UnsafeFileError, UnsafeItem, unsafe_findings
from normlab.errors import ConfigError, DataError, NormlabError
from normlab.errors import first_line as _first_line
from normlab.models import build_model
from normlab.models.external import import_callable
from normlab.store import RunDir
from normlab.yamlio import parse_value, plain_numbers

__all__ = [
    "Target",
    "build_arch",
    "layers_from_state_dict",
    "load_target",
    "rank_buffer_files",
    "read_rank_buffers",
    "target_state_dict",
]

_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass
class Target:
    """A loaded TARGET: a live model, or layer records read from a file."""

    spec: str
    kind: str
    """run | checkpoint | state_dict | module | callable | onnx | keras | tensors."""
    model: nn.Module | None = None
    layers: list[NormLayer] | None = None
    """For targets without a model (ONNX, Keras, bare tensors)."""
    graph_method: str = "fx"
    trained: bool | None = None
    mode_recorded: bool = False
    input_shape: tuple[int, ...] | None = None
    """Per-sample input shape (C, H, W) when the target records it."""
    batch_size: int | None = None
    """Training batch size when the target records it."""
    data_config: Any = None
    """The run's DataConfig (run directories and normlab checkpoints)."""
    seed: int = 0
    checkpoint: dict[str, Any] | None = None
    """The full normlab checkpoint dict (to write a recalibrated copy in the same format)."""
    state_key: str | None = None
    """Where the state_dict sits in the loaded file (``"model"``, ``"state_dict"``, or None)."""
    path: Path | None = None
    notes: list[str] = field(default_factory=list)
    state_dict: dict[str, Tensor] | None = None
    """The tensors of a ``tensors`` target (no model to take them from)."""
    unsafe: list[UnsafeItem] = field(default_factory=list)
    """What the scan found in files loaded anyway because ``unsafe_load=True``."""

    @property
    def description(self) -> str:
        return f"{self.spec} ({self.kind})"


def _import_callable(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    return import_callable(spec, module_name, attr, missing_hint="is it installed?")


def _split_options(spec: str) -> tuple[str, dict[str, Any]]:
    """``"normlab:resnet20,placement=post"`` -> ("normlab:resnet20", {"placement": "post"}).

    Values are read as YAML scalars (``10`` an int, ``5e-1`` a float, ``true`` a bool, ``post``
    a string; :func:`normlab.yamlio.parse_value`).
    """
    head, *items = spec.split(",")
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{spec}: options after the name must be key=value, got {item!r}")
        options[key.strip()] = plain_numbers(parse_value(value))
    return head.strip(), options


def build_arch(
    spec: str, *, num_classes: int | None = None, input_size: int | None = None
) -> nn.Module:
    """The model a ``module:callable`` or ``normlab:NAME`` spec builds (fresh weights).

    Keyword arguments may follow the name: ``normlab:resnet20,placement=post,norm=gn`` or
    ``torchvision.models:resnet18,num_classes=10``.
    """
    name, options = _split_options(spec)
    if name.startswith("normlab:"):
        classes = options.pop("num_classes", num_classes or 10)
        size = options.pop("input_size", input_size)
        try:
            return build_model(name.split(":", 1)[1], classes, input_size=size, **options)
        except (RuntimeError, OverflowError, TypeError, MemoryError) as exc:
            # build_model has checked names and options; what fails now is a size (a huge
            # num_classes) that torch cannot allocate
            raise ConfigError(f"{spec}: cannot build the model ({_first_line(exc)})") from exc
    if not _CALLABLE.match(name):
        raise ConfigError(f"--arch must be module:callable or normlab:NAME, got {spec!r}")
    fn = _import_callable(name)
    if num_classes is not None:
        options.setdefault("num_classes", num_classes)
    try:
        model = fn(**options)
    except (Exception, SystemExit) as exc:  # the user's builder refused these arguments
        called = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "no arguments"
        raise ConfigError(
            f"{spec}: calling it with {called} failed ({_first_line(exc)}); a module:callable "
            "must build the model from keyword arguments alone, given after commas: "
            f"{name},key=value,..."
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def _strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Remove a DataParallel/DDP ``module.`` or torch.compile ``_orig_mod.`` key prefix."""
    out = dict(state)
    for prefix in ("module.", "_orig_mod."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, Tensor) for v in obj.values())
    )


def layers_from_state_dict(state: Mapping[str, Tensor]) -> list[NormLayer]:
    """BN layer records from bare tensors: every prefix with running_mean and running_var."""
    prefixes = sorted(
        {k[: -len(".running_mean")] for k in state if k.endswith(".running_mean")}
        | ({""} if "running_mean" in state else set())
    )
    out = []
    for p in prefixes:
        dot = f"{p}." if p else ""
        mean, var = state.get(f"{dot}running_mean"), state.get(f"{dot}running_var")
        if mean is None or var is None:
            continue
        nbt = state.get(f"{dot}num_batches_tracked")
        w, b = state.get(f"{dot}weight"), state.get(f"{dot}bias")
        out.append(
            NormLayer(
                name=p or "<root>",
                family="batchnorm",
                type_name="BatchNorm (state_dict)",
                num_features=int(mean.numel()),
                running_mean=mean.detach().double().cpu().clone(),
                running_var=var.detach().double().cpu().clone(),
                weight=None if w is None else w.detach().double().cpu().clone(),
                bias=None if b is None else b.detach().double().cpu().clone(),
                momentum_known=False,
                num_batches_tracked=int(nbt) if isinstance(nbt, Tensor) else None,
                training=None,
            )
        )
    return out


_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _check_torch_file(path: Path) -> None:
    """DataError unless ``path`` is a readable file that starts like ``torch.save`` output: a zip
    archive (torch >= 1.6) or a pickle (the legacy format); ``.safetensors`` files are left to
    torch. Without this, torch's legacy reader fails on a text file deep in its unpickler."""
    expected = "expected a PyTorch file written by torch.save"
    if path.is_dir():
        raise DataError(f"{path}: is a directory ({expected})")
    if not path.is_file():
        raise DataError(f"{path}: no such file ({expected})")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if path.suffix.lower() == ".safetensors":
        return
    if not head:
        raise DataError(f"{path}: is empty ({expected})")
    if head.startswith(_ZIP_MAGIC) or (
        head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    ):
        return
    if head.startswith(_HDF5_MAGIC):
        found = "an HDF5 file (a Keras .h5 model is read when its name ends in .h5)"
    else:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        printable = text and all(c.isprintable() or c in "\t\r\n" for c in text)
        found = f"text starting {text[:12]!r}" if printable else f"bytes {head[:8].hex(' ')} ..."
    raise DataError(f"{path}: not a PyTorch file: it holds {found} ({expected})")


def _scan(path: Path, unsafe_load: bool) -> list[UnsafeItem]:
    """What :func:`unsafe_findings` finds in ``path``; UnsafeFileError for any of it unless
    ``unsafe_load``."""
    items = unsafe_findings(path)
    if items and not unsafe_load:
        raise UnsafeFileError(path, items)
    return items


def _load_torch(path: Path, unsafe_load: bool) -> tuple[Any, bool, list[UnsafeItem]]:
    """(object, was_pickled_code, unsafe items). The file is scanned first (:func:`_scan`)."""
    _check_torch_file(path)
    items = _scan(path, unsafe_load)
    try:
        return torch.load(path, map_location="cpu", weights_only=True), False, items
    except pickle.UnpicklingError as exc:
        if not items and not _names_a_global(_unpickler_reason(exc)):
            # the scan saw no import outside the allowlist: the pickle is damaged, not unsafe
            raise DataError(
                f"{path}: not a readable PyTorch file: its pickle is damaged or truncated "
                f"({_unpickler_reason(exc)})"
            ) from None
        if not unsafe_load:
            raise NormlabError(
                f"{path}: holds pickled Python objects (e.g. a whole nn.Module), not just tensors; "
                "loading it would run code from the file. If you trust it, pass --unsafe-load "
                f"(detail: {_unpickler_reason(exc)})"
            ) from None
    except EOFError:
        raise DataError(
            f"{path}: not a readable PyTorch file: it ends early (truncated?) (EOFError)"
        ) from None
    except Exception as exc:  # torch's readers on a damaged file: zip, pickle, safetensors errors
        raise DataError(f"{path}: not a readable PyTorch file ({_first_line(exc)})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False), True, items
    except Exception as exc:
        raise DataError(f"{path}: cannot unpickle ({_first_line(exc)})") from None


def _names_a_global(message: str) -> bool:
    """Whether torch's weights-only refusal is about an import (not about damage)."""
    return "global" in message.lower()


def _unpickler_reason(exc: BaseException) -> str:
    """The line of torch's weights-only refusal that says why (its first line is advice)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    why = next((line for line in lines if line.startswith("WeightsUnpickler error:")), None)
    return (why or (lines[0] if lines else type(exc).__name__))[:300]


def _run_model(
    run_path: Path, state: Mapping[str, Tensor] | None
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Rebuild the model of the run in ``run_path`` and load ``state`` into it."""
    run = RunDir(run_path)
    config = run.read_config()
    summary = run.read_summary() or {}
    for key in ("num_classes", "channels", "image_size"):
        value = summary.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise DataError(f"{run.summary_path}: {key} is {value!r}, expected a positive integer")
    model = run.build_model(config, summary)
    if state is not None:
        _load_into(model, state, f"the checkpoint does not match the model of {run.config_path}")
    return model, config, summary


def _load_into(model: nn.Module, state: Mapping[str, Tensor], mismatch: str) -> None:
    """Load ``state`` (DDP/compile prefixes removed) into ``model``; DataError ``mismatch: <the
    first line of torch's complaint>`` when keys or shapes do not fit."""
    try:
        model.load_state_dict(_strip_prefix(state))
    except RuntimeError as exc:
        raise DataError(f"{mismatch}: {str(exc).splitlines()[0]}") from None


def load_target(
    spec: str,
    *,
    arch: str | None = None,
    weights: str | None = None,
    unsafe_load: bool = False,
    num_classes: int | None = None,
) -> Target:
    """Load ``spec`` (see the module docstring). Raises NormlabError subclasses with the reason."""
    path = Path(spec)
    if not path.exists() and (
        spec.startswith("normlab:") or _CALLABLE.match(_split_options(spec)[0])
    ):
        model = build_arch(spec, num_classes=num_classes)
        target = Target(spec, "callable", model, mode_recorded=False)
        if weights:
            obj, _, target.unsafe = _load_torch(Path(weights), unsafe_load)
            state = (
                obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, Mapping) else obj
            )
            if not _is_state_dict(state):
                raise DataError(f"{weights}: not a state_dict (a mapping of names to tensors)")
            _load_into(model, state, f"{weights} does not fit {spec}")
            target.path = Path(weights)
            target.state_key = None
        return target
    if not path.exists():
        raise DataError(
            f"{spec}: no such file or directory (TARGET is a run directory, a checkpoint or "
            "state_dict file, module:callable, an .onnx file or a .keras/.h5 file)"
        )
    if path.is_dir():
        run = RunDir(path)
        if not run.exists():
            raise DataError(f"{path}: a directory without config.yaml is not a normlab run")
        if not run.checkpoint_path.is_file():
            raise DataError(f"{path}: the run has no checkpoint.pt yet (nothing was trained)")
        ckpt, _, items = _load_torch(run.checkpoint_path, unsafe_load)
        if not isinstance(ckpt, Mapping) or not _is_state_dict(ckpt.get("model")):
            raise DataError(
                f"{run.checkpoint_path}: not a normlab checkpoint (a dict with a 'model' "
                "state_dict)"
            )
        target = _run_target(spec, "run", path, dict(ckpt), run.checkpoint_path)
        target.unsafe = items
        return target
    if not path.is_file():
        raise DataError(f"{path}: not a regular file (a FIFO, socket or device?)")
    target = _load_file(spec, path, arch, unsafe_load, num_classes)
    return target


def _load_file(
    spec: str, path: Path, arch: str | None, unsafe_load: bool, num_classes: int | None
) -> Target:
    """A TARGET that is a file (scanned first: UnsafeFileError unless ``unsafe_load``)."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from normlab.bn.onnx_file import read_onnx

        items = _scan(path, unsafe_load)
        target = Target(spec, "onnx", layers=read_onnx(path), mode_recorded=True, path=path)
        target.unsafe = items
        return target
    if suffix in (".keras", ".h5", ".hdf5"):
        from normlab.bn.keras_file import read_keras

        items = _scan(path, unsafe_load)
        km = read_keras(path)
        target = Target(spec, "keras", layers=km.layers, path=path, unsafe=items)
        target.notes.append(f"Keras {km.format} file (Keras {km.keras_version or 'unknown'})")
        return target
    if suffix == ".json":
        from normlab.bn.shards import read_sharded

        state, items, note = read_sharded(path, lambda p: _load_torch(p, unsafe_load))
        target = _from_state(spec, path, state, arch, num_classes, None, None, None)
        target.unsafe = items
        target.notes.insert(0, note)
        return target
    obj, pickled, items = _load_torch(path, unsafe_load)
    target = _torch_target(spec, path, obj, pickled, arch, num_classes)
    target.unsafe = items
    return target


def _torch_target(
    spec: str, path: Path, obj: Any, pickled: bool, arch: str | None, num_classes: int | None
) -> Target:
    """The TARGET a loaded torch file's object is."""
    if isinstance(obj, nn.Module):
        return Target(spec, "module", obj, mode_recorded=True, path=path)
    if pickled and not isinstance(obj, Mapping):
        raise DataError(f"{path}: holds a {type(obj).__name__}, not a model or state_dict")
    if isinstance(obj, Mapping) and "model" in obj and _is_state_dict(obj["model"]):
        # a normlab checkpoint (or any {"model": state_dict, ...} file)
        state = obj["model"]
        if arch is None and RunDir(path.parent).exists():
            return _run_target(spec, "checkpoint", path.parent, dict(obj), path)
        ckpt_epoch = obj.get("epoch")
        was_trained = int(ckpt_epoch) > 0 if isinstance(ckpt_epoch, int) else None
        return _from_state(spec, path, state, arch, num_classes, was_trained, dict(obj), "model")
    for key in ("state_dict", "model_state_dict", "model_state"):
        if isinstance(obj, Mapping) and key in obj and _is_state_dict(obj[key]):
            return _from_state(spec, path, obj[key], arch, num_classes, None, dict(obj), key)
    if _is_state_dict(obj):
        return _from_state(spec, path, obj, arch, num_classes, None, None, None)
    raise DataError(
        f"{path}: neither a model, a state_dict nor a checkpoint with a 'model' or 'state_dict' "
        "entry"
    )


def _run_target(
    spec: str, kind: str, run_path: Path, ckpt: dict[str, Any], ckpt_path: Path
) -> Target:
    """A normlab run's model with its checkpoint ``ckpt`` loaded, and what the run recorded:
    input shape, batch size, data config and seed. ``trained`` is whether the checkpoint's
    ``epoch`` (else the summary's ``epochs_completed``) is past 0; None when neither says.
    Train/eval flags are never recorded by a checkpoint (``mode_recorded=False``)."""
    model, config, summary = _run_model(run_path, ckpt["model"])
    epoch = ckpt.get("epoch", summary.get("epochs_completed"))
    size = int(summary["image_size"])
    return Target(
        spec,
        kind,
        model,
        trained=int(epoch) > 0 if isinstance(epoch, int) else None,
        mode_recorded=False,
        input_shape=(int(summary["channels"]), size, size),
        batch_size=config.batch_size,
        data_config=config.data,
        seed=config.seed,
        checkpoint=ckpt,
        state_key="model",
        path=ckpt_path,
    )


def _from_state(
    spec: str,
    path: Path,
    state: Mapping[str, Tensor],
    arch: str | None,
    num_classes: int | None,
    trained: bool | None,
    checkpoint: dict[str, Any] | None,
    key: str | None,
) -> Target:
    state = _strip_prefix(state)
    if arch is None:
        target = Target(
            spec,
            "tensors",
            layers=layers_from_state_dict(state),
            graph_method="none",
            trained=trained,
            checkpoint=checkpoint,
            state_key=key,
            path=path,
            state_dict=dict(state),
        )
        target.notes.append(
            "only tensors were given (no architecture): statistics checks only; pass --arch "
            "module:callable for the graph and dynamic checks"
        )
        return target
    model = build_arch(arch, num_classes=num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(f"{path} does not fit --arch {arch}: {str(exc).splitlines()[0]}") from None
    return Target(
        spec, "state_dict", model, trained=trained, checkpoint=checkpoint, state_key=key, path=path
    )


def target_state_dict(target: Target) -> dict[str, Tensor]:
    """The tensors of a loaded TARGET (its model's state_dict, or the file's tensors), with any
    DDP ``module.`` / compile ``_orig_mod.`` prefix removed. DataError for ONNX/Keras files."""
    if target.model is not None:
        return _strip_prefix(target.model.state_dict())
    if target.state_dict is not None:
        return _strip_prefix(target.state_dict)
    raise DataError(
        f"{target.description}: has no PyTorch tensors to compare across ranks (pass PyTorch "
        "checkpoints, state_dicts or run directories)"
    )


def rank_buffer_files(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(rank, path)`` of every ``bn_buffers.rank<R>.pt`` in ``run_dir``, sorted by rank (empty
    when there are none: single-process runs, or ``dist_bn`` reduce/broadcast)."""
    return RunDir(run_dir).rank_buffer_files()


def read_rank_buffers(path: str | Path) -> dict[str, Tensor]:
    """One rank's BN buffers (weights-only load; prefixes removed). DataError when the file is
    unreadable or not a mapping of names to tensors."""
    path = Path(path)
    obj, _, _ = _load_torch(path, unsafe_load=False)
    if not _is_state_dict(obj):
        raise DataError(
            f"{path}: expected a dict of BN buffer tensors keyed by state_dict key (as normlab "
            f"train writes with dist_bn none), got {type(obj).__name__}"
        )
    return _strip_prefix(obj)


def require_same_keys(
    states: Sequence[Mapping[str, Any]], labels: Sequence[str], context: str, hint: str
) -> None:
    """Raise DataError unless every state_dict in ``states`` has the keys of the first.

    The message names the first offending key and rank: ``"{context}: rank1 lacks 'k' ...
    vs rank0): {hint}"``.
    """
    ref = states[0]
    for label, state in zip(labels[1:], states[1:], strict=True):
        missing = [k for k in ref if k not in state]
        extra = [k for k in state if k not in ref]
        if missing or extra:
            key, where = (
                (missing[0], f"{label} lacks") if missing else (extra[0], f"only {label} has")
            )
            raise DataError(
                f"{context}: {where} {key!r} ({len(missing)} key(s) missing, {len(extra)} extra "
                f"vs {labels[0]}): {hint}"
            )
