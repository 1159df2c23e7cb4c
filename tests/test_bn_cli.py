"""The BN toolbox on the command line, including seed 002 end to end: a model trained with its BN
statistics never updated -> doctor exits 2 naming the layers -> recalibrate -> accuracy recovers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from normlab.cli import main

torch.set_num_threads(1)

KERAS = Path(__file__).parent / "fixtures" / "keras"

RESNET20_BNS = ["bn1"] + [
    f"layer{s}.{b}.bn{k}" for s in (1, 2, 3) for b in (0, 1, 2) for k in (1, 2)
]


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict]:
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.mark.slow
def test_seed_002_never_updated_statistics_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--model", "resnet20",
            "--data", "synthetic",
            "--epochs", "2",
            "--batch-size", "32",
            "--set", "norm.bn_momentum=0",  # the defect: running statistics never move
            "--set", "data.synthetic_samples=512",
            "--set", "data.synthetic_image_size=16",
            "--set", "data.synthetic_classes=4",
            "--set", "runtime.threads=1",
            "--set", "runtime.progress=off",
            "--out", str(run),
            "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    capsys.readouterr()

    code, report = run_json(capsys, ["doctor", str(run), "--static"])
    assert code == 2 and report["exit_status"] == 2
    initial = [f["layer"] for f in report["findings"] if f["id"] == "bn-stats-initial"]
    assert initial == RESNET20_BNS  # every layer is named
    assert all(f["fixable"] for f in report["findings"] if f["id"] == "bn-stats-initial")

    code, recal = run_json(capsys, ["recalibrate", str(run)])
    assert code == 0 and recal["layers"] == 19
    before, after = recal["val_before"]["acc"], recal["val_after"]["acc"]
    # recovered: far above the broken model, at least what the network showed in training
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert after >= before + 0.3 and after >= last["train/acc"] - 0.05, (before, after, last)
    out = Path(recal["output"])
    assert out == run / "checkpoint-recalibrated.pt" and out.is_file()

    code, report = run_json(capsys, ["doctor", str(out), "--static"])
    ids = {f["id"] for f in report["findings"]}
    assert "bn-stats-initial" not in ids and code == 1  # momentum 0 itself remains a warning
    assert ids == {"bn-momentum-zero"}


def test_doctor_keras_fixture_text(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("h5py")
    code = main(["doctor", str(KERAS / "never_updated.keras")])
    text = capsys.readouterr().out
    assert code == 2
    assert "ERROR bn-stats-initial (2 layers: bn1, bn2)" in text
    assert main(["doctor", str(KERAS / "trained.h5")]) == 0


def test_doctor_callable_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run_json(capsys, ["doctor", "normlab:resnet20", "--input-shape", "3,8,8"])
    assert code == 0 and report["counts"]["error"] == 0
    assert "dynamic" in report["checks"]
    assert main(["doctor", "does/not/exist.pt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normlab doctor: error: does/not/exist.pt: no such file")
    assert len(err.strip().splitlines()) == 1
    assert main(["doctor", "normlab:resnet20", "--input-shape", "3,x"]) == 2
    assert "--input-shape" in capsys.readouterr().err
    code, report = run_json(capsys, ["doctor", "normlab:resnet20", "--input-shape", "5"])
    assert code == 0 and "dynamic" not in report["checks"]
    assert any("dynamic checks skipped" in n for n in report["notes"])


def _trained_resnet20(tmp_path: Path) -> Path:
    from normlab.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", 4, placement="post")
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 8, 8))
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    return path


def test_fold_convert_export_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sd = _trained_resnet20(tmp_path)
    common = [
        "--arch",
        "normlab:resnet20,placement=post",
        "--num-classes",
        "4",
        "--input-shape",
        "3,8,8",
    ]
    code, folded = run_json(
        capsys, ["fold", str(sd), str(tmp_path / "f.pt"), *common, "--repeats", "1", "--batch", "4"]
    )
    assert code == 0 and folded["folded"] == 18 and folded["skipped"] == 1
    assert folded["max_abs_error"] < 1e-5 and folded["speedup"] > 0
    assert main(["doctor", str(tmp_path / "f.pt")]) == 2  # a pickled module: refused
    assert "--unsafe-load" in capsys.readouterr().err
    from normlab.bn.load import load_target

    restored = load_target(str(tmp_path / "f.pt"), unsafe_load=True).model
    assert isinstance(restored, nn.Module) and not restored.training

    code, conv = run_json(
        capsys,
        [
            "convert",
            str(sd),
            str(tmp_path / "c.pt"),
            *common,
            "--op",
            "frozen-bn",
            "--op",
            "keras-momentum",
        ],
    )
    assert code == 0 and len(conv["changes"]) == 19
    assert main(["convert", str(sd), str(tmp_path / "c.pt"), *common]) == 2  # no --op

    pytest.importorskip("onnxruntime")
    code, exp = run_json(capsys, ["export", str(sd), *common, "--onnx", str(tmp_path / "m.onnx")])
    assert code == 0 and exp["bn_nodes"] == 1 and exp["folded"] == 18
    assert exp["max_abs_error"] < 1e-4 * max(1.0, exp["output_scale"])
    assert main(["doctor", str(tmp_path / "m.onnx")]) == 0


def test_cli_accepts_the_half_precision_folds_the_library_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from normlab.bn.fold import fold_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
    )
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    model = model.to(torch.bfloat16).eval()
    path = tmp_path / "bf16.pt"
    torch.save(model, path)
    # the batch the CLI verifies on: seed 0, 8 x (3, 8, 8), in the model's dtype
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    fold_batchnorm(model, x)  # the library accepts it (raises FoldError otherwise)
    argv = ["fold", str(path), str(tmp_path / "f.pt"), "--unsafe-load", "--input-shape", "3,8,8"]
    assert main([*argv, "--no-timing", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # beyond float32's 1e-4 (the CLI's old fixed tolerance), within bf16's rounding
    assert 1e-4 * max(1.0, report["output_scale"]) < report["max_abs_error"]
    assert report["max_abs_error"] <= report["tolerance"]
    assert report["folded"] == 1 and (tmp_path / "f.pt").is_file()


FEATURE_MODELS = """
from torch import nn


def features(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


def tupled(num_classes=10):
    class Local(nn.Module):  # defined inside a function: cannot be pickled
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, num_classes)

        def forward(self, x):
            h = self.bn(self.conv(x))
            return self.fc(h.mean((2, 3))), h

    return Local()
"""


def test_recalibrate_measures_accuracy_only_on_class_scores_and_saves_what_it_can(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "featmods.py").write_text(FEATURE_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = ["--data", "synthetic"]
    # a feature extractor: recalibrated, no accuracy (its output is a feature map)
    code, out = run_json(
        capsys, ["recalibrate", "featmods:features", *data, "--out", str(tmp_path / "a.pt")]
    )
    assert code == 0 and out["layers"] == 1 and out["val_before"] is None
    assert "not class scores [N, >= 10]" in out["val_not_measured"]
    # a module that returns (logits, features) and cannot be pickled: its state_dict is written
    code, out = run_json(
        capsys, ["recalibrate", "featmods:tupled", *data, "--out", str(tmp_path / "b.pt")]
    )
    assert code == 0 and out["saved"] == "state_dict" and out["val_after"] is None
    assert "returns tuple" in out["val_not_measured"]
    import featmods

    model = featmods.tupled()
    model.load_state_dict(torch.load(tmp_path / "b.pt"))
    assert not torch.equal(model.bn.running_var, torch.ones(4))  # recalibrated statistics
    # convert and fold cannot write a module they cannot pickle: a clear error, nothing written
    for argv in (
        ["convert", "featmods:tupled", str(tmp_path / "c.pt"), "--op", "keras-momentum"],
        ["fold", "featmods:tupled", str(tmp_path / "f.pt"), "--input-shape", "3,8,8"],
    ):
        assert main(argv) == 2
        assert "the module cannot be pickled" in capsys.readouterr().err
        assert not (tmp_path / Path(argv[2]).name).exists()
