"""Read the normalization nodes of an ONNX model (with the ``onnx`` package only).

Each ``BatchNormalization`` node becomes a :class:`~normlab.bn.graph.NormLayer`: its inputs
``scale``, ``B``, ``input_mean`` and ``input_var`` are read from the graph's initializers (or
``Constant`` nodes); ``epsilon`` and ``momentum`` from its attributes. ONNX's momentum follows the
Keras convention (``running = running * momentum + mean * (1 - momentum)``, default 0.9), so the
record holds PyTorch's ``1 - momentum``. The node is in training mode when its
``training_mode`` attribute is 1 (opset >= 14) or, in older opsets, when it has the extra
running-statistics outputs. ``GroupNormalization``, ``InstanceNormalization`` and
``LayerNormalization`` nodes are listed too (GroupNorm's channel count comes from its ``scale``
when that has one entry per channel, as in opset 21).

Producers and consumers come from the graph's edges (``Conv``, ``Gemm``/``MatMul`` count as
conv/linear; ``Relu``, ``Clip``, ``Sigmoid``, ... as activations; ``GlobalAveragePool`` and
``ReduceMean`` as global pooling, looked through ``Flatten``/``Reshape``/``Dropout``/
``Identity``). Per-layer input shapes come from ONNX shape inference when it yields concrete
dimensions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from normlab.bn.graph import Link, NormLayer
from normlab.errors import DataError

__all__ = ["read_onnx"]

ACTIVATION_OPS = {
    "Relu",
    "Clip",
    "LeakyRelu",
    "PRelu",
    "Elu",
    "Selu",
    "Celu",
    "Gelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Softplus",
    "Mish",
    "ThresholdedRelu",
}
GLOBAL_POOL_OPS = {"GlobalAveragePool", "GlobalMaxPool", "ReduceMean"}
TRANSPARENT_OPS = {"Flatten", "Reshape", "Dropout", "Identity", "Squeeze"}
NORM_OPS = {
    "BatchNormalization": "batchnorm",
    "GroupNormalization": "groupnorm",
    "InstanceNormalization": "instancenorm",
    "LayerNormalization": "layernorm",
}


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def read_onnx(path: str | Path) -> list[NormLayer]:
    """The normalization layers of an ONNX file. Raises :class:`DataError` naming the file."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError(
            f"{path}: reading ONNX files needs the onnx package (pip install onnx)"
        ) from exc
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise DataError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})"
        ) from None
    try:
        return _layers(model, onnx, numpy_helper)
    # a model that parses as protobuf but whose tensors or attributes do not make sense (a
    # raw_data length that does not fit the dims, an attribute of the wrong type): bad input
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        raise DataError(
            f"{path}: a damaged ONNX model ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None


def _layers(model: Any, onnx: Any, numpy_helper: Any) -> list[NormLayer]:
    """The normalization layers of a loaded ONNX ``model`` (see :func:`read_onnx`)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    graph = model.graph
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = _attr(node, "value", None)
            if value is not None:
                consts[node.output[0]] = numpy_helper.to_array(value)
        elif node.op_type == "Identity" and node.input and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]  # exporters alias equal initializers
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        # the batch dim may be symbolic; the per-sample dims must be concrete
        if len(dims) > 1 and all(d.HasField("dim_value") for d in dims[1:]):
            shapes[vi.name] = (0, *(int(d.dim_value) for d in dims[1:]))
    producer_of: dict[str, Any] = {}
    users_of: dict[str, list[Any]] = {}
    for node in graph.node:
        for out in node.output:
            producer_of[out] = node
        for inp in node.input:
            if inp:
                users_of.setdefault(inp, []).append(node)
    graph_inputs = {i.name for i in graph.input}

    def tensor(name: str | None) -> torch.Tensor | None:
        if not name or name not in consts:
            return None
        return torch.from_numpy(np.asarray(consts[name], dtype=np.float64).reshape(-1))

    def node_name(node: Any) -> str:
        return node.name or (node.output[0] if node.output else node.op_type)

    def producer(x: str) -> Link:
        if x in graph_inputs and x not in consts:
            return Link("input", x, len(users_of.get(x, [])) == 1)
        src = producer_of.get(x)
        if src is None:
            return Link("other", x)
        exclusive = len(users_of.get(x, [])) == 1
        op = src.op_type
        if op == "Conv" or op == "Gemm":
            has_bias = len(src.input) > 2 and bool(src.input[2])
            kind = "conv" if op == "Conv" else "linear"
            return Link(kind, node_name(src), exclusive, has_bias=has_bias)
        if op == "MatMul":
            return Link("linear", node_name(src), exclusive, has_bias=False)
        if op in ACTIVATION_OPS:
            return Link("activation", f"{node_name(src)} ({op})", exclusive)
        if op in GLOBAL_POOL_OPS:
            return Link("global_pool", node_name(src), exclusive)
        if op in TRANSPARENT_OPS:
            cur = src
            while cur is not None and cur.op_type in TRANSPARENT_OPS and cur.input:
                cur = producer_of.get(cur.input[0])
            if cur is not None and cur.op_type in GLOBAL_POOL_OPS:
                return Link("global_pool", node_name(cur), exclusive)
        if op in NORM_OPS:
            return Link("norm", node_name(src), exclusive)
        return Link("other", f"{node_name(src)} ({op})", exclusive)

    def consumer(y: str) -> Link:
        users = users_of.get(y, [])
        if len(users) != 1:
            return Link("other", None, False if users else None)
        dst = users[0]
        if dst.op_type == "Conv":
            return Link("conv", node_name(dst), True, has_bias=len(dst.input) > 2)
        if dst.op_type in ("Gemm", "MatMul"):
            return Link("linear", node_name(dst), True)
        return Link("other", f"{node_name(dst)} ({dst.op_type})", True)

    layers: list[NormLayer] = []
    for node in graph.node:
        family = NORM_OPS.get(node.op_type)
        if family is None:
            continue
        ins = list(node.input) + [""] * 5
        outs = [o for o in node.output if o]
        x_shape = shapes.get(ins[0])
        record = NormLayer(
            name=node_name(node),
            family=family,
            type_name=f"onnx.{node.op_type}",
            weight=tensor(ins[1]),
            bias=tensor(ins[2]),
            eps=float(np.float32(_attr(node, "epsilon", 1e-5))),
            producer=producer(ins[0]),
            consumer=consumer(outs[0]) if outs else None,
            input_shape=x_shape[1:] if x_shape else None,
            convention="onnx",
            momentum_known=False,
        )
        if family == "batchnorm":
            record.running_mean, record.running_var = tensor(ins[3]), tensor(ins[4])
            # attributes are float32: round away the representation error (0.9f -> 0.1)
            record.momentum = round(1.0 - float(_attr(node, "momentum", 0.9)), 6)
            record.momentum_known = True
            record.training = bool(_attr(node, "training_mode", 0)) or len(outs) > 1
        if family == "groupnorm":
            record.num_groups = int(_attr(node, "num_groups", 0)) or None
            if x_shape is not None and len(x_shape) > 1:
                record.num_channels = x_shape[1]
            elif record.weight is not None and record.num_groups != record.weight.numel():
                record.num_channels = int(record.weight.numel())
        ref = record.running_mean if record.running_mean is not None else record.weight
        record.num_features = int(ref.numel()) if ref is not None else record.num_channels
        layers.append(record)
    return layers
