"""docs/findings/progress.py carries a study's finished runs to a fresh machine through git:
a study restored from the record trains only what had not finished, and its report is the
one the original directory gives."""

from __future__ import annotations

import importlib.util
import io
import shutil
from pathlib import Path

import pytest
import yaml
from _helpers import tiny_base

from normlab.report import write_report
from normlab.study.runner import run_study
from normlab.study.spec import spec_from_dict

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "findings" / "progress.py"


def _progress():
    spec = importlib.util.spec_from_file_location("findings_progress", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _spec():
    return spec_from_dict(
        {
            "name": "carried",
            "seeds": 2,
            "base": tiny_base(),
            "variants": {"bn": {}, "gn": {"norm.name": "gn"}},
        }
    )


@pytest.mark.slow
def test_finished_runs_survive_a_new_machine_and_unfinished_ones_are_trained(tmp_path):
    progress = _progress()
    old, new = tmp_path / "old", tmp_path / "new"
    study = old / "studies" / "findings" / "ladders" / "s"
    assert run_study(_spec(), study, executor="serial", stream=None).ok
    write_report(study)
    # one run "was still training" when the machine went: it must not be recorded
    unfinished = study / "runs" / "gn" / "seed-1"
    (unfinished / "summary.json").write_text('{"status": "running"}')
    assert progress.save("ladders/s", old) == 3
    assert progress.save("ladders/s", old) == 0  # nothing new: nothing copied
    record = old / "docs" / "findings" / "progress" / "ladders" / "s"
    assert not list(record.rglob("*.pt"))  # no checkpoints in git
    assert not (record / "runs" / "gn" / "seed-1").exists()
    # the study's settled decisions travel too: a new machine must not re-decide them
    assert (record / "study.yaml").read_bytes() == (study / "study.yaml").read_bytes()

    shutil.copytree(old / "docs", new / "docs")  # a fresh clone: the record only
    assert progress.restore("ladders/s", new) == 3
    carried = new / "studies" / "findings" / "ladders" / "s"
    assert (carried / "study.yaml").is_file()
    log = io.StringIO()
    result = run_study(_spec(), carried, executor="serial", stream=log)
    assert result.ok and result.count("completed") == 4
    assert "3 already finished, 1 to run" in log.getvalue()  # only the unfinished one trains
    for key in ("bn/seed-0", "bn/seed-1", "gn/seed-0"):  # carried as they were
        a, b = (d / "runs" / key / "summary.json" for d in (study, carried))
        assert a.read_bytes() == b.read_bytes()
    cfg = yaml.safe_load((carried / "runs" / "gn" / "seed-1" / "config.yaml").read_text())
    assert cfg["norm"]["name"] == "gn"
    write_report(carried)  # the report reads the carried records without checkpoints
    assert "gn" in (carried / "report.md").read_text()
    assert progress.restore("ladders/s", new) == 0  # finished runs are never overwritten
