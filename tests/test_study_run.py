"""Running studies: a tiny study end to end, failures that do not stop the others, resuming
after the study process is killed with SIGKILL, and one study process per directory."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from _helpers import stable, subprocess_env, tiny_base

from normlab.cli import main
from normlab.errors import ConfigError
from normlab.report import write_report
from normlab.store import RunDir
from normlab.study.executors import LocalExecutor, available_cores
from normlab.study.runner import Progress, RunState, read_state, run_study, study_lock
from normlab.study.spec import load_spec, spec_from_dict

torch.set_num_threads(1)


def tiny_spec(**base) -> dict:
    return {
        "name": "tiny",
        "seeds": 2,
        "base": tiny_base(**base),
        "variants": {"bn": {"norm.name": "bn"}, "gn": {"norm.name": "gn", "norm.gn_groups": 8}},
    }


@pytest.mark.slow
def test_tiny_study_end_to_end_to_a_report(tmp_path):
    out = tmp_path / "study"
    result = run_study(spec_from_dict(tiny_spec()), out, jobs=2, stream=None)
    assert result.ok and result.count("completed") == 4
    write_report(out)
    assert sorted(result.runs) == ["bn/seed-0", "bn/seed-1", "gn/seed-0", "gn/seed-1"]
    for key in result.runs:
        rd = RunDir(out / "runs" / key.replace("/seed-", "/seed-"))
        assert [r["epoch"] for r in rd.read_metrics()] == [1, 2]
        cfg = yaml.safe_load(rd.config_path.read_text())
        assert cfg["runtime"]["threads"] == 1 and cfg["runtime"]["precision"] in ("fp32", "bf16")
        info = json.loads((rd.path / "study_run.json").read_text())
        assert info["n_val"] == 16 and info["n_train"] == 48 and info["key"] == key
    state = read_state(out)
    assert state is not None and state["counts"] == {"completed": 4}
    saved = yaml.safe_load((out / "study.yaml").read_text())
    assert saved["meta"]["executor"] == "local" and saved["base"]["runtime"]["precision"]
    assert {p.name for p in out.iterdir()} >= {
        "study.yaml",
        "state.json",
        "runs",
        "report.html",
        "report.md",
        "results.csv",
        "figures",
    }
    # every variant used the same arithmetic
    precisions = {
        yaml.safe_load((out / "runs" / k / "config.yaml").read_text())["runtime"]["precision"]
        for k in ("bn/seed-0", "gn/seed-1")
    }
    assert len(precisions) == 1

    # the same command again finds everything finished and trains nothing
    before = {k: (out / "runs" / k / "metrics.jsonl").stat().st_mtime_ns for k in result.runs}
    again = run_study(spec_from_dict(tiny_spec()), out, jobs=2, stream=None)
    assert again.ok
    after = {k: (out / "runs" / k / "metrics.jsonl").stat().st_mtime_ns for k in result.runs}
    assert before == after


@pytest.mark.slow
def test_failed_and_diverged_runs_are_recorded_and_do_not_stop_the_others(tmp_path, capsys):
    spec = {
        "name": "trouble",
        "seeds": 1,
        "base": tiny_base(model={"name": "mlp", "hidden": [32]}),
        "variants": {
            "ok": {"norm.name": "bn"},
            # a loss that overflows: marked diverged with where it happened
            "explodes": {
                "norm.name": "none",
                "optim.lr": 1.0e12,
                "optim.schedule": "constant",
                "optim.momentum": 0.0,
            },
            # a setting fit refuses before writing anything
            "too-big": {"batch_size": 1000},
        },
    }
    path = tmp_path / "trouble.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "out"
    code = main(["study", str(path), "--out", str(out), "--jobs", "2", "--quiet"])
    assert code == 1  # a run failed
    state = read_state(out)
    assert state is not None
    runs = state["runs"]
    assert runs["ok/seed-0"]["status"] == "completed"
    assert runs["explodes/seed-0"]["status"] == "diverged"
    assert "NaN/Inf at epoch 1" in runs["explodes/seed-0"]["reason"]
    assert runs["too-big/seed-0"]["status"] == "failed"
    assert "TrainingError" in runs["too-big/seed-0"]["reason"]
    assert "batch_size=1000" in runs["too-big/seed-0"]["reason"]
    # threads per run: the cores shared among the jobs
    cfg = yaml.safe_load((out / "runs" / "ok" / "seed-0" / "config.yaml").read_text())
    assert cfg["runtime"]["threads"] == max(1, available_cores() // 2)
    assert LocalExecutor(jobs=2).threads_per_run(10) == max(1, available_cores() // 2)
    # the report lists them with their reasons
    md = (out / "report.md").read_text()
    assert "## Failed, diverged and unfinished runs" in md and "TrainingError" in md
    assert "explodes: 1 of 1 runs diverged" in md
    # a rerun retries the failed run (it fails again) and keeps the diverged one as a result
    assert main(["study", str(path), "--out", str(out), "--quiet", "--no-report"]) == 1
    runs = read_state(out)["runs"]  # type: ignore[index]
    assert runs["explodes/seed-0"]["status"] == "diverged"


def test_dry_run_and_one_process_per_study_directory(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(), sort_keys=False))
    out = tmp_path / "out"
    assert main(["study", str(path), "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].split()[:3] == ["bn/seed-0", "pending", "0/2"]
    with study_lock(out):
        assert main(["study", str(path), "--out", str(out), "--quiet"]) == 2
        assert "in use by another normlab study process" in capsys.readouterr().err


def test_cli_settings_reach_the_runs_and_shadowed_ones_are_named(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(), sort_keys=False))
    out = tmp_path / "out"
    argv = ["study", str(path), "--out", str(out), "--seeds", "1", "--epochs", "1"]
    argv += ["--set", "optim.lr=0.02", "--set", "norm.name=ln", "--executor", "serial"]
    assert main([*argv, "--quiet", "--no-report"]) == 0
    err = capsys.readouterr().err
    assert "note: norm.name (variant bn) sets its own value" in err
    cfg = yaml.safe_load((out / "runs" / "gn" / "seed-0" / "config.yaml").read_text())
    assert cfg["epochs"] == 1 and cfg["optim"]["lr"] == 0.02 and cfg["norm"]["name"] == "gn"
    assert not (out / "runs" / "gn" / "seed-1").exists()
    # the study directory alone resumes (here: finds everything done, trains nothing)
    metrics = out / "runs" / "gn" / "seed-0" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    assert main(["study", str(out), "--quiet", "--no-report"]) == 0
    assert metrics.stat().st_mtime_ns == before
    # a different setting for the same directory is refused before anything runs
    assert main(["study", str(path), "--out", str(out), "--seeds", "1", "--epochs", "2"]) == 2
    assert "epochs: run has 1, study gives 2" in capsys.readouterr().err


def test_progress_counts_epochs_and_estimates_the_time_left(tmp_path):
    runs = {
        f"v/seed-{i}": RunState(f"v/seed-{i}", None, "v", i, f"runs/v/seed-{i}", epochs=4)
        for i in range(3)
    }
    runs["v/seed-0"].status, runs["v/seed-0"].epochs_done = "completed", 4
    runs["v/seed-1"].status = "running"
    metrics = tmp_path / "runs" / "v" / "seed-1" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    stream = io.StringIO()
    progress = Progress("demo", runs, tmp_path, stream, live=False)
    assert progress.eta() is None  # nothing trained yet in this session
    metrics.write_text('{"epoch": 1}\n{"epoch": 2}\n')
    progress.t0 -= 10.0  # 2 epochs in 10 s
    progress.poll()
    assert runs["v/seed-1"].epochs_done == 2
    assert progress.eta() == pytest.approx((2 + 4) / (2 / 10.0), rel=0.05)
    line = progress.status_line()
    assert line.startswith("1/3 runs done, 1 running, 0 failed/diverged | epochs 6/12")
    runs["v/seed-1"].status, runs["v/seed-1"].reason = "failed", "boom"
    progress.finished(runs["v/seed-1"])
    assert "demo v/seed-1: failed (boom) | 1/3 runs done, 0 running, 1 failed" in stream.getvalue()
    # on a terminal: one live line (tqdm) instead
    live = Progress("demo", runs, tmp_path, io.StringIO(), live=True)
    live.poll()
    live.close()


def _children(pid: int) -> list[int]:
    found = []
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return found
    for child in map(int, text.split()):
        found += [child, *_children(child)]
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_resume_after_sigkill_loses_and_duplicates_no_epoch(tmp_path):
    spec = tiny_spec(epochs=6)
    spec["seeds"] = 1
    spec["base"]["data"]["synthetic_samples"] = 384
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "normlab", "study", str(path), "--out", str(out)]
    cmd += ["--jobs", "2", "--quiet", "--no-report"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stderr=subprocess.PIPE)
    metrics = [out / "runs" / v / "seed-0" / "metrics.jsonl" for v in ("bn", "gn")]
    deadline = time.monotonic() + 240
    workers: list[int] = []
    while time.monotonic() < deadline:
        workers = _children(proc.pid) or workers
        if any(m.is_file() and m.read_text().strip() for m in metrics):
            break
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("no run wrote a metrics row within 240 s")
    workers = _children(proc.pid) or workers
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    rows_at_kill = {m.parent.parent.name: len(RunDir(m.parent).read_metrics()) for m in metrics}
    assert any(0 < n < 6 for n in rows_at_kill.values()), rows_at_kill  # killed mid-run
    # the workers die with the study process (they must not go on writing the runs)
    until = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < until:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)

    # the same command resumes: no epoch lost or duplicated
    rerun = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    resumed = {v: RunDir(out / "runs" / v / "seed-0").read_metrics() for v in ("bn", "gn")}
    for rows in resumed.values():
        assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # and the metrics are those of an uninterrupted study (same threads: bit-identical)
    reference = tmp_path / "reference"
    run_study(load_spec(path), reference, executor="serial", stream=None)
    for v, rows in resumed.items():
        expected = RunDir(reference / "runs" / v / "seed-0").read_metrics()
        assert stable(rows) == stable(expected)
    state = read_state(out)
    assert state is not None and state["counts"] == {"completed": 2}


def test_unknown_executor_and_bad_jobs(tmp_path):
    spec = spec_from_dict(tiny_spec())
    with pytest.raises(
        ConfigError, match="unknown executor 'cloud'; known executors: local, ray, serial"
    ):
        run_study(spec, tmp_path / "a", executor="cloud", stream=None)
    with pytest.raises(ConfigError, match="--jobs must be >= 1"):
        run_study(spec, tmp_path / "b", jobs=0, stream=None)
    with pytest.raises(ConfigError, match="--ray-address is for --executor ray"):
        run_study(spec, tmp_path / "c", ray_address="localhost:1", stream=None)
