"""The BN doctor: find the normalization defects that silently break models.

:func:`diagnose` runs *static* checks on the graph and the stored tensors of any model (a live
``nn.Module``, or the :class:`~normlab.bn.graph.NormLayer` records read from a state_dict, an
ONNX file or a Keras file) and, when it can run the model on a batch, *dynamic* checks. Every
finding has a stable id, a severity, the layer, a plain explanation, the fix, and whether
normlab can apply that fix (``fixable``). Exit status of ``normlab doctor``: 0 clean (info
findings only), 1 warnings, 2 errors.

The checks are a table: each finding id is one small function registered with its severity and
title (:mod:`normlab.bn.checks`); :data:`CHECKS` (id -> title) and the docs table
``docs/doctor_checks.md`` (regenerate: ``python -m normlab.bn.checks_doc``) are generated from
it. The jobs live in their own modules: the report model (:mod:`~normlab.bn.findings`), the
static checks (:mod:`~normlab.bn.static_checks`, :mod:`~normlab.bn.training_checks`), the dynamic
ones (:mod:`~normlab.bn.dynamic_checks`) and the rank-set comparison (:mod:`~normlab.bn.ranks`);
this module runs them.

Trained or untrained (for ``bn-stats-initial``): a freshly initialised network legitimately has
mean 0 / var 1. The verdict comes from evidence (:mod:`normlab.bn.evidence`): the caller's word
(``trained=``), the file's optimizer and step counters (``evidence=``), ``num_batches_tracked``,
and whether the affine parameters left their initial values; the report's ``training`` entry
and every verdict-dependent finding name the evidence it rests on.

Dynamic checks need input: ``data`` (real batches: every dynamic check, including the
estimation shift) or ``example_input`` (e.g. a synthetic batch of the right shape: mode and
update checks only; statistics of noise say nothing about a model's data). They run on deep
copies: the model passed in is never modified.

File checks (kind ``file``, e.g. content that would run code when loaded) receive the target's
path: :func:`file_findings` runs them alone (before a file is loaded), and :func:`diagnose` /
:func:`diagnose_layers` run them when given ``path``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normlab.bn import file_checks, static_checks, training_checks
from normlab.bn.checks import SEVERITIES, CheckContext, all_checks
from normlab.bn.dynamic_checks import (
    DataInput,
    batch_dependence,
    first_input,
    updates_in_current_mode,
)
from normlab.bn.evidence import (
    Evidence,
    declared,
    gradient_evidence,
    layer_evidence,
    training_verdict,
)
from normlab.bn.findings import Finding, Report
from normlab.bn.graph import ModelGraph, NormLayer, analyze, eval_mode
from normlab.bn.ranks import diagnose_rank_set
from normlab.errors import NormlabError

__all__ = [
    "CHECKS",
    "SEVERITIES",
    "Finding",
    "Report",
    "diagnose",
    "diagnose_layers",
    "diagnose_rank_set",
    "file_findings",
]

assert file_checks and training_checks  # imported to register their checks

CHECKS: dict[str, str] = {c.id: c.title for c in all_checks()}
"""Every finding id and its short title, from the registry (ids are stable: CI scripts may
match on them)."""


def _file_checks(ctx: CheckContext) -> list[Finding]:
    if ctx.path is None:
        return []
    return [f for c in all_checks("file") if c.run is not None for f in c.run(ctx)]


def file_findings(path: str | Path, *, target_hint: str | None = None) -> list[Finding]:
    """The file checks alone on ``path``, without loading it as a model."""
    ctx = CheckContext(
        layers=[],
        training=training_verdict(()),
        target_hint=target_hint or str(path),
        path=Path(path),
    )
    return _file_checks(ctx)


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
    evidence: Sequence[Evidence] = (),
    path: str | Path | None = None,
) -> Report:
    """Static checks on already-extracted layer records (from an ONNX/Keras file or a state_dict).

    Arguments as :func:`diagnose`; ``graph_method`` says how the links were found (``none``:
    graph checks are skipped and a ``graph-unavailable`` note says so).
    """
    verdict = training_verdict([*declared(trained), *evidence, *layer_evidence(layers)])
    ctx = CheckContext(
        layers=layers,
        training=verdict,
        context=context,
        mode_recorded=mode_recorded,
        batch_size=batch_size,
        min_count=min_count,
        graph_method=graph_method,
        target_hint=target_hint,
        path=None if path is None else Path(path),
    )
    file_found = _file_checks(ctx)
    findings = [*file_found, *static_checks.static_findings(ctx)]
    checks = (["file"] if ctx.path is not None and all_checks("file") else []) + ["static"]
    checks += ["graph"] if graph_method != "none" else []
    return Report(findings, target, checks, list(notes), verdict.to_dict())


# ---- the whole doctor ------------------------------------------------------------------------


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
    evidence: Sequence[Evidence] = (),
    path: str | Path | None = None,
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
        evidence: what the model's file says about training (:mod:`normlab.bn.evidence`, e.g.
            :func:`~normlab.bn.evidence.target_evidence`), weighed with what the layers say.
        path: the model's file, for the file checks (none are registered yet).
    """
    if context not in ("inference", "training"):
        raise NormlabError(f"context must be 'inference' or 'training', got {context!r}")
    x = example_input
    if data is not None and x is None:
        x = first_input(data)
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
        evidence=[*evidence, *gradient_evidence(model.parameters())],
        path=path,
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
        diff = batch_dependence(model, x)
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
        moved = updates_in_current_mode(model, x)
        for f in frozen:
            f.evidence["statistics_moved_in_one_forward"] = f.layer in moved
    # ---- estimation shift (real data only)
    if data is not None:
        report.checks.append("data")
        if report.training is not None and report.training["verdict"] == "trained":
            skip = {
                f.layer
                for f in report.findings
                if f.layer
                and f.id in ("bn-stats-initial", "bn-frozen-initial", "bn-stats-nonfinite")
            }
            batches = [data] if isinstance(data, Tensor) else data
            given = DataInput(
                model,
                batches,
                max_batches,
                shift_mean_threshold,
                shift_var_threshold,
                target_hint,
                skip,
            )
            for c in all_checks("data"):
                if c.run is not None:
                    report.findings.extend(c.run(given))
        else:
            report.notes.append(
                "estimation shift not checked: the model is not known to be trained "
                f"({report.training['summary'] if report.training else 'not assessed'})"
            )
    return report
