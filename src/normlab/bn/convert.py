"""Exact conversions of a model's normalization layers.

Each function changes ``model`` **in place** and returns it (the root itself may be replaced when
it is a norm layer, so use the return value, as with ``nn.SyncBatchNorm.convert_sync_batchnorm``).
Each appends one line per change to ``report`` when a list is passed.

* :func:`keras_to_torch_conventions`: a momentum written in Keras' convention (``moving = m *
  moving + (1 - m) * batch``, default 0.99) in a PyTorch layer, where it means the opposite,
  becomes PyTorch's ``1 - m``. Only values > ``threshold`` (0.5) are converted by default: a
  PyTorch momentum that large is almost surely a Keras one. eps is kept: it means the same in both
  frameworks (added to the variance), and ported weights were trained with Keras' 1e-3.
  :func:`torch_momentum` / :func:`keras_momentum` convert single values.
* :func:`sync_to_batchnorm`: ``SyncBatchNorm`` (torch's or normlab's CPU-capable one) ->
  ``BatchNorm1d/2d/3d`` (the type it was converted from when recorded, else chosen from the conv
  or linear that feeds it, or from an example input), same state, for single-device inference
  and export.
* :func:`reduce_ranks`: one state_dict from the per-rank state_dicts of a multi-process run
  whose BN statistics stayed per rank: running means and variances averaged over ranks
  (``dist_bn=reduce`` after the fact), everything else required to be equal.
* :func:`to_frozen_batchnorm`: every ``_BatchNorm`` with running statistics ->
  :class:`~normlab.norms.FrozenBatchNorm` (buffers only, mode-independent) for fine-tuning
  with frozen BN. Eval outputs are unchanged; train mode no longer uses batch statistics.
* :func:`remove_bias_before_bn`: a conv/linear bias that a BN directly follows is redundant; it
  is removed and folded into the BN's running mean (``running_mean -= bias``), which leaves eval
  outputs unchanged exactly (up to rounding) and train outputs unchanged too (the batch mean
  absorbs a constant).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.bn.graph import CONV_MODULES, analyze, input_shapes
from normlab.bn.load import require_same_keys
from normlab.errors import DataError, NormlabError
from normlab.norms import FrozenBatchNorm
from normlab.norms.swap import rebuild_batchnorm, swap_modules
from normlab.norms.sync import SyncBatchNorm as NormlabSyncBatchNorm

__all__ = [
    "keras_momentum",
    "keras_to_torch_conventions",
    "reduce_ranks",
    "remove_bias_before_bn",
    "sync_to_batchnorm",
    "to_frozen_batchnorm",
    "torch_momentum",
]


def torch_momentum(keras: float) -> float:
    """PyTorch momentum equivalent to Keras momentum ``keras`` (``1 - keras``)."""
    return round(1.0 - float(keras), 12)


def keras_momentum(torch_value: float) -> float:
    """Keras momentum equivalent to PyTorch momentum ``torch_value`` (``1 - torch_value``)."""
    return round(1.0 - float(torch_value), 12)


def _note(report: list[str] | None, line: str) -> None:
    if report is not None:
        report.append(line)


def keras_to_torch_conventions(
    model: nn.Module, *, threshold: float = 0.5, report: list[str] | None = None
) -> nn.Module:
    """Convert every BN momentum above ``threshold`` from Keras' convention to PyTorch's."""
    if not 0.0 <= threshold < 1.0:
        raise NormlabError(f"threshold must be in [0, 1), got {threshold}")
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and m.momentum is not None and m.momentum > threshold:
            new = torch_momentum(m.momentum)
            _note(
                report, f"{name or '<root>'}: momentum {m.momentum:g} (Keras) -> {new:g} (PyTorch)"
            )
            m.momentum = new
    return model


def _bn_class_for(name: str, model: nn.Module, dims: dict[str, int]) -> type[_BatchNorm]:
    nd = dims.get(name)
    if nd is not None:
        return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(
            nd, nn.BatchNorm2d
        )
    return nn.BatchNorm2d


def _recorded_type(sync: nn.Module) -> type[_BatchNorm] | None:
    """The plain BN class ``sync`` was converted from, when the converter recorded it.

    normlab's converter sets ``original_type`` on each instance (the class attribute is only a
    default, so a layer built directly says nothing); mmcv/timm-style converters that set the same
    attribute on torch's ``SyncBatchNorm`` are honoured too. Anything that is not a plain
    (non-synchronised) ``_BatchNorm`` subclass is ignored.
    """
    recorded = vars(sync).get("original_type")
    if (
        isinstance(recorded, type)
        and issubclass(recorded, _BatchNorm)
        and not issubclass(recorded, nn.SyncBatchNorm | NormlabSyncBatchNorm)
    ):
        return recorded
    return None


def sync_to_batchnorm(
    model: nn.Module,
    example_input: Tensor | Sequence[Tensor] | None = None,
    *,
    report: list[str] | None = None,
) -> nn.Module:
    """Replace every SyncBatchNorm -- ``nn.SyncBatchNorm`` or normlab's
    :class:`normlab.norms.sync.SyncBatchNorm` -- by the plain BatchNorm of its input's rank.

    The class is, in order: the one the layer was converted from when it records it
    (``original_type``, set by :func:`normlab.norms.sync.convert_sync_batchnorm`); the input
    rank seen on ``example_input`` (a forward records each layer's input); the layer feeding it
    (Conv1d/Linear -> BatchNorm1d, Conv2d -> 2d, Conv3d -> 3d); else BatchNorm2d. Parameters,
    buffers, momentum, eps, ``requires_grad``, device, dtype and the train/eval mode carry over
    (:func:`normlab.norms.swap.rebuild_batchnorm`, the same as for the conversion to SyncBN),
    so eval outputs are unchanged (and train outputs too, in a single process). A layer shared
    by several parents becomes one BatchNorm that they share.
    """
    syncs = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.SyncBatchNorm | NormlabSyncBatchNorm)
    ]
    if not syncs:
        return model
    dims: dict[str, int] = {}
    if all(_recorded_type(m) is not None for _, m in syncs):
        pass  # every layer says what it was: no forward or trace needed
    elif example_input is not None:
        dims = {n: len(s) + 1 for n, s in input_shapes(model, example_input).items()}
    else:
        graph = analyze(model)
        for layer in graph.layers:
            p = layer.producer
            if p is not None and p.kind in ("conv", "linear") and p.name is not None:
                src = model.get_submodule(p.name)
                if isinstance(src, nn.Linear | nn.Conv1d):
                    dims[layer.name] = 2 if isinstance(src, nn.Linear) else 3
                elif isinstance(src, CONV_MODULES):
                    dims[layer.name] = 4 if isinstance(src, nn.Conv2d) else 5

    def to_plain(name: str, sync: nn.Module) -> nn.Module | None:
        if not isinstance(sync, nn.SyncBatchNorm | NormlabSyncBatchNorm):
            return None
        recorded = _recorded_type(sync)
        cls = recorded if recorded is not None else _bn_class_for(name, model, dims)
        kind = "SyncBatchNorm" if isinstance(sync, nn.SyncBatchNorm) else "normlab SyncBatchNorm"
        how = " (recorded original type)" if recorded is not None else ""
        plain = rebuild_batchnorm(sync, cls)
        _note(report, f"{name or '<root>'}: {kind} -> {cls.__name__}{how}")
        return plain

    return swap_modules(model, to_plain)


def to_frozen_batchnorm(model: nn.Module, *, report: list[str] | None = None) -> nn.Module:
    """Replace every BN with running statistics by a :class:`~normlab.norms.FrozenBatchNorm`
    holding its current statistics and affine (eval outputs unchanged)."""

    def to_frozen(name: str, bn: nn.Module) -> nn.Module | None:
        if not isinstance(bn, _BatchNorm) or bn.running_mean is None or bn.running_var is None:
            return None
        frozen = FrozenBatchNorm.from_batchnorm(bn)
        _note(report, f"{name or '<root>'}: {type(bn).__name__} -> FrozenBatchNorm")
        return frozen

    model = swap_modules(model, to_frozen)
    skipped = [
        n
        for n, m in model.named_modules()
        if isinstance(m, _BatchNorm) and (m.running_mean is None or m.running_var is None)
    ]
    for name in skipped:
        _note(report, f"{name}: left as is (track_running_stats=False: nothing to freeze)")
    return model


def remove_bias_before_bn(model: nn.Module, *, report: list[str] | None = None) -> nn.Module:
    """Drop every conv/linear bias that a BN directly (and exclusively) follows, folding it into
    the BN's running mean. Needs a traceable model (torch.fx)."""
    graph = analyze(model)
    if graph.method != "fx":
        raise NormlabError(
            f"remove_bias_before_bn needs the exact graph, but torch.fx cannot trace the model "
            f"({graph.reason})"
        )
    for layer in graph.layers:
        p = layer.producer
        if (
            layer.family != "batchnorm"
            or p is None
            or p.kind not in ("conv", "linear")
            or not p.has_bias
            or not p.exclusive
            or p.name is None
            or graph.module_calls.get(p.name, 1) != 1
            or layer.calls != 1
        ):
            continue
        bn = model.get_submodule(layer.name)
        src = model.get_submodule(p.name)
        if not isinstance(bn, _BatchNorm) or bn.running_mean is None:
            continue
        bias = src.bias
        if not isinstance(bias, Tensor) or bias.shape != bn.running_mean.shape:
            continue
        with torch.no_grad():
            bn.running_mean.sub_(bias.detach().to(bn.running_mean.dtype))
        src.register_parameter("bias", None)
        _note(report, f"{p.name}: bias removed, folded into {layer.name}.running_mean")
    return model


def _running_stat(key: str) -> bool:
    """Whether a state_dict key is a BN running mean or variance."""
    return key.rpartition(".")[2] in ("running_mean", "running_var")


def _same(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality that counts NaN == NaN (a NaN shared by all ranks is not a disagreement)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def reduce_ranks(
    state_dicts: Sequence[Mapping[str, Tensor]], *, names: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """One state_dict from the per-rank state_dicts of a multi-process run: what
    ``dist_bn=reduce`` would have saved.

    Every BN ``running_mean`` / ``running_var`` (keys ending so) becomes the mean over ranks,
    computed in float64 and stored in the original dtype and device of rank 0's tensor -- the
    same as averaging the buffers with an all-reduce before saving. Every other entry (parameters,
    ``num_batches_tracked``, other buffers) must be identical on all ranks, as DDP keeps them; it
    is taken from the first state_dict. Keys keep their order from the first state_dict.

    Raises:
        NormlabError: fewer than two state_dicts, or ``names`` of the wrong length.
        DataError: a key missing from a rank, shapes that differ, or a non-statistics entry
            that differs between ranks (the message names the key and the ranks).
    """
    if len(state_dicts) < 2:
        raise NormlabError(
            f"reduce-ranks needs at least 2 state_dicts (one per rank), got {len(state_dicts)}"
        )
    labels = list(names) if names is not None else [f"rank{i}" for i in range(len(state_dicts))]
    if len(labels) != len(state_dicts):
        raise NormlabError(f"{len(labels)} names for {len(state_dicts)} state_dicts")
    first = state_dicts[0]
    require_same_keys(state_dicts, labels, "reduce-ranks", "are these ranks of the same model?")
    out: dict[str, Tensor] = {}
    for key, ref in first.items():
        values = [state[key] for state in state_dicts]
        if not all(isinstance(v, Tensor) for v in values):
            if any(v != ref for v in values[1:]):
                raise DataError(f"reduce-ranks: entry {key!r} differs between ranks")
            out[key] = ref
            continue
        for label, v in zip(labels[1:], values[1:], strict=True):
            if v.shape != ref.shape:
                raise DataError(
                    f"reduce-ranks: {key!r} has shape {tuple(v.shape)} in {label} but "
                    f"{tuple(ref.shape)} in {labels[0]}"
                )
        if _running_stat(key) and ref.is_floating_point():
            mean = torch.stack([v.detach().cpu().double() for v in values]).mean(0)
            out[key] = mean.to(dtype=ref.dtype, device=ref.device)
            continue
        for label, v in zip(labels[1:], values[1:], strict=True):
            if not _same(v.detach().cpu(), ref.detach().cpu()):
                raise DataError(
                    f"reduce-ranks: {key!r} differs between {labels[0]} and {label}; only BN "
                    "running_mean/running_var may differ between ranks (parameters that differ "
                    "mean DDP was not synchronising, or the files come from different steps)"
                )
        out[key] = ref
    return out
