"""The training loop: run directory contents, resume equivalence, divergence, bad settings."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from _helpers import InterruptAt, stable, tiny_base, tiny_config

from normlab.config import TrainConfig, config_from_dict
from normlab.errors import ConfigError, TrainingError
from normlab.train import Callback, fit


def tiny(**overrides) -> TrainConfig:
    """A 2-3 second config: resnet20 on 96 synthetic 16x16 images, 3 epochs with warm-up."""
    base = tiny_base(epochs=3, optim={"lr": 0.05, "warmup_epochs": 1})
    base["data"]["synthetic_samples"] = 128
    return tiny_config(base, **overrides)


def test_run_directory_is_complete(tmp_path):
    out = tmp_path / "run"
    result = fit(tiny(epochs=6), out=out, verbose=False)
    assert result.status == "completed"
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "config.yaml",
        "metrics.jsonl",
        "predictions.npz",
        "summary.json",
    ]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in (
        "epoch",
        "train/loss",
        "train/acc",
        "val/loss",
        "val/acc",
        "lr",
        "seconds",
        "images_per_s",
    ):
        assert all(key in r for r in rows), key
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["best/val/acc"] == max(r["val/acc"] for r in rows)
    assert rows[summary["best/epoch"] - 1]["val/acc"] == summary["best/val/acc"]
    assert summary["final/val/acc"] == rows[-1]["val/acc"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["meta"]["torch_version"] == torch.__version__
    assert "git_sha" in saved["meta"] and saved["meta"]["normlab_version"]
    assert saved["runtime"]["precision"] in ("fp32", "bf16")  # resolved, not "auto"
    assert saved["runtime"]["memory_format"] in ("channels_last", "contiguous")
    # the saved config is a loadable config equal to the one that ran
    assert config_from_dict(saved) == result.config
    # and the model learns the synthetic task (4 classes: chance is 0.25)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] and rows[-1]["train/acc"] > 0.5


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_gives_the_same_metrics(tmp_path, precision):
    cfg = tiny(**{"runtime.precision": precision, "data.augment": True, "model.options": {}})
    full = fit(cfg, out=tmp_path / "full", verbose=False)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, out=tmp_path / "cut", callbacks=[InterruptAt(epoch=2, step=3)], verbose=False)
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["status"] == "running" and summary["epochs_completed"] == 1
    resumed = fit(None, out=tmp_path / "cut", resume=True, verbose=False)
    assert resumed.status == "completed"
    assert stable(resumed.metrics) == stable(full.metrics)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]  # nothing lost or duplicated
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_resume_of_a_finished_run_trains_nothing(tmp_path):
    first = fit(tiny(epochs=1), out=tmp_path / "r", verbose=False)
    again = fit(None, out=tmp_path / "r", resume=True, verbose=False)
    assert again.status == "completed" and stable(again.metrics) == stable(first.metrics)
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key])


def test_existing_run_needs_resume_and_matching_settings(tmp_path):
    fit(tiny(epochs=1), out=tmp_path / "r", verbose=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        fit(tiny(epochs=1), out=tmp_path / "r", verbose=False)
    with pytest.raises(ConfigError, match=r"epochs: run has 1, given 2"):
        fit(tiny(epochs=2), out=tmp_path / "r", resume=True, verbose=False)
    with pytest.raises(ConfigError, match="holds no run"):
        fit(None, out=tmp_path / "nothing", resume=True, verbose=False)


class PoisonAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, state, epoch):
        if epoch == self.epoch:
            with torch.no_grad():
                state.model.fc.weight.fill_(float("nan"))


def test_nan_loss_marks_the_run_diverged_and_keeps_metrics(tmp_path):
    result = fit(tiny(), out=tmp_path / "r", callbacks=[PoisonAt(2)], verbose=False)
    assert result.status == "diverged"
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert summary["diverged_at"] == {"epoch": 2, "step": 0}
    assert [r["epoch"] for r in result.metrics] == [1]
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 1


def test_batch_size_one_with_bn_is_refused_with_the_reason(tmp_path):
    with pytest.raises(TrainingError, match=r"batch_size=1 .*'bn'.*--norm gn"):
        fit(tiny(batch_size=1), out=tmp_path / "r", verbose=False)
    assert not (tmp_path / "r").exists()  # nothing written for a refused run
    with pytest.raises(TrainingError, match="drop_last=true"):
        # 96 training images, batch 19: the last batch would hold 1 sample
        fit(tiny(batch_size=19, drop_last=False), out=tmp_path / "r2", verbose=False)
    # a batch-independent norm trains with batch size 1
    result = fit(
        tiny(batch_size=1, epochs=1, **{"norm.name": "gn", "norm.gn_groups": 4}),
        out=tmp_path / "gn",
        verbose=False,
    )
    assert result.status == "completed"


def test_batch_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(TrainingError, match="fewer than batch_size=500"):
        fit(tiny(batch_size=500), out=tmp_path / "r", verbose=False)


def test_failure_is_recorded_in_the_summary(tmp_path):
    class Boom(Callback):
        def on_epoch_end(self, state, epoch, row):
            raise RuntimeError("probe exploded")

    with pytest.raises(RuntimeError, match="probe exploded"):
        fit(tiny(), out=tmp_path / "r", callbacks=[Boom()], verbose=False)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and "probe exploded" in summary["error"]


def test_l2_is_reported_and_seeds_are_deterministic(tmp_path):
    a = fit(tiny(epochs=1, **{"optim.l2": 1e-3}), out=tmp_path / "a", verbose=False)
    b = fit(tiny(epochs=1, **{"optim.l2": 1e-3}), out=tmp_path / "b", verbose=False)
    assert a.metrics[0]["train/l2"] > 0
    assert stable(a.metrics) == stable(b.metrics)
    c = fit(tiny(epochs=1, seed=1, **{"optim.l2": 1e-3}), out=tmp_path / "c", verbose=False)
    assert stable(c.metrics) != stable(a.metrics)


@pytest.mark.parametrize("model", ["mlp", "mobilenetv2"])
def test_other_models_train(tmp_path, model):
    options = {"alpha": 0.35} if model == "mobilenetv2" else {}
    result = fit(
        tiny(epochs=1, **{"model.name": model, "model.options": options}),
        out=tmp_path / "r",
        verbose=False,
    )
    assert result.status == "completed"
