"""The command line: flags map onto the config, errors are one clear line with exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from normlab.cli import main
from normlab.cli.args import parse_sets
from normlab.data import split_data_spec
from normlab.errors import ConfigError

FAST = [
    "--data",
    "synthetic",
    "--set",
    "data.synthetic_samples=64",
    "--set",
    "data.synthetic_image_size=16",
    "--set",
    "data.val_split=0.25",
    "--batch-size",
    "16",
    "--set",
    "runtime.threads=1",
]


def test_train_flags_reach_the_config(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            *FAST,
            "--model",
            "resnet20",
            "--norm",
            "gn",
            "--placement",
            "post",
            "--epochs",
            "2",
            "--lr",
            "0.02",
            "--optimizer",
            "adamw",
            "--weight-decay",
            "0.01",
            "--l2",
            "0.0001",
            "--seed",
            "3",
            "--set",
            "norm.gn_groups=8",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["name"] == "resnet20" and cfg["model"]["placement"] == "post"
    assert cfg["norm"]["name"] == "gn" and cfg["norm"]["gn_groups"] == 8
    assert cfg["optim"]["name"] == "adamw" and cfg["optim"]["lr"] == 0.02
    assert cfg["optim"]["weight_decay"] == 0.01 and cfg["optim"]["l2"] == 0.0001
    assert cfg["seed"] == 3 and cfg["epochs"] == 2 and cfg["data"]["name"] == "synthetic"
    text = capsys.readouterr().out
    assert "epoch 1/2" in text and "epoch 2/2" in text and "completed" in text
    # resuming a finished run is a no-op that still succeeds
    assert main(["train", "--resume", str(out), "--quiet"]) == 0


def test_config_file_and_precedence(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({"epochs": 1, "optim": {"lr": 0.3}, "model": {"name": "mlp"}}))
    out = tmp_path / "run"
    assert (
        main(["train", "--config", str(conf), *FAST, "--lr", "0.2", "--out", str(out), "--quiet"])
        == 0
    )
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["optim"]["lr"] == 0.2 and cfg["model"]["name"] == "mlp" and cfg["epochs"] == 1


def test_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert main(["train", "--model", "resnet7", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet7'" in err and "resnet20" in err and "Traceback" not in err
    assert main(["train", "--set", "optim.lrr=1", "--out", str(tmp_path / "y")]) == 2
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "none")]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert main(["train", "--data", "imagefolder:/no/such/dir", "--out", str(tmp_path / "z")]) == 2
    assert "/no/such/dir" in capsys.readouterr().err


def test_models_lists_every_model(capsys):
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    for name in ("mobilenetv2", "resnet18", "resnet50", "resnet20", "resnet110", "mlp"):
        assert f"{name}:" in text
    assert "alpha" in text and "xbn" in text


def test_console_entry_point_runs_as_a_module(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "normlab", "train", "--norm", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown norm 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_unknown_probe_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *FAST, "--probe", "weight", "--out", str(out)]) == 2
    assert "weight" in capsys.readouterr().err
    assert not out.exists()


def test_set_and_data_are_read_once() -> None:
    assert parse_sets(["optim.lr=0.1", "model.xbn=true", "optim.lr=0.2", "a.b=[1, 2]"]) == {
        "optim.lr": 0.2,
        "model.xbn": True,
        "a.b": [1, 2],
    }
    assert split_data_spec("cifar10:/data/c.tar.gz") == ("cifar10", "/data/c.tar.gz")
    assert split_data_spec(" digits ") == ("digits", None)
    for bad, message in [
        ("", "--data must be NAME or NAME:PATH"),
        (":x", "has no source name"),
        ("imagefolder:", "has an empty path"),
    ]:
        with pytest.raises(ConfigError, match=message):
            split_data_spec(bad)
