"""Read a study directory back: its frozen spec, and every planned run's files.

The run directories are the source of truth (``state.json`` only adds the reason of runs that
failed before writing anything). A planned run without a directory is ``pending``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from normlab.errors import ConfigError
from normlab.store import RunDir
from normlab.study.executors import RUN_INFO, failure_reason
from normlab.study.plan import StudyPlan, plan_study
from normlab.study.runner import STATE_FILE
from normlab.study.spec import STUDY_FILE, StudySpec, spec_from_dict


@dataclass
class RunRecord:
    """One run of a study as its directory holds it."""

    key: str
    group: str | None
    variant: str
    seed: int
    run_dir: Path
    status: str  # completed | diverged | failed | running (unfinished) | pending (not started)
    reason: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # config.yaml, with its meta
    info: dict[str, Any] = field(default_factory=dict)  # study_run.json (n_train, n_val)

    @property
    def arm(self) -> str:
        return f"{self.group}/{self.variant}" if self.group else self.variant

    @property
    def n_val(self) -> int | None:
        value = self.info.get("n_val")
        return int(value) if value else None


@dataclass
class StudyData:
    """A study directory, read: the frozen spec, its ``meta``, the plan and every run."""

    out: Path
    spec: StudySpec
    meta: dict[str, Any]
    plan: StudyPlan
    runs: list[RunRecord]

    def arm_runs(self, group: str | None, variant: str) -> list[RunRecord]:
        return [r for r in self.runs if r.group == group and r.variant == variant]


def load_study(out: str | Path) -> StudyData:
    """Read the study directory ``out``; ConfigError when it holds no study."""
    out = Path(out)
    path = out / STUDY_FILE
    if not path.is_file():
        raise ConfigError(f"{out} is not a study directory (no {STUDY_FILE})")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    meta = dict(doc.get("meta") or {}) if isinstance(doc, dict) else {}
    spec = spec_from_dict(doc, source=str(path))
    plan = plan_study(spec, out, runtime={}, probes=list(spec.optional_probes))
    reasons: dict[str, str] = {}
    state_path = out / STATE_FILE
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
            reasons = {
                k: v.get("reason") for k, v in state.get("runs", {}).items() if v.get("reason")
            }
        except (json.JSONDecodeError, AttributeError):
            reasons = {}
    runs = []
    for r in plan.runs:
        rd = RunDir(r.run_dir)
        summary = rd.read_summary() or {}
        status = str(summary.get("status") or "")
        if status not in ("completed", "diverged", "failed"):
            status = "running" if rd.exists() else ("failed" if r.key in reasons else "pending")
        config: dict[str, Any] = {}
        if rd.config_path.is_file():
            config = yaml.safe_load(rd.config_path.read_text(encoding="utf-8")) or {}
        info: dict[str, Any] = {}
        info_path = r.run_dir / RUN_INFO
        if info_path.is_file():
            try:
                info = json.loads(info_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                info = {}
        runs.append(
            RunRecord(
                key=r.key,
                group=r.group,
                variant=r.variant,
                seed=r.seed,
                run_dir=r.run_dir,
                status=status,
                reason=failure_reason(summary) or reasons.get(r.key),
                summary=summary,
                rows=rd.read_metrics(),
                config=config,
                info=info,
            )
        )
    return StudyData(out=out, spec=plan.spec, meta=meta, plan=plan, runs=runs)
