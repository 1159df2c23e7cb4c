"""The doctor's static checks: one registered function per finding id.

They read the :class:`~normlab.bn.graph.NormLayer` records (from a live model, a state_dict, an
ONNX or a Keras file) and a :class:`~normlab.bn.checks.CheckContext`, never the model itself, so
each is written once for every format. :func:`static_findings` runs them: the layer checks in
table order for each layer, then the model checks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from normlab.bn.checks import BN_FAMILIES, CheckContext, all_checks, check
from normlab.bn.findings import Finding
from normlab.bn.graph import NormLayer

__all__ = ["at_init", "broken_fields", "initial_layers", "layer_broken", "static_findings"]


def static_findings(ctx: CheckContext) -> list[Finding]:
    """Every layer check on every layer it applies to, then every model check."""
    out: list[Finding] = []
    layer_checks = all_checks("layer")
    for layer in ctx.layers:
        broken = layer.family in BN_FAMILIES and bool(layer_broken(ctx, layer))
        for c in layer_checks:
            if layer.family in c.families and (c.on_broken or not broken) and c.run is not None:
                out.extend(c.run(layer, ctx))
    for c in all_checks("model"):
        if c.run is not None:
            out.extend(c.run(ctx))
    return out


# ---- helpers ---------------------------------------------------------------------------------


def _finite(t: Tensor | None) -> bool:
    return t is None or bool(torch.isfinite(t).all())


def _negative_var(layer: NormLayer) -> bool:
    v = layer.running_var
    return v is not None and bool((v < 0).nan_to_num(False).any())


def broken_fields(layer: NormLayer) -> list[str]:
    """The non-finite tensors of a layer, and ``negative running_var``."""
    fields = [
        f"non-finite {name}"
        for name, t in (
            ("running_mean", layer.running_mean),
            ("running_var", layer.running_var),
            ("weight", layer.weight),
            ("bias", layer.bias),
        )
        if not _finite(t)
    ]
    return [*fields, "negative running_var"] if _negative_var(layer) else fields


def layer_broken(ctx: CheckContext, layer: NormLayer) -> list[str]:
    """:func:`broken_fields` of ``layer``, computed once per context."""
    found: dict[int, list[str]] = ctx.memo("broken_fields", dict)
    if id(layer) not in found:
        found[id(layer)] = broken_fields(layer)
    return found[id(layer)]


def at_init(layer: NormLayer) -> bool:
    """Running mean exactly 0 and running var exactly 1 (a BN's initial statistics)."""
    m, v = layer.running_mean, layer.running_var
    if m is None or v is None:
        return False
    return bool((m == 0).all()) and bool((v == 1).all())


def initial_layers(ctx: CheckContext) -> list[NormLayer]:
    """BN layers that track statistics, are finite, and hold the initial ones (computed once
    per context: several model checks ask)."""
    return ctx.memo(
        "initial_layers",
        lambda: [
            layer
            for layer in ctx.layers
            if layer.family == "batchnorm"
            and layer.track_running_stats is not False
            and at_init(layer)
            and not layer_broken(ctx, layer)
        ],
    )


def _spatial(layer: NormLayer) -> int | None:
    shape = layer.input_shape
    if shape is None:
        return None
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return n


def _torch_momentum(layer: NormLayer) -> float | None:
    if layer.family != "batchnorm" or layer.convention != "torch" or not layer.momentum_known:
        return None
    return layer.momentum


# ---- layer checks: statistics ----------------------------------------------------------------


@check(
    "bn-stats-nonfinite",
    "error",
    "NaN/Inf or negative statistics",
    "NaN/Inf in statistics or affine, or a negative variance",
    kind="layer",
    on_broken=True,
)
def nonfinite(layer: NormLayer, ctx: CheckContext) -> Iterator[Finding]:
    bad = layer_broken(ctx, layer)
    if not bad:
        return
    fields = [b.removeprefix("non-finite ") for b in bad if b.startswith("non-finite ")]
    stats_only = all(b in ("running_mean", "running_var") for b in fields)
    yield Finding(
        "bn-stats-nonfinite",
        "error",
        layer.name,
        f"{', '.join(bad)}: every output of the layer in eval mode is NaN or garbage "
        "(typical after an fp16/AMP overflow or a diverged step)",
        f"recompute the statistics: {ctx.recalibrate_fix(layer)}"
        if stats_only
        else "the learned weights themselves are broken: restore an earlier "
        "checkpoint (recalibration cannot fix NaN parameters)",
        fixable=stats_only and layer.convention == "torch",
        evidence={"fields": fields, "negative_var": _negative_var(layer)},
    )


@check(
    "bn-momentum-keras",
    "warning",
    "momentum in Keras' convention",
    'PyTorch momentum > 0.5: a Keras momentum (0.99) typed into PyTorch, where it means "keep 1%"',
    kind="layer",
)
def momentum_keras(layer: NormLayer, ctx: CheckContext) -> Iterator[Finding]:
    m = _torch_momentum(layer)
    if m is None or m <= 0.5:
        return
    yield Finding(
        "bn-momentum-keras",
        "warning",
        layer.name,
        f"momentum={m:g} in PyTorch's convention keeps only {1 - m:.0%} of the "
        f"running average per batch: this is Keras' momentum ({m:g} there "
        f"means PyTorch {1 - m:.2g}); the statistics track the last few "
        "batches only",
        f"set momentum to {1 - m:.2g}: normlab convert IN OUT --op keras-momentum",
        fixable=True,
        evidence={"momentum": m},
    )


@check(
    "bn-momentum-zero",
    "warning",
    "momentum 0",
    "momentum 0: running statistics never move",
    kind="layer",
)
def momentum_zero(layer: NormLayer, ctx: CheckContext) -> Iterator[Finding]:
    if _torch_momentum(layer) != 0:
        return
    yield Finding(
        "bn-momentum-zero",
        "warning",
        layer.name,
        "momentum=0: training never updates the running statistics, so eval "
        "mode uses whatever they hold now (their initial values, unless they "
        "were recalibrated)",
        "set momentum > 0 (e.g. 0.1; --set norm.bn_momentum=0.1 for a normlab "
        f"run) before training further; recompute the statistics: {ctx.recalibrate_fix(layer)}",
        fixable=False,
    )


@check(
    "bn-eps-keras",
    "info",
    "Keras' default eps",
    "eps 1e-3, Keras' default, in a PyTorch layer: likely a port",
    kind="layer",
)
def eps_keras(layer: NormLayer, ctx: CheckContext) -> Iterator[Finding]:
    if layer.family != "batchnorm" or layer.convention != "torch" or not layer.momentum_known:
        return
    m = layer.momentum
    if layer.eps is None or not math.isclose(layer.eps, 1e-3) or (m is not None and m > 0.5):
        return
    yield Finding(
        "bn-eps-keras",
        "info",
        layer.name,
        "eps=1e-3 is Keras' default (PyTorch's is 1e-5): fine for weights "
        "ported from Keras, which were trained with it; otherwise check the port",
        "keep it for Keras-trained weights; for PyTorch training use 1e-5",
        fixable=False,
        evidence={"eps": layer.eps},
    )


# ---- layer checks: mode ----------------------------------------------------------------------


@check(
    "bn-batch-stats-eval",
    "error",
    "batch statistics at inference (track_running_stats=False)",
    "``track_running_stats=False``: batch statistics even in eval",
    kind="layer",
)
def batch_stats_eval(layer: NormLayer, ctx: CheckContext) -> Iterator[Finding]:
    if layer.family != "batchnorm" or layer.track_running_stats is not False:
        return
    yield Finding(
        "bn-batch-stats-eval",
        "error",
        layer.name,
        "track_running_stats=False: the layer normalises with the statistics of "
        "the current batch even in eval mode, so a prediction depends on the other "
        "samples in its batch (and fails for batch size 1)",
        "rebuild the layer with track_running_stats=True and recalibrate it, or "
        "use a batch-independent norm (GroupNorm)",
        fixable=False,
    )


@check(
    "bn-train-mode",
    "error",
    "batch norm in training mode at inference",
    "BN in training mode at inference: a sample's output depends on the rest of its batch "
    "(confirmed dynamically when possible)",
    kind="layer",
)
def train_mode(layer: NormLayer, ctx: CheckContext) -> Iterator[Finding]:
    if not (ctx.context == "inference" and ctx.mode_recorded and layer.training):
        return
    if layer.family != "batchnorm":
        return
    yield Finding(
        "bn-train-mode",
        "error",
        layer.name,
        "the layer is in training mode: at inference it normalises each batch with "
        "that batch's statistics (a sample's output depends on its batch-mates) "
        "and keeps updating its running statistics",
        "call model.eval() before inference",
        fixable=False,
    )


@check(
    "bn-frozen-updating",
    "warning",
    "frozen parameters, statistics still updating",
    "weight and bias frozen (no grad) but the layer is in train mode, so its statistics still "
    "update (and it normalises per batch)",
    kind="layer",
)
def frozen_updating(layer: NormLayer, ctx: CheckContext) -> Iterator[Finding]:
    if not (
        layer.family == "batchnorm"
        and layer.affine_frozen
        and layer.training
        and layer.track_running_stats is not False
        and layer.momentum != 0
    ):
        return
    yield Finding(
        "bn-frozen-updating",
        "warning",
        layer.name,
        "weight and bias are frozen (requires_grad=False) but the layer is in train "
        "mode: its running statistics keep moving to the new batches and it "
        "normalises with batch statistics, so the layer is not frozen",
        "replace it by a frozen BN (normlab convert IN OUT --op frozen-bn), or "
        "keep it in eval mode during fine-tuning",
        fixable=True,
    )


@check("bn-sync", "info", "SyncBatchNorm", "SyncBatchNorm: convert to BatchNorm for single-device "
       "inference", kind="layer")  # fmt: skip
def sync(layer: NormLayer, ctx: CheckContext) -> Iterator[Finding]:
    if layer.type_name != "SyncBatchNorm":
        return
    yield Finding(
        "bn-sync",
        "info",
        layer.name,
        "SyncBatchNorm needs a process group in training; for single-device "
        "inference or export a plain BatchNorm is simpler",
        "normlab convert IN OUT --op sync-to-bn",
        fixable=True,
    )


# ---- layer checks: graph ---------------------------------------------------------------------


@check(
    "bn-bias-before",
    "info",
    "redundant bias before batch norm",
    "conv/linear bias right before a BN: redundant (BN subtracts it)",
    kind="layer",
)
def bias_before(layer: NormLayer, ctx: CheckContext) -> Iterator[Finding]:
    p = layer.producer
    if p is None or p.kind not in ("conv", "linear") or not p.has_bias or p.exclusive is False:
        return
    yield Finding(
        "bn-bias-before",
        "info",
        layer.name,
        f"{p.name} has a bias that the BN right after it subtracts again (the batch "
        "mean includes it): a redundant parameter (and weight decay on it)",
        "drop the bias and fold it into the running mean, exactly: normlab convert "
        "IN OUT --op remove-bias",
        # convert needs the exact graph to know the bias is used only here
        fixable=layer.convention == "torch" and p.exclusive is True,
        evidence={"producer": p.name},
    )


@check(
    "bn-after-activation",
    "info",
    "batch norm after an activation",
    "BN after an activation: it cannot fold into the preceding layer",
    kind="layer",
)
def after_activation(layer: NormLayer, ctx: CheckContext) -> Iterator[Finding]:
    p, c = layer.producer, layer.consumer
    if p is None or p.kind != "activation":
        return
    post_ok = c is not None and c.kind in ("conv", "linear") and c.exclusive is not False
    yield Finding(
        "bn-after-activation",
        "info",
        layer.name,
        f"the BN follows an activation ({p.name}), so it cannot be folded into the "
        "preceding layer"
        + (
            f"; it can be folded into the next one ({c.name})"
            if post_ok and c is not None
            else "; its output does not go to a single conv/linear either, so it "
            "stays as a separate op at inference"
        ),
        "normlab fold IN OUT (folds it into the next layer, exactly)"
        if post_ok
        else "none needed; a pre-activation placement would allow folding",
        fixable=post_ok and layer.convention == "torch",
        evidence={"producer": p.name},
    )


def _count(layer: NormLayer, ctx: CheckContext) -> int | None:
    """Values per channel in a training batch, when the batch size and input shape are known."""
    spatial = _spatial(layer)
    if ctx.batch_size is None or spatial is None or layer.family != "batchnorm":
        return None
    return ctx.batch_size * spatial


@check(
    "bn-tiny-count",
    ("error", "warning"),
    "too few values per channel to normalise over",
    "values per channel in a training batch (batch x H x W) <= 1 (error) or below "
    "``min_count`` (warning), e.g. BN after global pooling or batch size 1",
    kind="layer",
)
def tiny_count(layer: NormLayer, ctx: CheckContext) -> Iterator[Finding]:
    count = _count(layer, ctx)
    if count is None or (count > 1 and count >= ctx.min_count):
        return
    spatial = count // ctx.batch_size if ctx.batch_size else 0
    yield Finding(
        "bn-tiny-count",
        "error" if count <= 1 else "warning",
        layer.name,
        f"each channel is normalised over batch {ctx.batch_size} x {spatial} "
        f"position(s) = {count} value(s) per training batch"
        + (
            ": with one value the output is all beta and training fails"
            if count <= 1
            else f" (< {ctx.min_count}): the batch statistics are noisy and "
            "differ from the running ones used at inference"
        ),
        "use a larger batch, move the BN before the global pooling, or use "
        "GroupNorm/LayerNorm there",
        fixable=False,
        evidence={"count": count, "batch_size": ctx.batch_size, "positions": spatial},
    )


@check(
    "bn-after-global-pool",
    "info",
    "batch norm after global pooling",
    "BN after global pooling: it normalises over the batch only",
    kind="layer",
)
def after_global_pool(layer: NormLayer, ctx: CheckContext) -> Iterator[Finding]:
    p = layer.producer
    if layer.family != "batchnorm" or p is None or p.kind != "global_pool":
        return
    if _count(layer, ctx) is not None:
        return  # bn-tiny-count judges it from the known count
    yield Finding(
        "bn-after-global-pool",
        "info",
        layer.name,
        "the BN follows a global pooling, so each channel is normalised over the "
        "batch alone (batch-size values): fine with large batches, noisy or broken "
        "with small ones",
        "make sure the training batch size is large (pass --batch-size to check "
        "it), or use LayerNorm there",
        fixable=False,
    )


@check(
    "gn-groups",
    "error",
    "GroupNorm groups do not divide the channels",
    "GroupNorm groups do not divide the channels",
    kind="layer",
    families=("groupnorm",),
)
def gn_groups(layer: NormLayer, ctx: CheckContext) -> Iterator[Finding]:
    g, chans = layer.num_groups, layer.num_channels or layer.num_features
    if g is None or chans is None or (g >= 1 and chans % g == 0):
        return
    divisors = [d for d in range(1, chans + 1) if chans % d == 0]
    yield Finding(
        "gn-groups",
        "error",
        layer.name,
        f"GroupNorm has {g} groups for {chans} channels, which it does not divide",
        f"choose groups among {', '.join(map(str, divisors))}",
        fixable=False,
        evidence={"groups": g, "channels": chans},
    )


# ---- model checks ----------------------------------------------------------------------------


@check(
    "graph-unavailable",
    "info",
    "graph not traced",
    "the graph could not be traced: graph checks were skipped",
    kind="model",
)
def graph_unavailable(ctx: CheckContext) -> Iterator[Finding]:
    if ctx.graph_method != "none" or not any(la.family in BN_FAMILIES for la in ctx.layers):
        return
    yield Finding(
        "graph-unavailable",
        "info",
        None,
        "the model's graph is unknown (not traceable, or only tensors were given), so the "
        "checks that need it (bias before BN, BN after activation or pooling) were skipped",
        "pass a traceable model, an example input (--input-shape), or the architecture",
        fixable=False,
    )
