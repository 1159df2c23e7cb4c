"""Read the normalization layers of a Keras model file without TensorFlow or Keras.

Two formats, both parsed with ``json``, ``zipfile`` and ``h5py`` only:

* **Keras 3 ``.keras``**: a zip archive with ``config.json`` (the model's serialised config),
  ``metadata.json`` and ``model.weights.h5``. In the HDF5 file each layer's variables are the
  datasets ``"0"``, ``"1"``, ... of a group ``<path>/vars`` in creation order (BatchNormalization:
  gamma if ``scale``, beta if ``center``, moving_mean, moving_variance). ``<path>`` is
  ``layers/<snake_case(class name)>[_k]`` (Keras numbers repeats per container), and recent
  Keras versions also store the layer's name as the group's ``name`` attribute, which is used
  when present.
* **Legacy HDF5 ``.h5``** (Keras 2, and Keras 3's ``model.save("x.h5")``): the root attribute
  ``model_config`` holds the config JSON; ``model_weights`` has one group per layer (attribute
  ``layer_names`` lists them), each with a ``weight_names`` attribute (``"bn/gamma:0"`` in
  Keras 2, ``"bn/gamma"`` in Keras 3) naming datasets relative to that group.

Both config dialects are understood: Keras 3 ``inbound_nodes`` (``{"args": [{"class_name":
"__keras_tensor__", "config": {"keras_history": [layer, node, index]}}]}``) and Keras 2's nested
lists (``[[["layer", node, index, {}]]]``); ``Sequential`` models chain their layers in order.

Conventions converted on reading: Keras momentum ``m`` (``moving = m * moving + (1 - m) *
batch``) becomes PyTorch's ``1 - m``; epsilon means the same in both (added to the variance).
Keras stores no training flag and no batch counter (``training`` and ``num_batches_tracked`` are
None), but a model saved after ``compile`` keeps its optimizer's variables, whose first is the
iteration counter: :func:`read_keras_training` reads it (``.keras``: ``optimizer/vars/0`` in
``model.weights.h5``; ``.h5``: ``optimizer_weights/<name>/iteration``, Keras 2's ``iter:0`` or
``iterations:0``), evidence that the model was trained. Per-layer input shapes come from each layer's ``build_config`` when saved; channels-last
shapes are reordered to ``(C, *spatial)``.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from normlab.bn.graph import Link, NormLayer
from normlab.errors import DataError

__all__ = ["KerasModel", "KerasTraining", "read_keras", "read_keras_training"]

CONV_CLASSES = {
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "DepthwiseConv2D",
    "DepthwiseConv1D",
    "SeparableConv2D",
    "SeparableConv1D",
    "Conv2DTranspose",
    "Conv1DTranspose",
    "Conv3DTranspose",
}
ACTIVATION_CLASSES = {
    "Activation",
    "ReLU",
    "LeakyReLU",
    "PReLU",
    "ELU",
    "Softmax",
    "ThresholdedReLU",
}
GLOBAL_POOL_CLASSES = {
    "GlobalAveragePooling1D",
    "GlobalAveragePooling2D",
    "GlobalAveragePooling3D",
    "GlobalMaxPooling1D",
    "GlobalMaxPooling2D",
    "GlobalMaxPooling3D",
}
TRANSPARENT_CLASSES = {"Flatten", "Dropout", "SpatialDropout2D", "Reshape"}
NORM_CLASSES = {
    "BatchNormalization": "batchnorm",
    "SyncBatchNormalization": "batchnorm",
    "GroupNormalization": "groupnorm",
    "LayerNormalization": "layernorm",
    "UnitNormalization": "other",
}
MODEL_CLASSES = {"Functional", "Sequential", "Model"}


@dataclass
class KerasModel:
    """What :func:`read_keras` found in a file."""

    path: Path
    format: str
    """``keras`` (Keras 3 archive) or ``h5`` (legacy HDF5)."""
    keras_version: str | None
    layers: list[NormLayer]
    config: dict[str, Any]
    weights: dict[str, dict[str, np.ndarray]] = field(repr=False)
    """Layer name -> variable name (gamma, beta, moving_mean, kernel, ...) -> array."""


@dataclass
class _Layer:
    name: str
    class_name: str
    config: dict[str, Any]
    inputs: list[str]
    build_shape: list[Any] | None


def _snake(name: str) -> str:
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _history_names(obj: Any) -> list[str]:
    """Layer names referenced by a Keras 3 node argument structure (keras_history entries)."""
    out: list[str] = []
    if isinstance(obj, dict):
        cfg = obj.get("config")
        if obj.get("class_name") == "__keras_tensor__" and isinstance(cfg, dict):
            hist = cfg.get("keras_history")
            if isinstance(hist, list) and hist:
                out.append(str(hist[0]))
        else:
            for v in obj.values():
                out.extend(_history_names(v))
    elif isinstance(obj, list):
        for v in obj:
            out.extend(_history_names(v))
    return out


def _inbound(entry: dict[str, Any]) -> list[str]:
    nodes = entry.get("inbound_nodes") or []
    if not nodes:
        return []
    node = nodes[0]
    if isinstance(node, dict):  # Keras 3
        return _history_names(node.get("args", []))
    if isinstance(node, list):  # Keras 2: [[name, node_index, tensor_index, kwargs], ...]
        return [str(item[0]) for item in node if isinstance(item, list) and item]
    return []


def _flatten_layers(config: dict[str, Any], outer: str | None = None) -> list[_Layer]:
    """Layers of a (possibly nested) model config, in order, with their input layer names."""
    cls = config.get("class_name")
    body = config.get("config", {})
    entries = body.get("layers", []) if isinstance(body, dict) else []
    layers: list[_Layer] = []
    previous: str | None = outer
    for entry in entries:
        lcfg = entry.get("config", {})
        name = str(entry.get("name") or lcfg.get("name"))
        lcls = str(entry.get("class_name"))
        if cls == "Sequential":
            inputs = [previous] if previous is not None else []
        else:
            inputs = _inbound(entry)
        if lcls in MODEL_CLASSES:
            inner = _flatten_layers(entry, outer=inputs[0] if inputs else None)
            layers.extend(inner)
            if inner:
                # the nested model's output stands for its last layer
                layers.append(_Layer(name, "__model__", {}, [inner[-1].name], None))
            previous = name
            continue
        build = entry.get("build_config", {}) or {}
        shape = build.get("input_shape")
        if shape is None and lcls == "InputLayer":
            shape = lcfg.get("batch_shape") or lcfg.get("batch_input_shape")
        layers.append(_Layer(name, lcls, lcfg, inputs, shape))
        previous = name
    return layers


# ---- weights ---------------------------------------------------------------------------------

_BN_ORDER = ("gamma", "beta", "moving_mean", "moving_variance")


def _bn_var_names(cfg: dict[str, Any]) -> list[str]:
    names = []
    if cfg.get("scale", True):
        names.append("gamma")
    if cfg.get("center", True):
        names.append("beta")
    return [*names, "moving_mean", "moving_variance"]


def _var_names(layer: _Layer, count: int) -> list[str]:
    if layer.class_name in ("BatchNormalization", "SyncBatchNormalization"):
        names = _bn_var_names(layer.config)
    elif layer.class_name in ("GroupNormalization", "LayerNormalization"):
        names = []
        if layer.config.get("scale", True):
            names.append("gamma")
        if layer.config.get("center", True):
            names.append("beta")
    elif layer.class_name == "DepthwiseConv2D":
        names = ["depthwise_kernel", "bias"]
    elif layer.class_name == "SeparableConv2D":
        names = ["depthwise_kernel", "pointwise_kernel", "bias"]
    else:
        names = ["kernel", "bias"]
    if len(names) != count:
        names = [str(i) for i in range(count)]
    return names


def _weights_keras3(h5: Any, layers: list[_Layer]) -> dict[str, dict[str, np.ndarray]]:
    by_name = {layer.name: layer for layer in layers}
    groups: dict[str, Any] = {}  # path -> vars group

    def visit(path: str, obj: Any) -> None:
        if path.endswith("vars") and hasattr(obj, "keys"):
            groups[path] = obj

    h5.visititems(visit)
    # Expected paths when the 'name' attribute is absent: snake_case(class) numbered per container.
    expected: dict[str, str] = {}
    used: dict[str, int] = {}
    for layer in layers:
        if layer.class_name == "__model__":
            continue
        base = _snake(layer.class_name)
        if base in used:
            used[base] += 1
            key = f"{base}_{used[base]}"
        else:
            used[base] = 0
            key = base
        expected[f"layers/{key}/vars"] = layer.name
    out: dict[str, dict[str, np.ndarray]] = {}
    for path, group in groups.items():
        attr = h5_attr(group, "name")
        name = attr.decode() if isinstance(attr, bytes) else attr
        if name not in by_name:
            name = expected.get(path)
        if name not in by_name:
            continue
        keys = sorted((k for k in group if str(k).isdigit()), key=int)
        if not keys:
            continue
        names = _var_names(by_name[name], len(keys))
        out[name] = {n: _array(group[k]) for n, k in zip(names, keys, strict=True)}
    return out


MAX_ATTR_ITEMS = 1_000_000
"""Most elements an HDF5 attribute may declare (a damaged dataspace can declare 2**60)."""

MAX_ARRAY_BYTES = 2**34
"""Most bytes one weight array may declare (16 GiB; beyond is a damaged header, not a model)."""


def h5_attr(obj: Any, name: str, default: Any = None) -> Any:
    """``obj.attrs.get(name, default)``, refusing (ValueError) an attribute that declares more
    than :data:`MAX_ATTR_ITEMS` elements: h5py would allocate them all before reading."""
    if name not in obj.attrs:
        return default
    shape = obj.attrs.get_id(name).shape or ()
    if int(np.prod(shape, dtype=np.float64)) > MAX_ATTR_ITEMS:
        raise ValueError(f"attribute {name!r} declares shape {shape} (damaged?)")
    return obj.attrs.get(name, default)


def _array(dataset: Any) -> np.ndarray:
    """A dataset's values, refusing (ValueError) one that declares more than
    :data:`MAX_ARRAY_BYTES`."""
    declared = float(np.prod(dataset.shape or (), dtype=np.float64)) * dataset.dtype.itemsize
    if declared > MAX_ARRAY_BYTES:
        raise ValueError(f"dataset {dataset.name!r} declares shape {dataset.shape} (damaged?)")
    return np.asarray(dataset)


def _decode(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _weights_h5(root: Any) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    names = [_decode(n) for n in h5_attr(root, "layer_names", list(root.keys()))]
    for lname in names:
        if lname not in root:
            continue
        group = root[lname]
        weight_names = [_decode(w) for w in h5_attr(group, "weight_names", [])]
        values: dict[str, np.ndarray] = {}
        for wname in weight_names:
            if wname not in group:
                continue
            short = wname.rsplit("/", 1)[-1].split(":", 1)[0]
            values[short] = _array(group[wname])
        out[lname] = values
    return out


# ---- records ---------------------------------------------------------------------------------


def _channels_first_shape(shape: list[Any] | None, cfg: dict[str, Any]) -> tuple[int, ...] | None:
    """Per-sample (C, *spatial) from a Keras batch shape, None when not fully known."""
    if not shape or not isinstance(shape, list) or len(shape) < 2:
        return None
    if isinstance(shape[0], list):  # a layer with several inputs
        return None
    dims = shape[1:]
    if any(d is None for d in dims):
        return None
    axis = cfg.get("axis", -1)
    if isinstance(axis, list):
        axis = axis[0] if len(axis) == 1 else -1
    axis = int(axis) if isinstance(axis, int) else -1
    channels_last = axis in (-1, len(shape) - 1)
    if channels_last:
        return (int(dims[-1]), *(int(d) for d in dims[:-1]))
    return tuple(int(d) for d in dims)


def _producer(
    layer: _Layer, layers: dict[str, _Layer], consumers: dict[str, list[str]]
) -> Link | None:
    if not layer.inputs:
        return None
    src_name = layer.inputs[0]
    src = layers.get(src_name)
    if src is None:
        return Link("other", src_name)
    exclusive = len(consumers.get(src_name, [])) == 1
    cls = src.class_name
    if cls in CONV_CLASSES or cls == "Dense":
        act = src.config.get("activation", "linear")
        act_name = act if isinstance(act, str) else (act or {}).get("class_name", "linear")
        if act_name not in ("linear", None, "None"):
            return Link("activation", f"{src_name} (activation={act_name})", exclusive)
        kind = "conv" if cls in CONV_CLASSES else "linear"
        return Link(kind, src_name, exclusive, has_bias=bool(src.config.get("use_bias", True)))
    if cls in ACTIVATION_CLASSES:
        return Link("activation", src_name, exclusive)
    if cls in GLOBAL_POOL_CLASSES:
        return Link("global_pool", src_name, exclusive)
    if cls in TRANSPARENT_CLASSES:
        cur: _Layer | None = src
        while cur is not None and cur.class_name in TRANSPARENT_CLASSES and cur.inputs:
            cur = layers.get(cur.inputs[0])
        if cur is not None and cur.class_name in GLOBAL_POOL_CLASSES:
            return Link("global_pool", cur.name, exclusive)
    if cls == "InputLayer":
        return Link("input", src_name, exclusive)
    if cls in NORM_CLASSES:
        return Link("norm", src_name, exclusive)
    return Link("other", src_name, exclusive)


def _consumer(layer: _Layer, layers: dict[str, _Layer], consumers: dict[str, list[str]]) -> Link:
    users = consumers.get(layer.name, [])
    if len(users) != 1:
        return Link("other", None, False if users else None)
    dst = layers[users[0]]
    if dst.class_name in CONV_CLASSES:
        return Link("conv", dst.name, True, has_bias=bool(dst.config.get("use_bias", True)))
    if dst.class_name == "Dense":
        return Link("linear", dst.name, True, has_bias=bool(dst.config.get("use_bias", True)))
    return Link("other", dst.name, True)


def _tensor(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64).reshape(-1))


def _records(layers: list[_Layer], weights: dict[str, dict[str, np.ndarray]]) -> list[NormLayer]:
    by_name = {layer.name: layer for layer in layers}
    consumers: dict[str, list[str]] = {}
    for layer in layers:
        for src in layer.inputs:
            consumers.setdefault(src, []).append(layer.name)
    out = []
    for layer in layers:
        family = NORM_CLASSES.get(layer.class_name)
        if family is None:
            continue
        cfg = layer.config
        w = weights.get(layer.name, {})
        mean, var = _tensor(w.get("moving_mean")), _tensor(w.get("moving_variance"))
        gamma, beta = _tensor(w.get("gamma")), _tensor(w.get("beta"))
        num = next((int(t.numel()) for t in (mean, gamma, beta) if t is not None), None)
        momentum = cfg.get("momentum")
        record = NormLayer(
            name=layer.name,
            family=family,
            type_name=f"keras.{layer.class_name}",
            num_features=num,
            running_mean=mean if family == "batchnorm" else None,
            running_var=var if family == "batchnorm" else None,
            weight=gamma,
            bias=beta,
            eps=float(cfg["epsilon"]) if "epsilon" in cfg else None,
            momentum=round(1.0 - float(momentum), 12)
            if isinstance(momentum, int | float)
            else None,
            momentum_known=isinstance(momentum, int | float),
            num_batches_tracked=None,
            training=None,
            track_running_stats=True,
            affine_frozen=None if cfg.get("trainable", True) else True,
            num_groups=int(cfg["groups"]) if family == "groupnorm" and "groups" in cfg else None,
            num_channels=num,
            producer=_producer(layer, by_name, consumers),
            consumer=_consumer(layer, by_name, consumers),
            input_shape=_channels_first_shape(layer.build_shape, cfg),
            convention="keras",
        )
        if family == "groupnorm" and record.input_shape is not None:
            record.num_channels = record.num_features = record.input_shape[0]
        out.append(record)
    return out


H5_SECONDS = 120.0
"""Longest an HDF5 read may take (:func:`bounded`): libhdf5 can loop forever on a damaged file,
in C, where no signal reaches it."""


def bounded(fn: Callable[..., Any], path: Path, *args: Any) -> Any:
    """``fn(path, *args)`` in a forked child process, DataError naming ``path`` when it runs
    past :data:`H5_SECONDS` (the child is killed). Exceptions in ``fn`` are raised here. Where
    fork is unavailable, ``fn`` runs in this process."""
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():  # pragma: no cover - not Linux/macOS
        return fn(path, *args)
    with mp.get_context("fork").Pool(1) as pool:
        job = pool.apply_async(fn, (path, *args))
        try:
            return job.get(H5_SECONDS)
        except mp.TimeoutError:
            pool.terminate()
            raise DataError(
                f"{path}: reading it as HDF5 did not finish in {H5_SECONDS:g} s (a damaged file "
                "that sends libhdf5 into a loop?)"
            ) from None


def read_keras(path: str | Path) -> KerasModel:
    """The normalization layers (and raw weights) of a ``.keras`` or ``.h5`` Keras model file,
    read in a child process bounded in time (:func:`bounded`).

    Raises :class:`DataError` naming the file when it is not a readable Keras model.
    """
    path = Path(path)
    # the child returns arrays only (tensors would travel as shared-memory handles)
    km: KerasModel = bounded(_read_keras, path, False)
    try:
        km.layers = _records(_flatten_layers(km.config), km.weights)
    except (KeyError, ValueError, AttributeError, TypeError) as exc:  # see _read_keras
        raise DataError(
            f"{path}: not a readable Keras model file ({type(exc).__name__}: {exc})"
        ) from None
    return km


def _read_keras(path: Path, records: bool = True) -> KerasModel:
    """What :func:`read_keras` returns; layer records only when ``records``."""
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError(
            f"{path}: reading Keras files needs h5py (pip install h5py, or 'normlab[bn]')"
        ) from exc

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = set(zf.namelist())
                if "config.json" not in names or "model.weights.h5" not in names:
                    raise DataError(
                        f"{path}: a zip archive without config.json and model.weights.h5 is not "
                        "a Keras 3 .keras file"
                    )
                config = _mapping(json.loads(zf.read("config.json")), path, "config.json")
                meta = json.loads(zf.read("metadata.json")) if "metadata.json" in names else {}
                meta = meta if isinstance(meta, dict) else {}
                weights_bytes = zf.read("model.weights.h5")
            layers = _flatten_layers(config)
            with h5py.File(io.BytesIO(weights_bytes), "r") as h5:
                weights = _weights_keras3(h5, layers)
            found = _records(layers, weights) if records else []
            return KerasModel(path, "keras", meta.get("keras_version"), found, config, weights)
        with h5py.File(path, "r") as h5:
            raw = h5_attr(h5, "model_config")
            if raw is None:
                raise DataError(
                    f"{path}: HDF5 file without a 'model_config' attribute (a weights-only file?); "
                    "doctor needs the full model saved with model.save()"
                )
            config = _mapping(json.loads(_decode(raw)), path, "model_config")
            version = h5_attr(h5, "keras_version")
            root = h5.get("model_weights", h5)
            weights = _weights_h5(root)
        layers = _flatten_layers(config)
        return KerasModel(
            path,
            "h5",
            _decode(version) if version is not None else None,
            _records(layers, weights) if records else [],
            config,
            weights,
        )
    except DataError:
        raise
    # AttributeError, TypeError: the JSON config is not shaped like Keras' (a list where a layer
    # mapping belongs, say); the file is the user's, so that is bad input, not a bug here.
    # BadZipFile, zlib.error, EOFError: a damaged archive (bad CRC, truncated member);
    # RuntimeError: an encrypted member, or JSON nested too deep (RecursionError)
    except (
        OSError,
        KeyError,
        ValueError,
        AttributeError,
        TypeError,
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        NotImplementedError,
        RuntimeError,
    ) as exc:
        raise DataError(
            f"{path}: not a readable Keras model file ({type(exc).__name__}: {exc})"
        ) from None


def _mapping(config: Any, path: Path, what: str) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise DataError(
            f"{path}: its {what} is a JSON {type(config).__name__}, not a Keras model config "
            "(a JSON object)"
        )
    return config


# ---- training state --------------------------------------------------------------------------

_ITERATION_NAMES = ("iteration", "iterations", "iter")


@dataclass(frozen=True)
class KerasTraining:
    """What a Keras file records about training (:func:`read_keras_training`)."""

    iterations: int | None
    """The optimizer's step counter; None when the file holds no optimizer state."""
    where: str | None
    """Where in the file the counter was read (``optimizer/vars/0``, ...)."""
    optimizer: str | None
    """The optimizer's class name from the training config, when recorded."""


def _scalar_int(obj: Any) -> int | None:
    value = np.asarray(obj[()]) if hasattr(obj, "shape") and obj.shape == () else None
    if value is None or value.dtype.kind not in "iuf":
        return None
    number = float(value)
    return int(number) if np.isfinite(number) and number == int(number) else None


def _iterations_keras3(h5: Any) -> tuple[int | None, str | None]:
    group = h5.get("optimizer/vars")
    if group is None or "0" not in group:
        return None, None
    return _scalar_int(group["0"]), "optimizer/vars/0"


def _iterations_h5(h5: Any) -> tuple[int | None, str | None]:
    found: list[tuple[str, int]] = []

    def visit(path: str, obj: Any) -> None:
        short = path.rsplit("/", 1)[-1].split(":", 1)[0]
        if short in _ITERATION_NAMES and hasattr(obj, "shape"):
            value = _scalar_int(obj)
            if value is not None:
                found.append((path, value))

    for root in ("optimizer_weights", "training"):
        if root in h5:
            h5[root].visititems(lambda p, o, r=root: visit(f"{r}/{p}", o))
    return (found[0][1], found[0][0]) if found else (None, None)


def _optimizer_name(config: Any) -> str | None:
    if not isinstance(config, dict):
        return None
    opt = config.get("optimizer_config", config.get("optimizer"))
    name = opt.get("class_name") if isinstance(opt, dict) else None
    return str(name) if name else None


def read_keras_training(path: str | Path) -> KerasTraining:
    """The optimizer iteration counter (and optimizer class) stored in a Keras model file.

    ``iterations`` is None when the file holds no optimizer state (saved without compiling, or
    with ``include_optimizer=False``): no evidence either way. Raises :class:`DataError` naming
    the file when it is not a readable Keras file.
    """
    import h5py

    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = set(zf.namelist())
                if "model.weights.h5" not in names:
                    raise DataError(f"{path}: a zip archive without model.weights.h5")
                compile_cfg = None
                if "config.json" in names:
                    cfg = json.loads(zf.read("config.json"))
                    compile_cfg = cfg.get("compile_config") if isinstance(cfg, dict) else None
                weights_bytes = zf.read("model.weights.h5")
            with h5py.File(io.BytesIO(weights_bytes), "r") as h5:
                iterations, where = _iterations_keras3(h5)
            return KerasTraining(iterations, where, _optimizer_name(compile_cfg))
        with h5py.File(path, "r") as h5:
            raw = h5.attrs.get("training_config")
            training_cfg = json.loads(_decode(raw)) if raw is not None else None
            iterations, where = _iterations_h5(h5)
        return KerasTraining(iterations, where, _optimizer_name(training_cfg))
    except DataError:
        raise
    except (OSError, KeyError, ValueError, AttributeError, TypeError) as exc:
        raise DataError(
            f"{path}: not a readable Keras model file ({type(exc).__name__}: {exc})"
        ) from None
