"""The BN doctor: find the normalization defects that silently break models.

:func:`diagnose` runs *static* checks on the graph and the stored tensors of any model (a live
``nn.Module``, or the :class:`~normlab.bn.graph.NormLayer` records read from a state_dict, an
ONNX file or a Keras file) and, when it can run the model on a batch, *dynamic* checks. Every
finding has a stable id, a severity, the layer, a plain explanation, the fix, and whether
normlab can apply that fix (``fixable``). Exit status of ``normlab doctor``: 0 clean (info
findings only), 1 warnings, 2 errors.

========================  ========  ===============================================================
id                        severity  what
========================  ========  ===============================================================
``bn-stats-initial``      error     running mean exactly 0 and var exactly 1 (and/or
                                    ``num_batches_tracked == 0``) in a *trained* model: the
                                    statistics were never updated (seed 002)
``bn-stats-nonfinite``    error     NaN/Inf in statistics or affine, or a negative variance
``bn-train-mode``         error     BN in training mode at inference: a sample's output depends on
                                    the rest of its batch (confirmed dynamically when possible)
``bn-batch-stats-eval``   error     ``track_running_stats=False``: batch statistics even in eval
``bn-tiny-count``         error /   values per channel in a training batch (batch x H x W) <= 1
                          warning   (error) or below ``min_count`` (warning), e.g. BN after global
                                    pooling or batch size 1
``gn-groups``             error     GroupNorm groups do not divide the channels
``params-ranks-disagree`` error     rank set: parameters (or other state DDP keeps identical)
                                    differ between ranks: gradients were not synchronised, or the
                                    files come from different steps
``bn-momentum-keras``     warning   PyTorch momentum > 0.5: a Keras momentum (0.99) typed into
                                    PyTorch, where it means "keep 1%"
``bn-momentum-zero``      warning   momentum 0: running statistics never move
``bn-frozen-updating``    warning   weight and bias frozen (no grad) but the layer is in train mode,
                                    so its statistics still update (and it normalises per batch)
``bn-estimation-shift``   warning   running statistics far from the population statistics of the
                                    given data (stale after weight averaging, too few updates, ...)
``bn-ranks-disagree``     warning   rank set: BN running statistics differ between ranks (local BN
                                    whose statistics were not reconciled: ``dist_bn: none``)
``bn-eps-keras``          info      eps 1e-3, Keras' default, in a PyTorch layer: likely a port
``bn-bias-before``        info      conv/linear bias right before a BN: redundant (BN subtracts it)
``bn-after-activation``   info      BN after an activation: it cannot fold into the preceding layer
``bn-after-global-pool``  info      BN after global pooling: it normalises over the batch only
``bn-sync``               info      SyncBatchNorm: convert to BatchNorm for single-device inference
``model-untrained``       info      affine parameters at their initial values: statistics at their
                                    initial values are expected, not flagged
``graph-unavailable``     info      the graph could not be traced: graph checks were skipped
========================  ========  ===============================================================

Trained or untrained (for ``bn-stats-initial``): a freshly initialised network legitimately has
mean 0 / var 1. Unless the caller says (``trained=``; the CLI says True for a run directory or a
training checkpoint past epoch 0), a model counts as trained when any BN's affine parameters left
their initial values (weight all 1 or all 0, bias all 0) or any BN counted a training batch.

Dynamic checks need input: ``data`` (real batches: every dynamic check, including the
estimation shift) or ``example_input`` (e.g. a synthetic batch of the right shape: mode and
update checks only; statistics of noise say nothing about a model's data). They run on deep
copies: the model passed in is never modified.

Rank sets: :func:`diagnose_rank_set` compares the state_dicts of one multi-process model, one per
rank (per-rank checkpoints, or the ``bn_buffers.rank<R>.pt`` files a ``dist_bn: none`` run
writes). DDP keeps parameters identical on every rank, while BN running statistics stay
rank-local unless reconciled (SyncBN, or ``dist_bn`` reduce/broadcast), so disagreeing
statistics are a warning and disagreeing parameters an error.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from normlab.bn.graph import ModelGraph, NormLayer, analyze, eval_mode, norm_family
from normlab.bn.load import _strip_prefix, require_same_keys
from normlab.bn.recalibrate import batch_input, recalibrate_batchnorm
from normlab.bn.scan import UNSAFE_CHECKS
from normlab.errors import ConfigError, DataError, NormlabError
from normlab.probes.stats import estimation_shift

__all__ = [
    "CHECKS",
    "SEVERITIES",
    "Finding",
    "Report",
    "diagnose",
    "diagnose_layers",
    "diagnose_rank_set",
]

SEVERITIES = ("error", "warning", "info")

CHECKS: dict[str, str] = {
    "bn-stats-initial": "statistics never updated",
    "bn-stats-nonfinite": "NaN/Inf or negative statistics",
    "bn-train-mode": "batch norm in training mode at inference",
    "bn-batch-stats-eval": "batch statistics at inference (track_running_stats=False)",
    "bn-tiny-count": "too few values per channel to normalise over",
    "gn-groups": "GroupNorm groups do not divide the channels",
    "params-ranks-disagree": "parameters differ between ranks",
    "bn-momentum-keras": "momentum in Keras' convention",
    "bn-momentum-zero": "momentum 0",
    "bn-frozen-updating": "frozen parameters, statistics still updating",
    "bn-estimation-shift": "running statistics far from population statistics",
    "bn-ranks-disagree": "BN running statistics differ between ranks",
    "bn-eps-keras": "Keras' default eps",
    "bn-bias-before": "redundant bias before batch norm",
    "bn-after-activation": "batch norm after an activation",
    "bn-after-global-pool": "batch norm after global pooling",
    "bn-sync": "SyncBatchNorm",
    "model-untrained": "untrained model",
    "graph-unavailable": "graph not traced",
}
"""Every finding id and its short title (ids are stable: CI scripts may match on them)."""
CHECKS.update(UNSAFE_CHECKS)  # file-level: unsafe content (normlab.bn.scan), errors

BN_FAMILIES = ("batchnorm", "frozen_bn")


@dataclass(frozen=True)
class Finding:
    """One defect (or note) the doctor found."""

    id: str
    severity: str
    layer: str | None
    message: str
    """What is wrong and why it matters, in plain words."""
    fix: str
    fixable: bool
    """Whether normlab can apply the fix (the ``fix`` text names the command)."""
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.id not in CHECKS:
            raise ValueError(f"unknown finding id {self.id!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")


@dataclass
class Report:
    """The doctor's findings about one model."""

    findings: list[Finding]
    target: str = "model"
    checks: list[str] = field(default_factory=list)
    """Which kinds of checks ran: ``static``, ``graph``, ``dynamic``, ``data``."""
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0: no errors or warnings; 1: warnings only; 2: any error."""
        severities = {f.severity for f in self.findings}
        return 2 if "error" in severities else 1 if "warning" in severities else 0

    def ids(self) -> set[str]:
        return {f.id for f in self.findings}

    def by_id(self, finding_id: str) -> list[Finding]:
        return [f for f in self.findings if f.id == finding_id]

    def counts(self) -> dict[str, int]:
        return {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "exit_status": self.exit_code,
            "counts": self.counts(),
            "checks": list(self.checks),
            "notes": list(self.notes),
            "findings": [asdict(f) for f in self.findings],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n"

    def format_text(self, max_layers: int = 8) -> str:
        """Findings grouped by id (errors first), one block per id listing its layers."""
        lines = [f"normlab doctor: {self.target}"]
        if self.checks:
            lines.append(f"  checks: {', '.join(self.checks)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        order = {s: i for i, s in enumerate(SEVERITIES)}
        groups: dict[tuple[str, str], list[Finding]] = {}
        for f in sorted(self.findings, key=lambda f: order[f.severity]):
            groups.setdefault((f.severity, f.id), []).append(f)
        for (severity, fid), items in groups.items():
            layers = [f.layer for f in items if f.layer]
            shown = ", ".join(layers[:max_layers])
            more = f" and {len(layers) - max_layers} more" if len(layers) > max_layers else ""
            where = f" ({len(layers)} layer{'s' if len(layers) != 1 else ''}: {shown}{more})"
            lines.append(f"{severity.upper()} {fid}{where if layers else ''}")
            lines.append(f"    {items[0].message}")
            fixable = " [normlab can apply it]" if items[0].fixable else ""
            lines.append(f"    fix: {items[0].fix}{fixable}")
        c = self.counts()
        lines.append(
            f"summary: {c['error']} error(s), {c['warning']} warning(s), {c['info']} note(s) "
            f"-> exit {self.exit_code}"
        )
        return "\n".join(lines) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(type(value).__name__)


# ---- static checks ---------------------------------------------------------------------------


def _at_init(layer: NormLayer) -> bool:
    """Running mean exactly 0 and running var exactly 1 (a BN's initial statistics)."""
    m, v = layer.running_mean, layer.running_var
    if m is None or v is None:
        return False
    return bool((m == 0).all()) and bool((v == 1).all())


def _affine_at_init(layer: NormLayer) -> bool | None:
    w, b = layer.weight, layer.bias
    if w is None and b is None:
        return None
    w_init = w is None or bool((w == 1).all()) or bool((w == 0).all())
    b_init = b is None or bool((b == 0).all())
    return w_init and b_init


def looks_trained(layers: Sequence[NormLayer]) -> bool:
    """True if any BN's affine left its initial values or any BN counted a training batch."""
    for layer in layers:
        if layer.family not in BN_FAMILIES and layer.family != "groupnorm":
            continue
        if _affine_at_init(layer) is False:
            return True
        if layer.family == "batchnorm" and (layer.num_batches_tracked or 0) > 0:
            return True
    return False


def _finite(t: Tensor | None) -> bool:
    return t is None or bool(torch.isfinite(t).all())


def _static_findings(
    layers: Sequence[NormLayer],
    *,
    trained: bool | None,
    context: str,
    mode_recorded: bool,
    batch_size: int | None,
    min_count: int,
    graph_method: str,
    target_hint: str,
) -> list[Finding]:
    out: list[Finding] = []
    is_trained = looks_trained(layers) if trained is None else trained
    init_layers = []
    for layer in layers:
        fam = layer.family
        torch_layer = layer.convention == "torch"
        recal = (
            f"normlab recalibrate {target_hint} --data D"
            if torch_layer
            else f"run training data through the {layer.convention} model in training mode with "
            "its weights frozen (or load it into PyTorch and use normlab recalibrate)"
        )
        if fam in BN_FAMILIES:
            # ---- NaN / Inf / negative variance
            bad = [
                name
                for name, t in (
                    ("running_mean", layer.running_mean),
                    ("running_var", layer.running_var),
                    ("weight", layer.weight),
                    ("bias", layer.bias),
                )
                if not _finite(t)
            ]
            neg = layer.running_var is not None and bool(
                (layer.running_var < 0).nan_to_num(False).any()
            )
            if bad or neg:
                what = ", ".join(f"non-finite {b}" for b in bad) + (
                    (", " if bad else "") + "negative running_var" if neg else ""
                )
                stats_only = all(b in ("running_mean", "running_var") for b in bad)
                out.append(
                    Finding(
                        "bn-stats-nonfinite",
                        "error",
                        layer.name,
                        f"{what}: every output of the layer in eval mode is NaN or garbage "
                        "(typical after an fp16/AMP overflow or a diverged step)",
                        f"recompute the statistics: {recal}"
                        if stats_only
                        else "the learned weights themselves are broken: restore an earlier "
                        "checkpoint (recalibration cannot fix NaN parameters)",
                        fixable=stats_only and torch_layer,
                        evidence={"fields": bad, "negative_var": neg},
                    )
                )
                continue
            # ---- never updated
            if fam == "batchnorm" and layer.track_running_stats is not False and _at_init(layer):
                init_layers.append(layer)
            # ---- momentum conventions (PyTorch layers only; readers convert Keras/ONNX)
            if fam == "batchnorm" and layer.convention == "torch" and layer.momentum_known:
                m = layer.momentum
                if m is not None and m > 0.5:
                    out.append(
                        Finding(
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
                    )
                elif m == 0:
                    out.append(
                        Finding(
                            "bn-momentum-zero",
                            "warning",
                            layer.name,
                            "momentum=0: training never updates the running statistics, so eval "
                            "mode uses whatever they hold now (their initial values, unless they "
                            "were recalibrated)",
                            "set momentum > 0 (e.g. 0.1; --set norm.bn_momentum=0.1 for a normlab "
                            f"run) before training further; recompute the statistics: {recal}",
                            fixable=False,
                        )
                    )
                if (
                    layer.eps is not None
                    and math.isclose(layer.eps, 1e-3)
                    and not (m is not None and m > 0.5)
                ):
                    out.append(
                        Finding(
                            "bn-eps-keras",
                            "info",
                            layer.name,
                            "eps=1e-3 is Keras' default (PyTorch's is 1e-5): fine for weights "
                            "ported from Keras, which were trained with it; otherwise check the port",
                            "keep it for Keras-trained weights; for PyTorch training use 1e-5",
                            fixable=False,
                            evidence={"eps": layer.eps},
                        )
                    )
            # ---- batch statistics at inference
            if fam == "batchnorm" and layer.track_running_stats is False:
                out.append(
                    Finding(
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
                )
            # ---- mode
            if context == "inference" and mode_recorded and layer.training and fam == "batchnorm":
                out.append(
                    Finding(
                        "bn-train-mode",
                        "error",
                        layer.name,
                        "the layer is in training mode: at inference it normalises each batch with "
                        "that batch's statistics (a sample's output depends on its batch-mates) "
                        "and keeps updating its running statistics",
                        "call model.eval() before inference",
                        fixable=False,
                    )
                )
            # ---- frozen parameters, statistics still updating
            if (
                fam == "batchnorm"
                and layer.affine_frozen
                and layer.training
                and layer.track_running_stats is not False
                and layer.momentum != 0
            ):
                out.append(
                    Finding(
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
                )
            if layer.type_name == "SyncBatchNorm":
                out.append(
                    Finding(
                        "bn-sync",
                        "info",
                        layer.name,
                        "SyncBatchNorm needs a process group in training; for single-device "
                        "inference or export a plain BatchNorm is simpler",
                        "normlab convert IN OUT --op sync-to-bn",
                        fixable=True,
                    )
                )
            # ---- graph: bias before, after activation, after global pooling
            p = layer.producer
            bias_before = p is not None and p.kind in ("conv", "linear") and bool(p.has_bias)
            if p is not None and bias_before and p.exclusive is not False:
                out.append(
                    Finding(
                        "bn-bias-before",
                        "info",
                        layer.name,
                        f"{p.name} has a bias that the BN right after it subtracts again (the batch "
                        "mean includes it): a redundant parameter (and weight decay on it)",
                        "drop the bias and fold it into the running mean, exactly: normlab convert "
                        "IN OUT --op remove-bias",
                        # convert needs the exact graph to know the bias is used only here
                        fixable=torch_layer and p.exclusive is True,
                        evidence={"producer": p.name},
                    )
                )
            if p is not None and p.kind == "activation":
                c = layer.consumer
                post_ok = (
                    c is not None and c.kind in ("conv", "linear") and c.exclusive is not False
                )
                out.append(
                    Finding(
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
                        fixable=post_ok and torch_layer,
                        evidence={"producer": p.name},
                    )
                )
            after_pool = p is not None and p.kind == "global_pool"
            spatial = _spatial(layer)
            if batch_size is not None and spatial is not None and fam == "batchnorm":
                count = batch_size * spatial
                if count <= 1 or count < min_count:
                    sev = "error" if count <= 1 else "warning"
                    out.append(
                        Finding(
                            "bn-tiny-count",
                            sev,
                            layer.name,
                            f"each channel is normalised over batch {batch_size} x {spatial} "
                            f"position(s) = {count} value(s) per training batch"
                            + (
                                ": with one value the output is all beta and training fails"
                                if count <= 1
                                else f" (< {min_count}): the batch statistics are noisy and "
                                "differ from the running ones used at inference"
                            ),
                            "use a larger batch, move the BN before the global pooling, or use "
                            "GroupNorm/LayerNorm there",
                            fixable=False,
                            evidence={
                                "count": count,
                                "batch_size": batch_size,
                                "positions": spatial,
                            },
                        )
                    )
            elif after_pool and fam == "batchnorm":
                out.append(
                    Finding(
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
                )
        elif fam == "groupnorm":
            g, chans = layer.num_groups, layer.num_channels or layer.num_features
            if g is not None and chans is not None and (g < 1 or chans % g != 0):
                divisors = [d for d in range(1, chans + 1) if chans % d == 0]
                out.append(
                    Finding(
                        "gn-groups",
                        "error",
                        layer.name,
                        f"GroupNorm has {g} groups for {chans} channels, which it does not divide",
                        f"choose groups among {', '.join(map(str, divisors))}",
                        fixable=False,
                        evidence={"groups": g, "channels": chans},
                    )
                )
    if init_layers:
        if is_trained:
            for layer in init_layers:
                recal = (
                    f"normlab recalibrate {target_hint} --data D"
                    if layer.convention == "torch"
                    else f"run training data through the {layer.convention} model in training "
                    "mode with its weights frozen, so the moving statistics update"
                )
                nbt = layer.num_batches_tracked
                detail = (
                    f"num_batches_tracked={nbt}" if nbt is not None else "no batch counter stored"
                )
                out.append(
                    Finding(
                        "bn-stats-initial",
                        "error",
                        layer.name,
                        "running mean is exactly 0 and running var exactly 1, their initial values, "
                        f"in a trained model ({detail}): the statistics were never updated "
                        "(momentum 0, BN run with training=False, or update ops not run), so eval "
                        "mode normalises with the wrong statistics",
                        f"recompute population statistics: {recal}",
                        fixable=layer.convention == "torch",
                        evidence={"num_batches_tracked": nbt},
                    )
                )
        else:
            out.append(
                Finding(
                    "model-untrained",
                    "info",
                    None,
                    f"{len(init_layers)} BN layer(s) hold their initial statistics and every BN "
                    "affine is at its initial value: an untrained model, where that is expected "
                    "(in a trained model it would be an error)",
                    "none for an untrained model; pass --trained if it was trained",
                    fixable=False,
                    evidence={"layers": [layer.name for layer in init_layers]},
                )
            )
    if graph_method == "none" and any(layer.family in BN_FAMILIES for layer in layers):
        out.append(
            Finding(
                "graph-unavailable",
                "info",
                None,
                "the model's graph is unknown (not traceable, or only tensors were given), so the "
                "checks that need it (bias before BN, BN after activation or pooling) were skipped",
                "pass a traceable model, an example input (--input-shape), or the architecture",
                fixable=False,
            )
        )
    return out


def _spatial(layer: NormLayer) -> int | None:
    shape = layer.input_shape
    if shape is None:
        return None
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return n


def diagnose_layers(
    layers: Sequence[NormLayer],
    *,
    target: str = "model",
    trained: bool | None = None,
    context: str = "inference",
    mode_recorded: bool = False,
    batch_size: int | None = None,
    min_count: int = 16,
    graph_method: str = "fx",
    notes: Sequence[str] = (),
    target_hint: str = "TARGET",
) -> Report:
    """Static checks on already-extracted layer records (from an ONNX/Keras file or a state_dict).

    Arguments as :func:`diagnose`; ``graph_method`` says how the links were found (``none``:
    graph checks are skipped and a ``graph-unavailable`` note says so).
    """
    findings = _static_findings(
        layers,
        trained=trained,
        context=context,
        mode_recorded=mode_recorded,
        batch_size=batch_size,
        min_count=min_count,
        graph_method=graph_method,
        target_hint=target_hint,
    )
    checks = ["static"] + (["graph"] if graph_method != "none" else [])
    return Report(findings, target, checks, list(notes))


# ---- dynamic checks --------------------------------------------------------------------------


def _first_input(data: Any) -> Any:
    if isinstance(data, Tensor):
        return data
    for batch in data:
        return batch_input(batch)
    return None


def _no_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout | nn.Dropout1d | nn.Dropout2d | nn.Dropout3d | nn.AlphaDropout):
            m.eval()


def _batch_dependence(model: nn.Module, x: Tensor) -> float | None:
    """max |f(x[:1]) - f(x)[:1]| with the model in its current mode (on a copy; dropout off)."""
    if x.shape[0] < 2:
        return None
    probe = copy.deepcopy(model)
    _no_dropout(probe)
    with torch.no_grad():
        try:
            alone = probe(x[:1])
            together = probe(x)
        except Exception:
            return None
    if not isinstance(alone, Tensor) or not isinstance(together, Tensor):
        return None
    return float((alone.double() - together[:1].double()).abs().max())


def _updates_in_current_mode(model: nn.Module, x: Tensor) -> set[str]:
    """Names of BN layers whose running statistics move in one forward in the current mode."""
    probe = copy.deepcopy(model)
    _no_dropout(probe)
    before = {
        name: m.running_mean.clone()
        for name, m in probe.named_modules()
        if norm_family(m) == "batchnorm" and isinstance(getattr(m, "running_mean", None), Tensor)
    }
    with torch.no_grad():
        try:
            probe(x)
        except Exception:
            return set()
    moved = set()
    for name, m in probe.named_modules():
        if name in before and not torch.equal(before[name], m.running_mean):
            moved.add(name)
    return moved


def _shift_findings(
    model: nn.Module,
    data: Iterable[Any],
    *,
    skip: set[str],
    max_batches: int,
    mean_threshold: float,
    var_threshold: float,
    target_hint: str,
) -> list[Finding]:
    probe = copy.deepcopy(model)
    try:
        result = recalibrate_batchnorm(probe, data, num_batches=max_batches)
    except NormlabError:
        return []
    out = []
    modules = dict(probe.named_modules())
    for name in result.layers:
        if name in skip:
            continue
        old_mean, old_var = result.old[name]
        eps = float(getattr(modules[name], "eps", 1e-5))
        mean_shift, var_shift = estimation_shift(old_mean, old_var, result.population[name], eps)
        if not (math.isfinite(mean_shift) and math.isfinite(var_shift)):
            continue
        if mean_shift > mean_threshold or var_shift > var_threshold:
            out.append(
                Finding(
                    "bn-estimation-shift",
                    "warning",
                    name,
                    f"the running statistics differ from the population statistics of the given "
                    f"data: mean off by {mean_shift:.2f} std on average over channels, variance off "
                    f"by a factor {math.exp(var_shift):.2f} (typical after weight averaging "
                    "(SWA/EMA), after too few updates, or on data unlike the training data)",
                    f"recompute population statistics on training data: normlab recalibrate "
                    f"{target_hint} --data D",
                    fixable=True,
                    evidence={"mean_shift": mean_shift, "var_log_ratio": var_shift},
                )
            )
    return out


def diagnose(
    model: nn.Module,
    data: Tensor | Iterable[Any] | None = None,
    *,
    example_input: Tensor | None = None,
    trained: bool | None = None,
    context: str = "inference",
    mode_recorded: bool = True,
    batch_size: int | None = None,
    min_count: int = 16,
    dynamic: bool = True,
    max_batches: int = 8,
    shift_mean_threshold: float = 0.5,
    shift_var_threshold: float = math.log(2.0),
    target: str = "model",
    target_hint: str = "TARGET",
    notes: Sequence[str] = (),
) -> Report:
    """Check ``model``'s normalization layers; see the module docstring for every finding.

    Args:
        model: any ``nn.Module`` (never modified; dynamic checks run on copies).
        data: real input batches (a tensor, or an iterable of tensors / ``(x, y)`` pairs, e.g. a
            :class:`~normlab.data.BatchLoader`): enables every dynamic check, including the
            estimation shift on up to ``max_batches`` batches.
        example_input: a batch of the right shape when no real data is at hand (e.g. noise):
            enables the mode and update checks and per-layer shapes, not the estimation shift.
        trained: whether the model was trained (None: inferred, see the module docstring).
        context: ``inference`` (default: the model as given is what serves predictions) or
            ``training`` (it is about to be trained or fine-tuned: train mode is expected).
        mode_recorded: whether the model's train/eval flags mean anything (False for a model
            rebuilt from a state_dict, whose mode is just the constructor's default).
        batch_size: the *training* batch size, for the values-per-channel check.
        min_count: below this many values per channel per batch ``bn-tiny-count`` warns.
        dynamic: run the dynamic checks when input is available.
        shift_mean_threshold / shift_var_threshold: ``bn-estimation-shift`` fires when the
            mean or the variance shift of :func:`normlab.probes.stats.estimation_shift` (the
            ``shift`` probe's definition) exceeds them: over channels, the average of
            ``|mean_run - mean_pop| / sqrt(var_pop + eps)`` and of
            ``|log((var_run + eps) / (var_pop + eps))|``, with ``mean_pop`` and the **biased**
            ``var_pop`` the population statistics of ``data`` (precise BN, measured as
            :func:`~normlab.bn.recalibrate.recalibrate_batchnorm` does). The finding's evidence
            holds both values (``mean_shift``, ``var_log_ratio``).
        target / target_hint: how the report names the model, and the TARGET in fix commands.
    """
    if context not in ("inference", "training"):
        raise NormlabError(f"context must be 'inference' or 'training', got {context!r}")
    x = example_input
    if data is not None and x is None:
        x = _first_input(data)
    if not isinstance(x, Tensor):
        x = None
    run_notes = list(notes)
    if x is not None:
        try:
            with eval_mode(model), torch.no_grad():
                model(x)
        except Exception as exc:
            run_notes.append(
                f"dynamic checks skipped: the model fails on an input of shape {tuple(x.shape)} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            )
            x = None
            data = None
    graph: ModelGraph = analyze(model, x)
    if batch_size is None and context == "training" and data is not None and x is not None:
        batch_size = int(x.shape[0])
    report = diagnose_layers(
        graph.layers,
        target=target,
        trained=trained,
        context=context,
        mode_recorded=mode_recorded,
        batch_size=batch_size,
        min_count=min_count,
        graph_method=graph.method,
        notes=run_notes,
        target_hint=target_hint,
    )
    if graph.method != "fx" and graph.reason:
        report.notes.append(f"graph from {graph.method}: torch.fx failed ({graph.reason})")
    if not dynamic or x is None:
        return report
    report.checks.append("dynamic")
    training_bns = [
        layer.name for layer in graph.layers if layer.family == "batchnorm" and layer.training
    ]
    # ---- train mode at inference: confirm (or discover) batch dependence
    if context == "inference" and mode_recorded and training_bns and x.shape[0] >= 2:
        diff = _batch_dependence(model, x)
        if diff is not None:
            for f in report.by_id("bn-train-mode"):
                f.evidence["sample_vs_batch_max_diff"] = diff
            if diff > 1e-4 and training_bns:
                report.notes.append(
                    f"dynamic: a sample's output alone vs inside a batch of {x.shape[0]} differs "
                    f"by {diff:.3g} (model as given)"
                )
    # ---- frozen but updating: confirm that the statistics move
    frozen = report.by_id("bn-frozen-updating")
    if frozen:
        moved = _updates_in_current_mode(model, x)
        for f in frozen:
            f.evidence["statistics_moved_in_one_forward"] = f.layer in moved
    # ---- estimation shift (real data only)
    if data is not None:
        report.checks.append("data")
        if looks_trained(graph.layers) if trained is None else trained:
            skip = {
                f.layer
                for f in report.findings
                if f.layer and f.id in ("bn-stats-initial", "bn-stats-nonfinite")
            }
            batches = [data] if isinstance(data, Tensor) else data
            report.findings.extend(
                _shift_findings(
                    model,
                    batches,
                    skip=skip,
                    max_batches=max_batches,
                    mean_threshold=shift_mean_threshold,
                    var_threshold=shift_var_threshold,
                    target_hint=target_hint,
                )
            )
        else:
            report.notes.append("estimation shift not checked: the model looks untrained")
    return report


# ---- rank sets -------------------------------------------------------------------------------

_STATS = ("running_mean", "running_var")
_CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict", "model_state")


def _rank_tensors(item: Mapping[str, Any] | nn.Module, label: str) -> dict[str, Tensor]:
    """The tensors of one rank: a module's state_dict, a state_dict, or the state_dict inside a
    checkpoint dict (``model`` / ``state_dict`` entry); DDP/compile key prefixes removed."""
    if isinstance(item, nn.Module):
        state: Mapping[str, Any] = item.state_dict()
    elif isinstance(item, Mapping):
        state = item
        for key in _CHECKPOINT_KEYS:
            inner = item.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, Tensor) for v in inner.values())
            ):
                state = inner
                break
    else:
        raise ConfigError(
            f"{label}: expected a state_dict, a checkpoint dict or an nn.Module, got "
            f"{type(item).__name__}"
        )
    tensors = {str(k): v.detach().cpu() for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise DataError(f"{label}: holds no tensors")
    return _strip_prefix(tensors)


@dataclass(frozen=True)
class _Spread:
    """How far one tensor differs across ranks (stack ``x`` of shape ``(ranks, ...)``)."""

    disagree: bool
    max_abs: float
    max_rel: float
    """max over elements of (max - min over ranks) / max |value| over ranks."""
    farthest: int
    """Index of the rank farthest from the rank mean (relative to the tolerance)."""
    nonfinite_mismatch: int
    """Elements that are NaN/Inf on some ranks and not identical on all."""


def _spread(x: Tensor, rtol: float, atol: float) -> _Spread:
    ranks = x.shape[0]
    if not x.is_floating_point():
        x = x.to(torch.int64)  # integers and bools (complex tensors are not BN state)
        diff = (x != x[0]).reshape(ranks, -1).any(1)
        spread = (x.amax(0) - x.amin(0)).double()
        scale = x.abs().amax(0).double().clamp_min(1e-300)
        return _Spread(
            bool(diff.any()),
            float(spread.max()) if spread.numel() else 0.0,
            float((spread / scale).max()) if spread.numel() else 0.0,
            int(diff.nonzero()[0]) if diff.any() else 0,
            0,
        )
    x = x.double()
    finite = torch.isfinite(x).all(0)
    nonfinite_mismatch = 0
    if not bool(finite.all()):
        agree = ((x == x[0]) | (x.isnan() & x[0].isnan())).all(0)
        nonfinite_mismatch = int((~finite & ~agree).sum())
    xf = torch.where(finite, x, torch.zeros_like(x))
    spread = xf.amax(0) - xf.amin(0)
    scale = xf.abs().amax(0)
    tol = atol + rtol * scale
    disagree = bool((spread > tol).any()) or nonfinite_mismatch > 0
    if spread.numel() == 0:
        return _Spread(disagree, 0.0, 0.0, 0, nonfinite_mismatch)
    rel = spread / scale.clamp_min(max(atol, 1e-12))
    deviation = ((xf - xf.mean(0)).abs() / tol.clamp_min(1e-300)).reshape(ranks, -1).amax(1)
    return _Spread(
        disagree,
        float(spread.max()),
        float(rel.max()),
        int(deviation.argmax()),
        nonfinite_mismatch,
    )


def _mean_diff_in_std(means: list[Tensor | None], variances: list[Tensor | None]) -> float | None:
    """max over channels of (max - min of running_mean over ranks) / sqrt(mean running_var + 1e-5):
    how far apart the ranks' means are in units of the channel's standard deviation, which is
    what a normalised output is off by (None when a tensor is missing or nothing is finite)."""
    if any(m is None for m in means) or any(v is None for v in variances):
        return None
    m = torch.stack([t.double() for t in means if t is not None])
    v = torch.stack([t.double() for t in variances if t is not None]).mean(0)
    if m.numel() == 0 or m.shape[1:] != v.shape:
        return None
    ratio = (m.amax(0) - m.amin(0)) / torch.sqrt(v.clamp_min(0) + 1e-5)
    ratio = ratio[torch.isfinite(ratio)]
    return float(ratio.max()) if ratio.numel() else None


def diagnose_rank_set(
    state_dicts_or_models: Sequence[Mapping[str, Any] | nn.Module],
    names: Sequence[str] | None = None,
    *,
    rtol: float = 1e-3,
    atol: float = 1e-6,
    target: str | None = None,
    target_hint: str = "A B ...",
) -> Report:
    """Compare one model's per-rank copies: BN statistics and parameters that disagree.

    Args:
        state_dicts_or_models: one entry per rank, each an ``nn.Module``, a state_dict, or a
            checkpoint dict holding one (``model`` / ``state_dict`` entry, as normlab saves); a
            DDP ``module.`` prefix is ignored. Non-tensor entries are ignored. Buffer-only dicts
            (``bn_buffers.rank<R>.pt``) work too: only what is present is compared.
        names: how the report names the ranks (default ``rank0``, ``rank1``, ...).
        rtol / atol: a tensor agrees across ranks when, element by element, ``max - min`` over
            ranks is at most ``atol + rtol * max |value|`` (integer tensors must be equal). The
            defaults tolerate the rounding of an all-reduce (SyncBN, ``dist_bn=reduce``) and
            flag per-rank estimates, which differ by percents.
        target / target_hint: how the report names the set, and the ``A B ...`` in fix commands.

    Returns:
        A :class:`Report` (checks ``["ranks"]``), silent when the set agrees:
        ``bn-ranks-disagree`` (warning) for each BN layer whose ``running_mean`` or
        ``running_var`` differ, with the largest relative differences and the rank farthest from
        the mean as evidence; ``params-ranks-disagree`` (error) for each module whose other
        tensors (parameters, ``num_batches_tracked``, other buffers) differ.

    Raises:
        ConfigError: fewer than 2 entries, ``names`` of the wrong length, bad tolerances.
        DataError: the entries are not copies of one model (a key missing, a shape differs).
    """
    items = list(state_dicts_or_models)
    if len(items) < 2:
        raise ConfigError(f"the rank-set check needs at least 2 ranks, got {len(items)}")
    labels = [f"rank{i}" for i in range(len(items))] if names is None else [str(n) for n in names]
    if len(labels) != len(items):
        raise ConfigError(f"{len(labels)} names for {len(items)} ranks")
    if not (rtol >= 0 and atol >= 0):
        raise ConfigError(f"rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    states = [_rank_tensors(item, label) for item, label in zip(items, labels, strict=True)]
    ref = states[0]
    require_same_keys(states, labels, "rank set", "the ranks must be copies of one model")
    for label, state in zip(labels[1:], states[1:], strict=True):
        for key, value in ref.items():
            if state[key].shape != value.shape:
                raise DataError(
                    f"rank set: {key!r} has shape {tuple(state[key].shape)} in {label} but "
                    f"{tuple(value.shape)} in {labels[0]}: the ranks must be copies of one model"
                )

    def module_of(key: str) -> str:
        return key.rpartition(".")[0] or "<root>"

    bn_stats: dict[str, dict[str, _Spread]] = {}
    others: dict[str, dict[str, _Spread]] = {}
    for key in ref:
        field_name = key.rpartition(".")[2]
        spread = _spread(torch.stack([s[key] for s in states]), rtol, atol)
        if field_name in _STATS and ref[key].is_floating_point():
            bn_stats.setdefault(module_of(key), {})[field_name] = spread
        else:
            others.setdefault(module_of(key), {})[field_name] = spread

    findings: list[Finding] = []
    n = len(states)
    for layer, spreads in bn_stats.items():
        if not any(sp.disagree for sp in spreads.values()):
            continue
        mean, var = spreads.get("running_mean"), spreads.get("running_var")
        worst = max(spreads.values(), key=lambda sp: (sp.disagree, sp.max_rel))
        prefix = "" if layer == "<root>" else f"{layer}."
        in_std = _mean_diff_in_std(
            [s.get(f"{prefix}running_mean") for s in states],
            [s.get(f"{prefix}running_var") for s in states],
        )
        parts = []
        if mean is not None:
            std = f"{in_std:.3g} std, " if in_std is not None else ""
            parts.append(f"running_mean by up to {std}{mean.max_rel:.2%} relative")
        if var is not None:
            parts.append(f"running_var by up to {var.max_rel:.2%} relative")
        farthest = f"; {labels[worst.farthest]} is farthest from the mean" if n > 2 else ""
        nonfinite = sum(sp.nonfinite_mismatch for sp in spreads.values())
        findings.append(
            Finding(
                "bn-ranks-disagree",
                "warning",
                layer,
                f"the {n} ranks hold different BN running statistics (in {layer}: "
                f"{', '.join(parts)}{farthest}): each rank estimated them from its own shard of "
                "the batches and they were never reconciled (local BN with dist_bn=none), so what "
                "is evaluated or saved depends on which rank's copy is used, and each copy "
                f"estimates from 1/{n} of the data",
                "reconcile them before evaluation and saving: train with dist_bn=reduce (normlab "
                "train; timm's --dist-bn reduce) or average the buffers: normlab convert "
                f"{target_hint} OUT --op reduce-ranks writes the averaged checkpoint",
                fixable=True,
                evidence={
                    "ranks": n,
                    "max_rel_diff_running_mean": None if mean is None else mean.max_rel,
                    "max_rel_diff_running_var": None if var is None else var.max_rel,
                    "max_abs_diff_running_mean": None if mean is None else mean.max_abs,
                    "max_abs_diff_running_var": None if var is None else var.max_abs,
                    "max_mean_diff_in_std": in_std,
                    "farthest_rank": labels[worst.farthest],
                    "nonfinite_mismatch": nonfinite,
                },
            )
        )
    for layer, spreads in others.items():
        bad = {name: sp for name, sp in spreads.items() if sp.disagree}
        if not bad:
            continue
        worst = max(bad.values(), key=lambda sp: sp.max_rel)
        prefix = "" if layer == "<root>" else f"{layer}."
        what = ", ".join(f"{prefix}{t}" for t in bad)
        farthest = f"; {labels[worst.farthest]} is farthest from the mean" if n > 2 else ""
        findings.append(
            Finding(
                "params-ranks-disagree",
                "error",
                layer,
                f"{what} {'differs' if len(bad) == 1 else 'differ'} between the {n} ranks (up to "
                f"{worst.max_rel:.3g} relative, {worst.max_abs:.3g} absolute{farthest}): DDP "
                "keeps parameters "
                "identical on every rank (same averaged gradient, same step), so either the "
                "gradients were not synchronised (no DistributedDataParallel wrapper, no_sync() "
                "without a synchronised step, a rank-local update) or the files come from "
                "different steps, epochs or runs",
                "wrap the model in DistributedDataParallel and let every rank take every step; "
                "compare checkpoints written at the same step",
                fixable=False,
                evidence={
                    "ranks": n,
                    "tensors": sorted(bad),
                    "max_rel_diff": worst.max_rel,
                    "max_abs_diff": worst.max_abs,
                    "farthest_rank": labels[worst.farthest],
                },
            )
        )
    shown = ", ".join(labels[:4]) + (f" and {n - 4} more" if n > 4 else "")
    notes = [
        f"rank set: compared {n} ranks ({shown}): {len(bn_stats)} BN layer(s) with running "
        f"statistics, {sum(len(v) for v in others.values())} other tensor(s); tolerance "
        f"rtol={rtol:g}, atol={atol:g}"
    ]
    if not bn_stats:
        notes.append("rank set: no BN running statistics found")
    return Report(findings, target or f"{n} ranks: {shown}", ["ranks"], notes)
