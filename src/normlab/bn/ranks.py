"""Rank sets: one multi-process model's per-rank state_dicts, compared.

DDP keeps parameters identical on every rank, while BN running statistics stay rank-local
unless reconciled (SyncBN, or ``dist_bn`` reduce/broadcast), so disagreeing statistics are a
warning (``bn-ranks-disagree``) and disagreeing parameters an error (``params-ranks-disagree``).
:func:`diagnose_rank_set` measures every tensor's spread across ranks once
(:class:`RankComparison`); the two registered ``ranks`` checks read it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normlab.bn.checks import all_checks, check
from normlab.bn.findings import Finding, Report
from normlab.bn.load import _strip_prefix, require_same_keys
from normlab.errors import ConfigError, DataError

__all__ = ["RankComparison", "diagnose_rank_set"]

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


@dataclass(frozen=True)
class RankComparison:
    """Every tensor's spread across the ranks, grouped by module."""

    labels: list[str]
    states: list[dict[str, Tensor]]
    bn_stats: dict[str, dict[str, _Spread]]
    """module -> running_mean / running_var -> spread."""
    others: dict[str, dict[str, _Spread]]
    """module -> any other tensor (parameters, counters, buffers) -> spread."""
    target_hint: str

    @property
    def ranks(self) -> int:
        return len(self.states)


@check(
    "bn-ranks-disagree",
    "warning",
    "BN running statistics differ between ranks",
    "rank set: BN running statistics differ between ranks (local BN whose statistics were not "
    "reconciled: ``dist_bn: none``)",
    kind="ranks",
)
def bn_ranks_disagree(cmp: RankComparison) -> Iterator[Finding]:
    n, labels, states, target_hint = cmp.ranks, cmp.labels, cmp.states, cmp.target_hint
    for layer, spreads in cmp.bn_stats.items():
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
        yield Finding(
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


@check(
    "params-ranks-disagree",
    "error",
    "parameters differ between ranks",
    "rank set: parameters (or other state DDP keeps identical) differ between ranks: gradients "
    "were not synchronised, or the files come from different steps",
    kind="ranks",
)
def params_ranks_disagree(cmp: RankComparison) -> Iterator[Finding]:
    n, labels = cmp.ranks, cmp.labels
    for layer, spreads in cmp.others.items():
        bad = {name: sp for name, sp in spreads.items() if sp.disagree}
        if not bad:
            continue
        worst = max(bad.values(), key=lambda sp: sp.max_rel)
        prefix = "" if layer == "<root>" else f"{layer}."
        what = ", ".join(f"{prefix}{t}" for t in bad)
        farthest = f"; {labels[worst.farthest]} is farthest from the mean" if n > 2 else ""
        yield Finding(
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

    comparison = RankComparison(labels, states, bn_stats, others, target_hint)
    findings = [f for c in all_checks("ranks") if c.run for f in c.run(comparison)]
    n = len(states)
    shown = ", ".join(labels[:4]) + (f" and {n - 4} more" if n > 4 else "")
    notes = [
        f"rank set: compared {n} ranks ({shown}): {len(bn_stats)} BN layer(s) with running "
        f"statistics, {sum(len(v) for v in others.values())} other tensor(s); tolerance "
        f"rtol={rtol:g}, atol={atol:g}"
    ]
    if not bn_stats:
        notes.append("rank set: no BN running statistics found")
    return Report(findings, target or f"{n} ranks: {shown}", ["ranks"], notes)
