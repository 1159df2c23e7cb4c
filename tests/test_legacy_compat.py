"""Run and study directories written by older normlab (tests/fixtures/legacy, made at commit
2d58183 by its make_fixtures.py) still resume, report and load with this code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _helpers import stable

from normlab.bn import load_target
from normlab.report import write_report
from normlab.store import RunDir
from normlab.study.runner import read_state, run_study
from normlab.study.spec import load_spec
from normlab.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy"


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    dest = tmp_path / "legacy"
    shutil.copytree(LEGACY, dest)
    return dest


def assert_close_rows(got: list[dict], expected: list[dict]) -> None:
    """Metric rows equal key by key, up to the last bits another CPU may round differently."""
    assert [sorted(r) for r in got] == [sorted(r) for r in expected]
    for g, e in zip(got, expected, strict=True):
        for key, value in e.items():
            assert g[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (g["epoch"], key)


def test_an_old_interrupted_run_resumes_to_the_old_codes_numbers(legacy: Path) -> None:
    run = legacy / "run_interrupted"
    assert RunDir(run).read_summary()["status"] == "running"
    result = fit(None, out=run, resume=True, verbose=False)
    assert result.status == "completed"
    assert [r["epoch"] for r in result.metrics] == [1, 2, 3]
    # the saved config is kept as it was written (flips on, the default of that time)
    assert result.config.data.flip is True
    expected = json.loads((legacy / "expected_metrics.json").read_text())
    got = stable(result.metrics)
    assert_close_rows(got, expected)
    # and what an uninterrupted run of the same saved config gives on this machine: equal up
    # to rounding only, since the resumed run starts from weights another CPU wrote (an AMX
    # Xeon rounds epoch 2's loss differently in the 8th digit); exact resume on one machine
    # is tested in test_train
    fresh = fit(result.config, out=legacy / "fresh", verbose=False)
    assert_close_rows(stable(fresh.metrics), got)
    # the epochs this code trained kept their predictions; epoch 1's (old code) are unknown
    kept = RunDir(run).read_predictions()
    assert kept is not None and kept.final_epoch == 3
    assert kept.accuracy("final") == result.summary["final/val/acc"]
    if result.summary["best/epoch"] == 1:
        assert kept.best is None
    else:
        assert kept.accuracy("best") == result.summary["best/val/acc"]


def test_an_old_study_resumes_runs_only_what_is_missing_and_reports(legacy: Path) -> None:
    study = legacy / "study"
    before = {p: p.stat().st_mtime_ns for p in study.rglob("checkpoint.pt")}
    assert len(before) == 3
    result = run_study(load_spec(study), study, executor="serial", stream=None)
    assert result.ok and result.count("completed") == 4
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished runs untouched
    assert read_state(study)["runs"]
    paths = write_report(study)
    assert Path(paths["markdown"]).is_file()
    assert Path(paths["csv"]).read_text().count("\n") >= 4
    # three of its runs were made before normlab kept per-image predictions
    md = Path(paths["markdown"]).read_text()
    assert "not available: runs made before normlab kept predictions (3 of 4 runs)" in md


def test_an_old_run_directory_loads_as_a_bn_toolbox_target(legacy: Path) -> None:
    target = load_target(str(legacy / "study" / "runs" / "bn" / "seed-0"))
    assert target.kind == "run" and target.model is not None
    norms = [m for m in target.model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == 1  # the MLP's one hidden BatchNorm1d, with its trained statistics
    assert int(norms[0].num_batches_tracked) == 2 * (256 // 32)
