"""The doctor's table of checks: one registered entry per finding id.

Every finding the doctor can report is a :class:`Check` in :data:`CHECK_REGISTRY` (a
:class:`normlab.registry.Registry`): its id, the severities it may carry, a short title, what it
means (the docs table's text), the *kind* of input it looks at, and the function that runs it.
The ``CHECKS`` table of :mod:`normlab.bn.diagnose` and the docs table (``docs/doctor_checks.md``,
:func:`checks_markdown`) are generated from here, so the three cannot drift apart, and a
:class:`~normlab.bn.findings.Finding` with an unregistered id or severity is refused.

Kinds, and what their function receives:

========  =========================================================================================
kind      function
========  =========================================================================================
layer     ``(layer, ctx) -> findings``: once per norm layer of a family in ``families``; layers
          whose tensors are not finite reach only checks with ``on_broken=True``
model     ``(ctx) -> findings``: once per model (the training verdict, the missing graph)
file      ``(ctx) -> findings``: once per target file (``ctx.path``), before or without a model:
          content that would run code when its framework loads it. ``ctx.memo`` runs a scanner
          once for all the file checks that share its result
data      run by :func:`normlab.bn.diagnose.diagnose` when real batches are given
ranks     run by :func:`normlab.bn.diagnose.diagnose_rank_set` on per-rank state_dicts
========  =========================================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normlab.bn.graph import NormLayer
from normlab.registry import Registry

if TYPE_CHECKING:
    from normlab.bn.evidence import TrainingVerdict
    from normlab.bn.findings import Finding

__all__ = [
    "CHECK_REGISTRY",
    "KINDS",
    "SEVERITIES",
    "Check",
    "CheckContext",
    "all_checks",
    "check",
    "checks_markdown",
]

SEVERITIES = ("error", "warning", "info")
KINDS = ("file", "layer", "model", "data", "ranks")
BN_FAMILIES = ("batchnorm", "frozen_bn")


@dataclass(frozen=True)
class Check:
    """One finding id: what it means and how it is found."""

    id: str
    severities: tuple[str, ...]
    title: str
    """A few words (the ``CHECKS`` table's value)."""
    what: str
    """What it means, for the docs table."""
    kind: str
    run: Callable[..., Iterable[Finding]] | None = field(default=None, compare=False)
    families: tuple[str, ...] = BN_FAMILIES
    """Layer checks: the norm families they look at."""
    on_broken: bool = False
    """Layer checks: also run on a layer whose statistics or affine are not finite."""


CHECK_REGISTRY: Registry[Check] = Registry("doctor check")


def check(
    id: str,
    severity: str | tuple[str, ...],
    title: str,
    what: str,
    *,
    kind: str,
    families: tuple[str, ...] = BN_FAMILIES,
    on_broken: bool = False,
) -> Callable[[Callable[..., Iterable[Finding]]], Callable[..., Iterable[Finding]]]:
    """Register the decorated function as the check of finding ``id`` (see the module table)."""
    severities = (severity,) if isinstance(severity, str) else tuple(severity)
    if not severities or any(s not in SEVERITIES for s in severities):
        raise ValueError(f"check {id!r}: severities must be among {SEVERITIES}, got {severities}")
    if kind not in KINDS:
        raise ValueError(f"check {id!r}: kind must be one of {KINDS}, got {kind!r}")

    def add(fn: Callable[..., Iterable[Finding]]) -> Callable[..., Iterable[Finding]]:
        CHECK_REGISTRY.register(
            id, Check(id, severities, title, what, kind, fn, families, on_broken)
        )
        return fn

    return add


def all_checks(kind: str | None = None) -> list[Check]:
    """Registered checks (of one ``kind``), most severe first, then by kind and id."""
    items = [CHECK_REGISTRY.get(name) for name in CHECK_REGISTRY]
    items = [c for c in items if kind is None or c.kind == kind]
    return sorted(
        items, key=lambda c: (SEVERITIES.index(c.severities[0]), KINDS.index(c.kind), c.id)
    )


@dataclass
class CheckContext:
    """What every check may read about the model under examination."""

    layers: Sequence[NormLayer]
    training: TrainingVerdict
    context: str = "inference"
    mode_recorded: bool = False
    batch_size: int | None = None
    min_count: int = 16
    graph_method: str = "fx"
    target_hint: str = "TARGET"
    path: Path | None = None
    """The target's file, for file checks (None for a live model)."""
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def trained(self) -> bool:
        return self.training.verdict == "trained"

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, once per context: e.g. one file scan shared by several file checks."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def recalibrate_fix(self, layer: NormLayer) -> str:
        """How to recompute a layer's statistics, in its framework."""
        if layer.convention == "torch":
            return f"normlab recalibrate {self.target_hint} --data D"
        return (
            f"run training data through the {layer.convention} model in training mode with "
            "its weights frozen (or load it into PyTorch and use normlab recalibrate)"
        )


def checks_markdown() -> str:
    """The docs table of every registered check (``docs/doctor_checks.md``'s body)."""
    lines = [
        "| id | severity | kind | what |",
        "|----|----------|------|------|",
    ]
    for c in all_checks():
        what = " ".join(c.what.split()).replace("``", "`").replace("|", "\\|")
        lines.append(f"| `{c.id}` | {' / '.join(c.severities)} | {c.kind} | {what} |")
    return "\n".join(lines) + "\n"
