"""The model checks that depend on the training verdict: BN statistics at their initial values.

Running mean 0 and variance 1 are a BN's initial statistics: expected in an untrained model,
broken in a trained one. Which it is comes from :mod:`normlab.bn.evidence`, and every finding
here names the evidence (``ctx.training``) and, where the layer or file shows it, the root cause:

* momentum 0 (PyTorch) or 1.0 (Keras, read from the file): the statistics never move;
* ``num_batches_tracked=0`` in a trained model: the layer never ran in training mode;
* weight and bias trained, statistics not: statistics frozen while the parameters trained;
* frozen at every initial value (not trainable, weight 1, bias 0, mean 0, var 1): an identity
  layer: the network trained without normalisation there (``bn-frozen-initial``, whose fix is
  not recalibration: the next layers were trained on un-normalised input).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from normlab.bn.checks import CheckContext, check
from normlab.bn.evidence import affine_at_init
from normlab.bn.findings import Finding
from normlab.bn.graph import NormLayer
from normlab.bn.static_checks import at_init, initial_layers

__all__ = ["identity_layer", "stats_cause"]

_FRAMEWORK = {"keras": "Keras", "onnx": "ONNX", "torch": "PyTorch"}


def identity_layer(layer: NormLayer) -> bool:
    """Not trainable, with weight 1, bias 0 (or none) and statistics 0 / 1."""
    w = layer.weight
    return (
        layer.affine_frozen is True
        and affine_at_init(layer) is not False
        and (w is None or bool((w == 1).all()))
        and at_init(layer)
    )


def stats_cause(layer: NormLayer) -> tuple[str, str]:
    """``(cause id, in words)`` for a trained model's BN whose statistics are at init."""
    m, nbt = layer.momentum, layer.num_batches_tracked
    if layer.momentum_known and m == 0:
        if layer.convention == "torch":
            return "momentum", "momentum=0: the running statistics never move"
        name = _FRAMEWORK.get(layer.convention, layer.convention)
        return (
            "momentum",
            f"the file's {name} momentum is {1.0 - m!r} ({name}'s convention: moving = "
            "momentum x moving + (1 - momentum) x batch; PyTorch momentum 0): the moving "
            "statistics never move",
        )
    if nbt == 0:
        return (
            "never-in-train-mode",
            "num_batches_tracked=0: the layer never ran in training mode while the model "
            "trained (kept in eval mode), so its statistics were frozen while the parameters "
            "trained",
        )
    if affine_at_init(layer) is False:
        return (
            "frozen-statistics",
            "its weight and bias trained while its statistics stayed at their initial values: "
            "the statistics were frozen while the parameters trained (BN called with "
            "training=False or kept in eval mode, or its update ops not run)",
        )
    if nbt is not None and nbt > 0:
        return (
            "reset",
            f"num_batches_tracked={nbt}, yet the statistics are the initial ones: they were "
            "reset after training, or never moved (momentum 0 while training)",
        )
    return (
        "unknown",
        "the statistics were never updated (momentum 0, BN run with training=False, or update "
        "ops not run)",
    )


@check(
    "bn-stats-initial",
    "error",
    "statistics never updated",
    "running mean exactly 0 and var exactly 1 in a *trained* model (the training verdict and "
    "its evidence are in the message): the statistics were never updated; the message names "
    "the cause the file shows (momentum 0 / Keras 1.0, ``num_batches_tracked == 0``, "
    "statistics frozen while the parameters trained) (seed 002)",
    kind="model",
)
def stats_initial(ctx: CheckContext) -> Iterator[Finding]:
    if not ctx.trained:
        return
    for layer in initial_layers(ctx):
        if identity_layer(layer):
            continue
        cause, words = stats_cause(layer)
        nbt = layer.num_batches_tracked
        recal = (
            f"normlab recalibrate {ctx.target_hint} --data D"
            if layer.convention == "torch"
            else f"run training data through the {layer.convention} model in training "
            "mode with its weights frozen, so the moving statistics update"
        )
        evidence: dict[str, Any] = {
            "num_batches_tracked": nbt,
            "cause": cause,
            "training": ctx.training.because,
        }
        if layer.momentum_known and layer.momentum is not None:
            evidence["momentum"] = layer.momentum
        yield Finding(
            "bn-stats-initial",
            "error",
            layer.name,
            "running mean is exactly 0 and running var exactly 1, their initial values, in a "
            f"trained model (trained: {ctx.training.because}): {words}, so eval mode "
            "normalises with the wrong statistics",
            f"recompute population statistics: {recal}"
            + (
                "; and set a momentum that moves them before training further"
                * (cause == "momentum")
            ),
            fixable=layer.convention == "torch",
            evidence=evidence,
        )


@check(
    "bn-frozen-initial",
    "error",
    "BN frozen at its initial values: an identity layer",
    "in a trained model, a BN not trainable with weight 1, bias 0, mean 0, var 1 (e.g. Keras "
    "``trainable=False`` from the start): it computes x / sqrt(1 + eps), an identity, so the "
    "network trained without normalisation there",
    kind="model",
)
def frozen_initial(ctx: CheckContext) -> Iterator[Finding]:
    if not ctx.trained:
        return
    for layer in initial_layers(ctx):
        if not identity_layer(layer):
            continue
        yield Finding(
            "bn-frozen-initial",
            "error",
            layer.name,
            "the layer is frozen (not trainable) at its initial values (weight 1, bias 0, "
            f"moving mean 0, variance 1) in a trained model (trained: {ctx.training.because}): "
            "it computes x / sqrt(1 + eps), an identity up to a constant, so the network "
            "trained without normalisation here (what that costs: docs/findings.md, "
            "'What BN buys in a residual network')",
            "train with the BN layers trainable (Keras: trainable=True, so fit() updates the "
            "moving statistics), or remove them: they do nothing. Do not recalibrate: the next "
            "layers were trained on un-normalised input",
            fixable=False,
            evidence={"cause": "identity", "training": ctx.training.because},
        )


@check(
    "model-untrained",
    "info",
    "untrained model",
    "BN statistics at their initial values in a model the evidence says is untrained (named in "
    "the message): expected, not flagged",
    kind="model",
)
def model_untrained(ctx: CheckContext) -> Iterator[Finding]:
    initial = initial_layers(ctx)
    if ctx.training.verdict != "untrained" or not initial:
        return
    random_init = any(e.value == "random-init" for e in ctx.training.rests_on)
    yield Finding(
        "model-untrained",
        "info",
        None,
        f"{len(initial)} BN layer(s) hold their initial statistics in an untrained model "
        f"(untrained: {ctx.training.because}), where that is expected (in a trained model it "
        "would be an error)"
        + (
            "; random initial values cannot be told from a short training with the BN layers "
            "kept in eval mode, which would leave the statistics broken"
            if random_init
            else ""
        ),
        "none for an untrained model; pass --trained if it was trained",
        fixable=False,
        evidence={
            "layers": [layer.name for layer in initial],
            "training": ctx.training.because,
        },
    )


@check(
    "training-unknown",
    "warning",
    "initial statistics, training unknown",
    "BN statistics at their initial values, and nothing in the model or file says whether it "
    "was trained (no optimizer or batch counter, no affine parameters): pass --trained or "
    "--untrained",
    kind="model",
)
def training_unknown(ctx: CheckContext) -> Iterator[Finding]:
    initial = initial_layers(ctx)
    if ctx.training.verdict != "unknown" or not initial:
        return
    yield Finding(
        "training-unknown",
        "warning",
        None,
        f"{len(initial)} BN layer(s) hold their initial statistics (mean 0, var 1), and "
        f"nothing says whether the model was trained ({ctx.training.because}): if it was, "
        "those statistics were never updated and eval mode normalises wrongly",
        "pass --trained (then they are errors: recalibrate) or --untrained",
        fixable=False,
        evidence={"layers": [layer.name for layer in initial]},
    )
