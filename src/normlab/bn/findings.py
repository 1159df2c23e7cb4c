"""The doctor's report model: :class:`Finding`, :class:`Report`, their JSON and text forms.

A finding's id and severity must be registered (:mod:`normlab.bn.checks`): a typo in a check is
an error at the point it is made, never an unlisted id in a user's CI. Exit status of a report:
0 clean (info findings only), 1 warnings, 2 errors.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from normlab.bn.checks import CHECK_REGISTRY, SEVERITIES

__all__ = ["Finding", "Report"]


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
        if self.id not in CHECK_REGISTRY:
            raise ValueError(f"unknown finding id {self.id!r}")
        allowed = CHECK_REGISTRY.get(self.id).severities
        if self.severity not in allowed:
            raise ValueError(
                f"finding {self.id!r} has severity {self.severity!r}; registered: {allowed}"
            )


@dataclass
class Report:
    """The doctor's findings about one model."""

    findings: list[Finding]
    target: str = "model"
    checks: list[str] = field(default_factory=list)
    """Which kinds of checks ran: ``file``, ``static``, ``graph``, ``dynamic``, ``data``,
    ``ranks``."""
    notes: list[str] = field(default_factory=list)
    training: dict[str, Any] | None = None
    """The training verdict and the evidence it rests on
    (:meth:`normlab.bn.evidence.TrainingVerdict.to_dict`); None when not assessed."""

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
            "training": self.training,
            "findings": [asdict(f) for f in self.findings],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n"

    def format_text(self, max_layers: int = 8) -> str:
        """Findings grouped by id (errors first), one block per id listing its layers."""
        lines = [f"normlab doctor: {self.target}"]
        if self.checks:
            lines.append(f"  checks: {', '.join(self.checks)}")
        if self.training is not None:
            lines.append(f"  training: {self.training['summary']}")
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
