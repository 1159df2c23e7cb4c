"""Exact conversions (Keras momentum, SyncBN -> BN, BN -> frozen BN, bias before BN) and the ONNX
export of folded models checked against onnxruntime."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from _helpers import settle
from torch import nn

from normlab.bn import (
    diagnose,
    export_onnx,
    keras_to_torch_conventions,
    remove_bias_before_bn,
    sync_to_batchnorm,
    to_frozen_batchnorm,
)
from normlab.bn.convert import keras_momentum, torch_momentum
from normlab.models import build_model
from normlab.norms import FrozenBatchNorm
from normlab.norms.sync import SyncBatchNorm, convert_sync_batchnorm

torch.set_num_threads(1)
X = torch.randn(6, 3, 8, 8)


def _settle(model: nn.Module) -> nn.Module:
    """Trained-looking BNs and biases, statistics from noisy copies of X; eval mode."""
    return settle(model, X, noise=0.2, biases=True)


def net(momentum: float = 0.1, bias: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=bias),
        nn.BatchNorm2d(4, momentum=momentum),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 5, bias=bias),
        nn.BatchNorm1d(5, momentum=momentum),
    )


def test_momentum_value_conversions() -> None:
    assert torch_momentum(0.99) == pytest.approx(0.01)
    assert keras_momentum(0.1) == pytest.approx(0.9)
    assert keras_momentum(torch_momentum(0.97)) == pytest.approx(0.97)


def test_keras_momentum_conversion() -> None:
    model = _settle(net(momentum=0.99))
    assert "bn-momentum-keras" in diagnose(model, dynamic=False).ids()
    report: list[str] = []
    keras_to_torch_conventions(model, report=report)
    assert model[1].momentum == pytest.approx(0.01) and model[5].momentum == pytest.approx(0.01)
    assert len(report) == 2 and "0.99 (Keras) -> 0.01" in report[0]
    assert "bn-momentum-keras" not in diagnose(model, dynamic=False).ids()
    keras_to_torch_conventions(model)  # idempotent: 0.01 is left alone
    assert model[1].momentum == pytest.approx(0.01)


def test_sync_to_batchnorm_keeps_outputs() -> None:
    model = _settle(net())
    with torch.no_grad():
        reference = model(X)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(synced[1], nn.SyncBatchNorm) and isinstance(synced[5], nn.SyncBatchNorm)
    report: list[str] = []
    plain = sync_to_batchnorm(synced, report=report)
    assert type(plain[1]) is nn.BatchNorm2d and type(plain[5]) is nn.BatchNorm1d
    assert len(report) == 2
    with torch.no_grad():
        assert torch.equal(plain.eval()(X), reference)
    root = sync_to_batchnorm(nn.SyncBatchNorm(3), torch.randn(2, 3))
    assert type(root) is nn.BatchNorm1d


class _Layers(nn.Module):
    """BN layers of every kind and setting, one of them at two places (no forward needed: the
    conversion records each layer's type)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.BatchNorm2d(4, eps=1e-3, momentum=0.3)
        self.b = nn.BatchNorm1d(5, momentum=None, affine=False)
        self.c = nn.BatchNorm3d(2, track_running_stats=False)
        self.d = nn.BatchNorm2d(3, affine=False, track_running_stats=False)  # holds no tensor
        self.inner = nn.Sequential(nn.Conv2d(3, 4, 1), self.a)  # self.a shared


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batchnorm_to_sync_and_back_restores_everything(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    reference = _Layers().to(dtype)
    with torch.no_grad():
        for _ in range(3):  # non-trivial statistics and step counters
            reference.a(torch.randn(6, 4, 3, 3, dtype=dtype) * 2.0 + 0.5)
            reference.b(torch.randn(6, 5, dtype=dtype) - 1.0)
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    reference.a.weight.requires_grad_(False)  # frozen gamma, trainable beta
    reference.b.eval()
    reference.inner[0].eval()
    layers = ("a", "b", "c", "d")
    model = copy.deepcopy(reference)

    synced = convert_sync_batchnorm(model, torch.device("cpu"))
    assert [type(getattr(synced, n)) for n in layers] == [SyncBatchNorm] * 4
    assert synced.inner[1] is synced.a  # one SyncBN where there was one BN
    back = sync_to_batchnorm(synced)

    assert [type(getattr(back, n)) for n in layers] == [type(getattr(reference, n)) for n in layers]
    assert back.inner[1] is back.a
    for converted in (synced, back):
        state, expected = converted.state_dict(), reference.state_dict()
        assert list(state) == list(expected)
        for key, value in expected.items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
        for name in layers:
            old, new = getattr(reference, name), getattr(converted, name)
            for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
                assert getattr(new, attr) == getattr(old, attr), (name, attr)
            assert [(n, p.requires_grad) for n, p in new.named_parameters()] == [
                (n, p.requires_grad) for n, p in old.named_parameters()
            ], name
        assert [m.training for m in converted.modules()] == [
            m.training for m in reference.modules()
        ]


def test_to_frozen_batchnorm() -> None:
    model = _settle(net())
    with torch.no_grad():
        reference = model(X)
    frozen = to_frozen_batchnorm(model)
    assert isinstance(frozen[1], FrozenBatchNorm) and isinstance(frozen[5], FrozenBatchNorm)
    with torch.no_grad():
        torch.testing.assert_close(frozen(X), reference, rtol=1e-5, atol=1e-6)
        frozen.train()  # frozen: train mode changes nothing
        torch.testing.assert_close(frozen(X), reference, rtol=1e-5, atol=1e-6)


def test_remove_bias_before_bn_is_exact_in_eval_and_train() -> None:
    model = _settle(net(bias=True))
    assert len(diagnose(model, dynamic=False).by_id("bn-bias-before")) == 2
    copy = _settle(net(bias=True))
    with torch.no_grad():
        eval_ref = model(X)
        model.train()
        train_ref = model(X)
    report: list[str] = []
    remove_bias_before_bn(copy, report=report)
    assert copy[0].bias is None and copy[4].bias is None and len(report) == 2
    assert "bn-bias-before" not in diagnose(copy, dynamic=False).ids()
    with torch.no_grad():
        torch.testing.assert_close(copy(X), eval_ref, rtol=1e-5, atol=1e-5)
        copy.train()
        torch.testing.assert_close(copy(X), train_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "placement"), [("resnet20", "pre"), ("resnet20", "post"), ("mobilenetv2", "post")]
)
def test_onnx_export_of_folded_model_matches_onnxruntime(
    name: str, placement: str, tmp_path: Path
) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    kwargs = {"input_size": 8, "alpha": 0.35} if name == "mobilenetv2" else {}
    torch.manual_seed(0)
    model = _settle(build_model(name, 4, placement=placement, **kwargs))
    out = tmp_path / "m.onnx"
    result = export_onnx(model, torch.randn(3, 3, 8, 8), out)
    assert result.fold is not None and len(result.fold.folded) >= 10
    assert out.is_file() and result.bn_nodes == len(result.fold.skipped) <= 1
    assert result.max_abs_error <= 1e-4 * max(1.0, result.output_scale)
    # the exported graph also runs on another batch size, same answer as PyTorch
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 8, 8)
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)
