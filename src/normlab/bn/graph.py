"""Where each normalization layer sits in a model: what feeds it, what it feeds, its tensors.

The doctor, the folder and the converters all ask the same questions of a network: which layer
produces a norm's input (a conv? an activation? a global pooling?), whether that layer's output
goes anywhere else, and which conv/linear consumes the norm's output. This module answers them
once, in a format-neutral record (:class:`NormLayer` with its :class:`Link` s) that the PyTorch
analysis here, the ONNX reader and the Keras reader all produce, so every static check is written
once.

PyTorch graph discovery (:func:`analyze`):

1. ``torch.fx`` symbolic tracing, with every normalization layer (and anything BN-like, e.g.
   torchvision's ``FrozenBatchNorm2d``) kept as a leaf. Exact data flow: "conv output feeds only
   this BN" is ``len(node.users) == 1``.
2. If tracing fails (data-dependent control flow, unsupported ops) and an example input is
   available, forward hooks record which module's *output tensor object* is each norm's input.
   Functional uses of a tensor are invisible to hooks, so exclusivity is unknown (``None``) and
   the folder verifies each such fold numerically before keeping it.
3. Otherwise the norms are listed without links; checks that need the graph are skipped and
   the report says so.

Conventions: ``momentum`` in :class:`NormLayer` is always PyTorch's
(``running = (1 - m) * running + m * batch``); readers of Keras/ONNX files convert. Tensors are
CPU copies (float64 for statistics), so a record never aliases the model's buffers.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from normlab.models.modes import preserved_modes
from normlab.norms import FrozenBatchNorm

__all__ = [
    "Link",
    "ModelGraph",
    "NormLayer",
    "analyze",
    "bn_affine",
    "eval_mode",
    "is_bn_like",
    "norm_family",
    "norm_layers",
]

# ---- what kind of operation a node is ------------------------------------------------------

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Hardtanh,
    nn.Softsign,
    nn.LogSigmoid,
)
ACTIVATION_FUNCTIONS: frozenset[Any] = frozenset(
    {
        F.relu,
        F.relu_,
        torch.relu,
        torch.relu_,
        F.relu6,
        F.leaky_relu,
        F.leaky_relu_,
        F.gelu,
        F.silu,
        F.mish,
        F.elu,
        F.selu,
        F.celu,
        F.hardswish,
        F.hardsigmoid,
        F.hardtanh,
        F.softplus,
        F.prelu,
        torch.sigmoid,
        torch.tanh,
        F.sigmoid,
        F.tanh,
        torch.clamp,
        torch.clamp_min,
    }
)
ACTIVATION_METHODS = frozenset(
    {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min"}
)
# Elementwise functions of two tensors: the output has the larger rank (broadcasting).
BINARY_FUNCTIONS: frozenset[Any] = frozenset(
    {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul}
)
BINARY_METHODS = frozenset({"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"})
RANK_KEEPING_METHODS = frozenset(
    {"contiguous", "float", "double", "half", "to", "clone", "transpose", "transpose_"}
)
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Link:
    """One side of a norm layer: the operation that feeds it or the one its output reaches.

    ``kind``: ``conv`` | ``linear`` | ``activation`` | ``global_pool`` | ``norm`` | ``input`` |
    ``other``. ``name`` is the module's qualified name (or the op's name). ``exclusive``: for a
    producer, its output feeds only this norm; for a consumer, the norm's output reaches only it;
    ``None`` when unknown. ``through`` lists the affine-commuting ops between the norm and a
    consumer (``dropout``, ``identity``, ``flatten``, ``avg_pool``, ``max_pool``). ``rank``: for a
    consumer, the number of dims (batch included) of the tensor it receives, where the traced
    graph makes it certain (``_FxView.rank``); None when unknown.
    """

    kind: str
    name: str | None = None
    exclusive: bool | None = None
    has_bias: bool | None = None
    through: tuple[str, ...] = ()
    rank: int | None = None


@dataclass
class NormLayer:
    """A normalization layer as the checks see it, whatever file or framework it came from."""

    name: str
    family: str
    """``batchnorm`` | ``frozen_bn`` | ``groupnorm`` | ``layernorm`` | ``instancenorm`` | ``other``."""
    type_name: str
    num_features: int | None = None
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    eps: float | None = None
    momentum: float | None = None
    """PyTorch convention; None with ``momentum_known`` means a cumulative average."""
    momentum_known: bool = True
    num_batches_tracked: int | None = None
    training: bool | None = None
    """The layer's mode as stored with the model; None when the source does not record it."""
    track_running_stats: bool | None = True
    affine_frozen: bool | None = None
    """weight and bias exist and neither requires grad; None when unknown."""
    num_groups: int | None = None
    num_channels: int | None = None
    producer: Link | None = None
    consumer: Link | None = None
    input_shape: tuple[int, ...] | None = None
    """Per-sample shape of the layer's input (C, *spatial), when an example forward ran."""
    input_rank: int | None = None
    """Number of dims of the layer's input, batch included: from ``input_shape`` when an example
    forward ran, else from the traced graph where it is certain (a conv's output, a
    ``flatten(x, 1)``, a ``view``/``reshape`` with its sizes, ranks kept by elementwise ops);
    None when unknown. A ``Linear`` acts on the last dim while a BN normalises dim 1: they line
    up only on 2-d tensors."""
    calls: int = 1
    """How many times the graph calls this layer (a shared module is called more than once)."""
    convention: str = "torch"
    """Where the layer came from: ``torch``, ``keras`` or ``onnx`` (momentum is converted)."""

    @property
    def has_running_stats(self) -> bool:
        return self.running_mean is not None and self.running_var is not None


@dataclass
class ModelGraph:
    """The result of :func:`analyze`: every norm layer with its links, and how they were found."""

    layers: list[NormLayer]
    method: str
    """``fx`` (exact), ``hooks`` (one example forward; exclusivity unknown) or ``none``."""
    reason: str | None = None
    """Why the graph is not exact (the tracing error), when ``method != "fx"``."""
    module_calls: dict[str, int] = field(default_factory=dict)
    """Qualified module name -> times the graph calls it (fx only)."""

    def layer(self, name: str) -> NormLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


# ---- norm families ---------------------------------------------------------------------------


def is_bn_like(m: nn.Module) -> bool:
    """BatchNorm in any form with per-channel statistics: ``_BatchNorm`` subclasses, normlab's
    :class:`~normlab.norms.FrozenBatchNorm` and frozen BNs of other libraries (duck-typed:
    a class named ``*FrozenBatchNorm*`` with ``running_mean``/``running_var`` buffers)."""
    if isinstance(m, _BatchNorm | FrozenBatchNorm):
        return True
    return (
        "FrozenBatchNorm" in type(m).__name__
        and isinstance(getattr(m, "running_mean", None), Tensor)
        and isinstance(getattr(m, "running_var", None), Tensor)
    )


def norm_family(m: nn.Module) -> str | None:
    """The family of a normalization module, or None if ``m`` is not one."""
    if isinstance(m, _BatchNorm):
        return "batchnorm"
    if is_bn_like(m):
        return "frozen_bn"
    if isinstance(m, nn.GroupNorm):
        return "groupnorm"
    if isinstance(m, nn.LayerNorm):
        return "layernorm"
    if isinstance(m, _NormBase):  # InstanceNorm*d
        return "instancenorm"
    if isinstance(m, nn.LocalResponseNorm) or (
        hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm)
    ):
        return "other"
    return None


def bn_affine(m: nn.Module) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` per channel (float64) of a BN-like layer in eval mode:
    ``bn(x) = x * scale + shift`` with ``scale = gamma / sqrt(running_var + eps)``,
    ``shift = beta - running_mean * scale`` (gamma 1 and beta 0 when the layer has no affine)."""
    mean = m.running_mean
    var = m.running_var
    if not isinstance(mean, Tensor) or not isinstance(var, Tensor):
        raise ValueError(f"{type(m).__name__} has no running statistics")
    mean64, var64 = mean.detach().double(), var.detach().double()
    w = getattr(m, "weight", None)
    b = getattr(m, "bias", None)
    gamma = w.detach().double() if isinstance(w, Tensor) else torch.ones_like(mean64)
    beta = b.detach().double() if isinstance(b, Tensor) else torch.zeros_like(mean64)
    scale = gamma / torch.sqrt(var64 + float(getattr(m, "eps", 1e-5)))
    return scale, beta - mean64 * scale


def _copy(t: object) -> Tensor | None:
    if not isinstance(t, Tensor):
        return None
    return t.detach().to("cpu", torch.float64 if t.is_floating_point() else t.dtype).clone()


def _layer_record(name: str, m: nn.Module, family: str) -> NormLayer:
    weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
    affine_frozen: bool | None = None
    if isinstance(weight, nn.Parameter) and isinstance(bias, nn.Parameter):
        affine_frozen = not weight.requires_grad and not bias.requires_grad
    nbt = getattr(m, "num_batches_tracked", None)
    momentum = getattr(m, "momentum", None)
    eps = getattr(m, "eps", None)
    layer = NormLayer(
        name=name,
        family=family,
        type_name=type(m).__name__,
        num_features=getattr(m, "num_features", None),
        running_mean=_copy(getattr(m, "running_mean", None)),
        running_var=_copy(getattr(m, "running_var", None)),
        weight=_copy(weight),
        bias=_copy(bias),
        eps=float(eps) if isinstance(eps, int | float) else None,
        momentum=float(momentum) if isinstance(momentum, int | float) else None,
        momentum_known=family == "batchnorm",
        num_batches_tracked=int(nbt) if isinstance(nbt, Tensor) else None,
        training=m.training,
        track_running_stats=bool(getattr(m, "track_running_stats", family == "frozen_bn")),
        affine_frozen=affine_frozen,
        num_groups=getattr(m, "num_groups", None),
        num_channels=getattr(m, "num_channels", None),
    )
    if layer.num_features is None and layer.running_mean is not None:
        layer.num_features = int(layer.running_mean.numel())
    if family == "groupnorm" and layer.num_features is None:
        layer.num_features = layer.num_channels
    return layer


# ---- mode handling -------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module of ``model`` in eval mode; restore each module's own flag afterwards."""
    with preserved_modes(model):
        model.eval()
        yield model


# ---- fx analysis ---------------------------------------------------------------------------


class _NormLeafTracer(fx.Tracer):
    """Keeps every norm (and BN-like) module a leaf, so its calls appear as call_module nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if norm_family(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _arg0(node: fx.Node) -> Any:
    if node.args:
        return node.args[0]
    return node.kwargs.get("input", node.kwargs.get("x"))


def _is_global_pool_module(m: nn.Module) -> bool:
    if isinstance(m, nn.AdaptiveAvgPool1d | nn.AdaptiveAvgPool2d | nn.AdaptiveAvgPool3d):
        size = m.output_size
        sizes = size if isinstance(size, tuple | list) else (size,)
        return all(s == 1 for s in sizes)
    if isinstance(m, nn.AdaptiveMaxPool1d | nn.AdaptiveMaxPool2d | nn.AdaptiveMaxPool3d):
        size = m.output_size
        sizes = size if isinstance(size, tuple | list) else (size,)
        return all(s == 1 for s in sizes)
    return False


def _int_arg(node: fx.Node, index: int, key: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def _spatial_dims(dims: Any) -> bool:
    """True if a ``mean(dim=...)`` reduces only spatial dims of (N, C, *): every dim >= 2, or
    exactly the last two given as negative indices (``x.mean((-2, -1))``)."""
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, tuple | list) or not dims:
        return False
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return False
    return all(d >= 2 for d in dims) or sorted(dims) == [-2, -1]


class _FxView:
    """Classification of fx nodes for one traced graph."""

    def __init__(self, gm: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
        self.gm = gm
        self.modules = modules

    def module(self, node: fx.Node) -> nn.Module | None:
        if node.op == "call_module":
            return self.modules.get(str(node.target))
        return None

    def kind(self, node: fx.Node) -> str:
        """conv | linear | activation | global_avg_pool | global_max_pool | norm | input |
        transparent:<op> (dropout, identity, flatten, avg_pool, max_pool) | other."""
        if node.op == "placeholder":
            return "input"
        m = self.module(node)
        if m is not None:
            if isinstance(m, CONV_MODULES):
                return "conv"
            if isinstance(m, nn.Linear):
                return "linear"
            if norm_family(m) is not None:
                return "norm"
            if isinstance(m, ACTIVATION_MODULES):
                return "activation"
            if _is_global_pool_module(m):
                is_max = isinstance(
                    m, nn.AdaptiveMaxPool1d | nn.AdaptiveMaxPool2d | nn.AdaptiveMaxPool3d
                )
                return "global_max_pool" if is_max else "global_avg_pool"
            if isinstance(m, DROPOUT_MODULES):
                return "transparent:dropout"
            if isinstance(m, nn.Identity):
                return "transparent:identity"
            if isinstance(m, nn.Flatten):
                return "transparent:flatten" if m.start_dim == 1 else "other"
            if isinstance(m, nn.AdaptiveAvgPool1d | nn.AdaptiveAvgPool2d | nn.AdaptiveAvgPool3d):
                return "transparent:avg_pool"
            if isinstance(m, nn.AvgPool1d | nn.AvgPool2d | nn.AvgPool3d):
                pad = m.padding
                pads = pad if isinstance(pad, tuple | list) else (pad,)
                no_pad = all(p == 0 for p in pads) or not m.count_include_pad
                ok = no_pad and not m.ceil_mode and getattr(m, "divisor_override", None) is None
                return "transparent:avg_pool" if ok else "other"
            if isinstance(m, nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d):
                return "transparent:max_pool"
            return "other"
        if node.op == "call_function":
            fn = node.target
            if fn in ACTIVATION_FUNCTIONS:
                return "activation"
            if fn in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d):
                size = _int_arg(node, 1, "output_size", None)
                sizes = size if isinstance(size, tuple | list) else (size,)
                return "global_avg_pool" if all(s == 1 for s in sizes) else "transparent:avg_pool"
            if fn is torch.flatten:
                start = _int_arg(node, 1, "start_dim", 0)
                return "transparent:flatten" if start == 1 else "other"
            if fn in (F.dropout, F.dropout2d, F.dropout1d, F.dropout3d):
                return "transparent:dropout"
            if fn is torch.mean:
                dims = _int_arg(node, 1, "dim", None)
                return "global_avg_pool" if _spatial_dims(dims) else "other"
            return "other"
        if node.op == "call_method":
            name = str(node.target)
            if name in ACTIVATION_METHODS:
                return "activation"
            if name == "flatten":
                start = _int_arg(node, 1, "start_dim", 0)
                return "transparent:flatten" if start == 1 else "other"
            if name == "mean":
                dims = _int_arg(node, 1, "dim", None)
                return "global_avg_pool" if _spatial_dims(dims) else "other"
            return "other"
        return "other"

    def rank(self, node: Any, depth: int = 0) -> int | None:
        """The number of dims of ``node``'s value (batch included) where the graph makes it
        certain; None when it does not (a graph input, an op not modelled here)."""
        if not isinstance(node, fx.Node) or depth > 200:
            return None
        kind = self.kind(node)
        m = self.module(node)
        if isinstance(m, CONV_MODULES):
            return len(m.kernel_size) + 2  # the BN after it needs a batch: (N, C, *spatial)
        if node.op == "call_module" and isinstance(m, nn.Flatten):
            return 2 if m.start_dim == 1 and m.end_dim == -1 else None
        if node.target is torch.flatten or (node.op == "call_method" and node.target == "flatten"):
            return self._flattened_rank(node, depth)
        if node.op == "call_method" and node.target == "permute":
            dims = node.args[1:]
            if len(dims) == 1 and isinstance(dims[0], tuple | list):
                dims = tuple(dims[0])
            return len(dims) if dims and all(isinstance(d, int) for d in dims) else None
        if kind in ("global_avg_pool", "global_max_pool") and node.op != "call_module":
            return self._reduced_rank(node, depth)
        if node.op == "call_method" and str(node.target) in ("view", "reshape"):
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], tuple | list):
                sizes = tuple(sizes[0])
            elif len(sizes) == 1 and isinstance(sizes[0], fx.Node):
                return None  # one traced value: a whole shape or a single size, unknown here
            return len(sizes) if sizes else None
        if node.target in BINARY_FUNCTIONS or (
            node.op == "call_method" and str(node.target) in BINARY_METHODS
        ):
            ranks = [self.rank(a, depth + 1) for a in node.args[:2] if isinstance(a, fx.Node)]
            if not ranks or any(r is None for r in ranks):
                return None
            return max(r for r in ranks if r is not None)
        keeps = kind in ("linear", "norm", "activation") or kind.startswith("transparent:")
        keeps = keeps or kind in ("global_avg_pool", "global_max_pool")  # pooling modules keep dims
        keeps = keeps or (node.op == "call_method" and str(node.target) in RANK_KEEPING_METHODS)
        return self.rank(_arg0(node), depth + 1) if keeps else None

    def _flattened_rank(self, node: fx.Node, depth: int) -> int | None:
        """Rank after ``flatten(x, start_dim, end_dim)``: 2 for ``start_dim=1`` to the end,
        otherwise from the input's rank."""
        start, end = _int_arg(node, 1, "start_dim", 0), _int_arg(node, 2, "end_dim", -1)
        if not isinstance(start, int) or not isinstance(end, int):
            return None
        if start == 1 and end == -1:
            return 2
        rank = self.rank(_arg0(node), depth + 1)
        if rank is None:
            return None
        start, end = start % rank, end % rank
        return rank - (end - start) if end >= start else None

    def _reduced_rank(self, node: fx.Node, depth: int) -> int | None:
        """Rank after ``mean(dims)`` (or a functional adaptive pool, which keeps dims)."""
        rank = self.rank(_arg0(node), depth + 1)
        if rank is None or node.target not in (torch.mean, "mean"):
            return rank
        dims = _int_arg(node, 1, "dim", None)
        keepdim = _int_arg(node, 2, "keepdim", False)
        return rank if keepdim else rank - (1 if isinstance(dims, int) else len(dims))

    def producer(self, node: fx.Node) -> Link:
        src = _arg0(node)
        if not isinstance(src, fx.Node):
            return Link("other")
        kind = self.kind(src)
        exclusive = len(src.users) == 1
        if kind in ("conv", "linear"):
            m = self.module(src)
            has_bias = getattr(m, "bias", None) is not None
            return Link(kind, str(src.target), exclusive, has_bias=has_bias)
        if kind.startswith("global_"):
            return Link("global_pool", _node_name(src), exclusive)
        if kind.startswith("transparent:"):
            # BN after flatten(global pool(x)) normalises pooled features: look through.
            cur: Any = src
            while isinstance(cur, fx.Node) and self.kind(cur).startswith("transparent:"):
                cur = _arg0(cur)
            if isinstance(cur, fx.Node) and self.kind(cur).startswith("global_"):
                return Link("global_pool", _node_name(cur), exclusive)
            return Link("other", _node_name(src), exclusive)
        if kind == "activation":
            return Link("activation", _node_name(src), exclusive)
        if kind == "norm":
            return Link("norm", str(src.target), exclusive)
        if kind == "input":
            return Link("input", src.name, exclusive)
        return Link("other", _node_name(src), exclusive)

    def consumer(self, node: fx.Node) -> Link:
        """Follow the norm's output through single-user affine-commuting ops to a conv/linear."""
        through: list[str] = []
        cur = node
        while True:
            users = list(cur.users)
            if len(users) != 1:
                return Link("other", None, False, through=tuple(through))
            nxt = users[0]
            if _arg0(nxt) is not cur:
                return Link("other", _node_name(nxt), True, through=tuple(through))
            kind = self.kind(nxt)
            if kind == "global_avg_pool":
                kind = "transparent:avg_pool"
            elif kind == "global_max_pool":
                kind = "transparent:max_pool"
            if kind.startswith("transparent:"):
                through.append(kind.split(":", 1)[1])
                cur = nxt
                continue
            if kind in ("conv", "linear"):
                m = self.module(nxt)
                return Link(
                    kind,
                    str(nxt.target),
                    True,
                    has_bias=getattr(m, "bias", None) is not None,
                    through=tuple(through),
                    rank=self.rank(cur),
                )
            return Link(kind, _node_name(nxt), True, through=tuple(through))


def _node_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _NormLeafTracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph)


def _module_calls(gm: fx.GraphModule) -> dict[str, int]:
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        elif node.op == "get_attr":
            # A parameter read outside its module (functional use): the module is not alone.
            owner = str(node.target).rsplit(".", 1)[0]
            calls[owner] = calls.get(owner, 0) + 1
    return calls


# ---- hook-based fallback ---------------------------------------------------------------------


def _hook_links(
    model: nn.Module, example_input: Tensor | Sequence[Tensor]
) -> tuple[dict[str, Link], dict[str, Link]]:
    """Producer and consumer links from one eval forward, matching tensor objects."""
    names = {m: n for n, m in model.named_modules()}
    leaves = [m for m in model.modules() if not list(m.children()) or norm_family(m)]
    events: list[tuple[nn.Module, tuple[Any, ...], Any]] = []
    handles = []

    def hook(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        events.append((m, args, out))

    try:
        for m in leaves:
            handles.append(m.register_forward_hook(hook))
        with eval_mode(model), torch.no_grad():
            _call(model, example_input)
    finally:
        for h in handles:
            h.remove()
    producers: dict[str, Link] = {}
    consumers: dict[str, Link] = {}
    for i, (m, args, out) in enumerate(events):
        if norm_family(m) is None or not args or not isinstance(args[0], Tensor):
            continue
        name = names[m]
        x = args[0]
        src = None
        for pm, _, pout in reversed(events[:i]):
            if pout is x:
                src = pm
                break
        if src is None:
            producers[name] = Link("other", None, None)
        elif isinstance(src, (*CONV_MODULES, nn.Linear)):
            kind = "conv" if isinstance(src, CONV_MODULES) else "linear"
            producers[name] = Link(kind, names[src], None, has_bias=src.bias is not None)
        elif isinstance(src, ACTIVATION_MODULES):
            producers[name] = Link("activation", names[src], None)
        elif _is_global_pool_module(src):
            producers[name] = Link("global_pool", names[src], None)
        else:
            producers[name] = Link("other", names[src], None)
        users = [um for um, uargs, _ in events[i + 1 :] if uargs and uargs[0] is out]
        if len(users) == 1 and isinstance(users[0], (*CONV_MODULES, nn.Linear)):
            kind = "conv" if isinstance(users[0], CONV_MODULES) else "linear"
            consumers[name] = Link(kind, names[users[0]], None, has_bias=users[0].bias is not None)
        else:
            consumers[name] = Link("other", None, None)
    return producers, consumers


def _call(model: nn.Module, example_input: Tensor | Sequence[Tensor]) -> Any:
    if isinstance(example_input, Tensor):
        return model(example_input)
    return model(*example_input)


def input_shapes(
    model: nn.Module, example_input: Tensor | Sequence[Tensor]
) -> dict[str, tuple[int, ...]]:
    """Per-sample input shape ``(C, *spatial)`` of every norm layer in one eval forward
    (all modes restored afterwards, no statistics updated)."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def pre_hook(name: str) -> Any:
        def record(m: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], Tensor) and name not in shapes:
                shapes[name] = tuple(int(s) for s in args[0].shape[1:])

        return record

    try:
        for name, m in model.named_modules():
            if norm_family(m) is not None:
                handles.append(m.register_forward_pre_hook(pre_hook(name)))
        with eval_mode(model), torch.no_grad():
            _call(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return shapes


# ---- public entry points -------------------------------------------------------------------


def norm_layers(model: nn.Module) -> list[NormLayer]:
    """Every normalization layer of ``model`` (named_modules order), without links."""
    out = []
    for name, m in model.named_modules():
        family = norm_family(m)
        if family is not None:
            out.append(_layer_record(name, m, family))
    return out


def analyze(model: nn.Module, example_input: Tensor | Sequence[Tensor] | None = None) -> ModelGraph:
    """Norm layers of ``model`` with producer/consumer links (see the module docstring).

    With ``example_input`` (a batch the model accepts), each layer's per-sample input shape is
    recorded too (one eval-mode forward; every module's mode is restored, no statistics move).
    """
    layers = norm_layers(model)
    by_name = {layer.name: layer for layer in layers}
    method, reason = "fx", None
    calls: dict[str, int] = {}
    try:
        gm = _trace(model)
    except Exception as exc:  # any tracing failure means "use the fallback"
        gm = None
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if gm is not None:
        modules = dict(gm.named_modules())
        view = _FxView(gm, modules)
        calls = _module_calls(gm)
        for node in gm.graph.nodes:
            if node.op != "call_module" or str(node.target) not in by_name:
                continue
            layer = by_name[str(node.target)]
            layer.producer = view.producer(node)
            layer.consumer = view.consumer(node)
            layer.input_rank = view.rank(_arg0(node))
        for layer in layers:
            layer.calls = calls.get(layer.name, 0)
    elif example_input is not None:
        method = "hooks"
        try:
            producers, consumers = _hook_links(model, example_input)
        except Exception as exc:
            method = "none"
            reason = f"{reason}; example forward failed too ({type(exc).__name__}: {exc})"
        else:
            for layer in layers:
                layer.producer = producers.get(layer.name)
                layer.consumer = consumers.get(layer.name)
    else:
        method = "none"
    if example_input is not None and method != "none":
        with contextlib.suppress(Exception):
            for name, shape in input_shapes(model, example_input).items():
                by_name[name].input_shape = shape
                by_name[name].input_rank = len(shape) + 1
    return ModelGraph(layers, method, reason, calls)
