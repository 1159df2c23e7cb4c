"""Read a study directory back: its frozen spec, and every planned run's files.

The run directories are the source of truth (``state.json`` only adds the reason of runs that
failed before writing anything). A planned run without a directory is ``pending``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from normlab.errors import ConfigError, NormlabError
from normlab.store import Predictions, RunDir
from normlab.study.executors import failure_reason
from normlab.study.layout import RUN_INFO, STATE_FILE, STUDY_FILE
from normlab.study.plan import StudyPlan, plan_study, saved_flips
from normlab.study.spec import StudySpec, spec_from_dict
from normlab.yamlio import read_yaml_mapping


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
    predictions: Predictions | None = None  # predictions.npz; None in runs made before it
    predictions_error: str | None = None  # why predictions.npz could not be read

    @property
    def arm(self) -> str:
        return f"{self.group}/{self.variant}" if self.group else self.variant

    @property
    def n_val(self) -> int | None:
        value = self.info.get("n_val")
        return int(value) if value else None

    def image_correctness(self, which: str) -> tuple[np.ndarray | None, str]:
        """``(correct, "")``: whether the run's ``"final"`` or ``"best"``-epoch model got each
        validation image right (bool [N], from ``predictions.npz``); or ``(None, why not)``.
        Predictions whose accuracy is not exactly the summary's are not used (a file from
        another state of the run)."""
        p = self.predictions
        if p is None:
            if self.predictions_error:
                return None, "predictions.npz unreadable"
            return None, "made before normlab kept predictions"
        correct = p.correct(which)
        if correct is None:
            return None, "best epoch trained before normlab kept predictions"
        epoch = p.final_epoch if which == "final" else p.best_epoch
        expected = self.summary.get(f"{which}/val/acc")
        counted = int(np.count_nonzero(correct)) / p.n
        if expected != counted or epoch != self.summary.get(
            "epochs_completed" if which == "final" else "best/epoch"
        ):
            return None, "predictions.npz does not match summary.json"
        return correct, ""


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
    doc = read_yaml_mapping(path, what="study file", expected="a mapping of study keys")
    meta = dict(doc.get("meta") or {})
    spec = spec_from_dict(doc, source=str(path))
    plan = plan_study(
        spec, out, runtime={}, probes=list(spec.optional_probes), flips=saved_flips(spec)
    )
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
            config = rd.read_config_doc()
        predictions, predictions_error = None, None
        try:
            predictions = rd.read_predictions()
        except NormlabError as exc:  # one bad file costs its comparisons, not the report
            predictions_error = str(exc)
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
                predictions=predictions,
                predictions_error=predictions_error,
            )
        )
    return StudyData(out=out, spec=plan.spec, meta=meta, plan=plan, runs=runs)
