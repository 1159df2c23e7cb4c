"""Run store: atomic writes, torn lines, truncation on resume."""

from __future__ import annotations

import json
import math

import torch

from normlab.store import RunDir, atomic_write_text


def test_metrics_append_read_and_truncate(tmp_path):
    run = RunDir(tmp_path / "run")
    for epoch in range(1, 4):
        run.append_metrics({"epoch": epoch, "val/acc": epoch / 10, "nan": float("nan")})
    rows = run.read_metrics()
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["nan"] is None  # JSON has no NaN: stored as null
    # a crash mid-append leaves a torn final line: ignored on read
    with open(run.metrics_path, "a") as fh:
        fh.write('{"epoch": 4, "val/a')
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2, 3]
    kept = run.truncate_metrics(2)
    assert [r["epoch"] for r in kept] == [1, 2]
    lines = run.metrics_path.read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_checkpoint_and_summary_round_trip(tmp_path):
    run = RunDir(tmp_path)
    assert run.load_checkpoint() is None and run.read_summary() is None
    state = {"epoch": 3, "model": {"w": torch.arange(4.0)}, "rng": torch.get_rng_state()}
    run.save_checkpoint(state)
    loaded = run.load_checkpoint()
    assert loaded is not None and loaded["epoch"] == 3
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))
    run.write_summary({"status": "running", "best/val/acc": math.inf})
    assert run.read_summary() == {"status": "running", "best/val/acc": None}


def test_one_compat_check_for_resume_and_studies_takes_an_unquoted_old_string(tmp_path):
    from _helpers import tiny_config

    from normlab.config import config_to_dict
    from normlab.store import config_differences
    from normlab.yamlio import loads

    planned = config_to_dict(tiny_config(**{"data.name": "imagefolder", "data.path": "1e3"}))
    # an older normlab wrote the path unquoted; it reads back as the number-like text it was
    old = loads("data:\n  path: 1e3\n")
    saved = {**planned, "data": {**planned["data"], "path": old["data"]["path"]}}
    assert config_differences(saved, planned) == []
    other = {**planned, "data": {**planned["data"], "path": "1e4"}}
    assert config_differences(saved, other) == ["data.path: run has '1e3', given '1e4'"]
    # runtime values given as auto agree with what the run resolved; other keys must match
    resolved = {**planned, "runtime": {**planned["runtime"], "device": "cpu"}}
    assert (
        config_differences(
            resolved, {**planned, "runtime": {**planned["runtime"], "device": "auto"}}
        )
        == []
    )
    assert config_differences(resolved, {**resolved, "epochs": 3}) == ["epochs: run has 2, given 3"]
