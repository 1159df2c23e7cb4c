"""TensorBoard and MLflow loggers: what they write, read back with each tool's own reader and
compared with metrics.jsonl (the record), through an interruption and a resume; a missing
extra is one line naming it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _helpers import tiny_base

from normlab.cli import main
from normlab.config import config_from_dict
from normlab.engine.loggers import make_loggers, parse_loggers, scalars
from normlab.errors import ConfigError
from normlab.store import RunDir
from normlab.train import Callback, fit

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

torch.set_num_threads(1)


def read_tensorboard(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_mlflow(store: Path) -> dict[str, dict]:
    """Every MLflow run in the file store: its tags, params and metric histories."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    out = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            keys = run.data.metrics
            out[run.info.run_name] = {
                "experiment": exp.name,
                "status": run.info.status,
                "tags": run.data.tags,
                "params": run.data.params,
                "metrics": {
                    k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
                    for k in keys
                },
            }
    return out


def expected_series(run: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in RunDir(run).read_metrics():
        for key, value in scalars(row).items():
            series.setdefault(key, []).append((int(row["epoch"]), value))
    return series


class StopAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, state, epoch):
        if epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.fixture(autouse=True)
def _file_store(monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


@pytest.mark.slow
def test_an_interrupted_and_resumed_run_logs_each_kept_row_exactly_once(tmp_path):
    run = tmp_path / "run"
    config = config_from_dict(tiny_base(epochs=3, probes=["weights"]))
    loggers = parse_loggers("tensorboard,mlflow")
    with pytest.raises(KeyboardInterrupt):
        fit(config, out=run, callbacks=[StopAt(3), *make_loggers(loggers)], verbose=False)
    assert [r["epoch"] for r in RunDir(run).read_metrics()] == [1, 2]
    mid = read_mlflow(run / "mlruns")[run.name]
    assert mid["status"] == "KILLED" and [s for s, _ in mid["metrics"]["val/acc"]] == [1, 2]

    # a stale event beyond what the run kept (as a crash could leave) must not survive
    from torch.utils.tensorboard import SummaryWriter

    stale = SummaryWriter(str(run / "tensorboard"))
    stale.add_scalar("val/acc", 123.0, global_step=99)
    stale.close()

    fit(None, out=run, resume=True, callbacks=make_loggers(loggers), verbose=False)
    expected = expected_series(run)
    assert [s for s, _ in expected["val/acc"]] == [1, 2, 3]
    assert any(k.startswith("weights/") for k in expected)  # the probe's scalars are logged

    board = read_tensorboard(run)
    assert set(board) == set(expected)
    for key, points in expected.items():  # TensorBoard keeps float32
        assert board[key] == [(s, float(torch.tensor(v, dtype=torch.float32))) for s, v in points]

    (logged,) = read_mlflow(run / "mlruns").values()
    assert logged["status"] == "FINISHED" and logged["experiment"] == "normlab"
    assert logged["metrics"] == expected  # exact, each epoch once
    assert logged["params"]["model.name"] == "resnet20" and logged["params"]["epochs"] == "3"
    # what is not a number is not logged
    row = RunDir(run).read_metrics()[0]
    assert set(logged["metrics"]) == {k for k, v in row.items() if k in scalars(row)}


def test_logger_specs_are_checked_before_anything_runs():
    assert [str(s) for s in parse_loggers("tensorboard, mlflow:/tmp/x")] == [
        "tensorboard",
        "mlflow:/tmp/x",
    ]
    for bad, message in [
        ("wandb", "unknown logger 'wandb'; known: tensorboard, mlflow"),
        ("tensorboard:/tmp/x", "only mlflow takes a directory"),
        ("mlflow,mlflow", "named twice"),
        ("", "expected logger names"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_loggers(bad)


@pytest.mark.parametrize(
    ("logger", "module"), [("tensorboard", "tensorboard"), ("mlflow", "mlflow")]
)
def test_a_missing_extra_is_one_line_naming_it(logger, module, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=rf"pip install 'normlab\[{logger}\]'"):
        parse_loggers(logger)
    code = main(["train", "--log", logger, "--out", str(tmp_path / "r"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"pip install 'normlab[{logger}]'" in err
    assert not (tmp_path / "r").exists()  # refused before anything ran


def test_a_study_names_its_loggers_and_keeps_them_in_study_yaml():
    from normlab.study.spec import spec_from_dict, spec_to_dict

    spec = {"name": "s", "seeds": 1, "base": tiny_base(), "variants": {"bn": {}}}
    logged = spec_from_dict({**spec, "log": ["tensorboard", "mlflow:/tmp/store"]})
    assert logged.log == ("tensorboard", "mlflow:/tmp/store")
    assert spec_from_dict(spec_to_dict(logged)).log == logged.log
    assert spec_from_dict(spec).log == () and "log" not in spec_to_dict(spec_from_dict(spec))
    with pytest.raises(ConfigError, match="unknown logger 'wandb'"):
        spec_from_dict({**spec, "log": ["wandb"]})


def test_a_study_refuses_loggers_it_cannot_carry_into_multi_process_runs():
    from normlab.study.spec import spec_from_dict

    spec = {"name": "s", "seeds": 1, "base": tiny_base(), "log": ["tensorboard"]}
    with pytest.raises(ConfigError, match="devices > 1 \\(ddp\\)"):
        spec_from_dict({**spec, "variants": {"one": {}, "ddp": {"devices": 2}}})


def test_the_study_command_takes_loggers_and_refuses_unknown_ones(tmp_path, capsys):
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump({"name": "s", "seeds": 1, "base": tiny_base(), "variants": {"bn": {}}})
    )
    out = str(tmp_path / "study")
    assert main(["study", str(path), "--out", out, "--log", "wandb", "--quiet"]) == 2
    assert "unknown logger 'wandb'" in capsys.readouterr().err
    assert main(["study", str(path), "--out", out, "--log", "tensorboard", "--dry-run"]) == 0
