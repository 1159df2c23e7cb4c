"""LSUV initialisation: unit output variance per layer (measured independently), forward order,
untouched buffers, determinism, clear errors, and its place in fit (fresh start only)."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers import InterruptAt, stable, tiny_config
from torch import nn

from normlab.data import BatchLoader
from normlab.errors import ConfigError, TrainingError
from normlab.models import build_model, lsuv_init
from normlab.models.lsuv import weight_layers_in_forward_order
from normlab.train import Callback, fit

pytestmark = pytest.mark.usefixtures("one_thread")


def _output_variances(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Every conv/linear output's variance in one full forward pass (independent of LSUV's
    own early-stopping measurement)."""
    got: dict[str, float] = {}

    def record(name: str):
        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            got.setdefault(name, float(out.var(unbiased=False)))

        return hook

    handles = [
        m.register_forward_hook(record(name))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return got


class OutOfOrder(nn.Module):
    """Registers its layers in the reverse of the order it calls them."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.mid = nn.Conv2d(4, 8, 3, padding=1)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.mid(torch.relu(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_every_layer_ends_at_unit_output_variance_in_forward_order():
    model = OutOfOrder()
    x = torch.randn(32, 3, 8, 8) * 5 + 2
    names = [n for n, _ in weight_layers_in_forward_order(model, x)]
    assert names == ["stem", "mid", "head"]
    steps = lsuv_init(model, x, generator=torch.Generator().manual_seed(0))
    assert [s.name for s in steps] == names and all(s.converged for s in steps)
    measured = _output_variances(model, x)
    for s in steps:
        assert abs(measured[s.name] - 1.0) < 0.1  # the final state, end to end
        assert measured[s.name] == pytest.approx(s.variance_after, rel=1e-5)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_a_network_without_normalization_gets_unit_variance_logits(name):
    torch.manual_seed(0)
    model = build_model(name, 10, norm="none", input_size=16)
    x = torch.randn(64, 3, 16, 16)
    before = _output_variances(model, x)
    steps = lsuv_init(model, x, generator=torch.Generator().manual_seed(0))
    after = _output_variances(model, x)
    head = steps[-1].name
    assert abs(after[head] - 1.0) < 0.1
    assert abs(before[head] - 1.0) > 0.5  # torchvision's init leaves the logits far off
    assert all(abs(after[s.name] - 1.0) < 0.1 for s in steps if s.converged)


def test_buffers_and_mode_are_restored_and_the_result_is_deterministic():
    def net() -> nn.Module:
        torch.manual_seed(0)
        return build_model("resnet20", 4, norm="bn", input_size=8).eval()

    x = torch.randn(16, 3, 8, 8)
    a, b = net(), net()
    buffers = {k: v.clone() for k, v in a.named_buffers()}
    lsuv_init(a, x, generator=torch.Generator().manual_seed(3))
    lsuv_init(b, x, generator=torch.Generator().manual_seed(3))
    assert not a.training
    for k, v in a.named_buffers():
        assert torch.equal(v, buffers[k]), k
    for (k, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), k


def test_channels_last_weights_are_initialised():
    torch.manual_seed(0)
    model = build_model("resnet20", 4, norm="none", input_size=8).to(
        memory_format=torch.channels_last
    )
    x = torch.randn(16, 3, 8, 8).to(memory_format=torch.channels_last)
    steps = lsuv_init(model, x)
    assert abs(_output_variances(model, x)[steps[-1].name] - 1.0) < 0.1


def test_a_dead_layer_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with pytest.raises(TrainingError, match=r"layer '0' has output variance 0"):
        lsuv_init(model, torch.zeros(4, 3, 8, 8))


def test_bad_init_settings_are_refused():
    with pytest.raises(ConfigError, match=r"model\.init must be 'default' or 'lsuv'"):
        tiny_config(**{"model.init": "xavier"})
    with pytest.raises(ConfigError, match=r"model\.init_samples must be at least 2"):
        tiny_config(**{"model.init": "lsuv", "model.init_samples": 1})


class _Logits(Callback):
    """Records the logits' variance on the whole (clean) training split before step 1."""

    def on_fit_start(self, state) -> None:
        d = state.data
        n = int(d.train_labels.numel())
        loader = BatchLoader.evaluation(d.train_images, d.train_labels, n, mean=d.mean, std=d.std)
        x, _ = next(iter(loader))
        with torch.no_grad():
            self.variance = float(state.model(x).var(unbiased=False))


def _cfg(**extra):
    return tiny_config(**{"norm.name": "none", "model.init": "lsuv", **extra})


def test_fit_applies_lsuv_on_a_fresh_start(tmp_path):
    probe = _Logits()
    result = fit(_cfg(epochs=1), out=tmp_path / "r", verbose=False, callbacks=[probe])
    # the tiny split has 48 training images, fewer than init_samples: LSUV saw all of them
    assert abs(probe.variance - 1.0) < 0.1
    record = json.loads((tmp_path / "r" / "init.json").read_text())
    assert record["method"] == "lsuv" and record["samples"] == 512
    layers = [n for n, m in result.model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert sorted(r["name"] for r in record["layers"]) == sorted(layers)
    assert record["layers"][-1]["name"] == "fc"
    assert all(abs(r["variance_after"] - 1.0) < 0.1 for r in record["layers"] if r["converged"])
    default = _Logits()
    fit(_cfg(epochs=1, **{"model.init": "default"}), out=tmp_path / "d", verbose=False,
        callbacks=[default])  # fmt: skip
    assert abs(default.variance - 1.0) > 0.5
    assert not (tmp_path / "d" / "init.json").exists()


def test_resume_does_not_initialise_again(tmp_path):
    full = fit(_cfg(epochs=2), out=tmp_path / "full", verbose=False)
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(epochs=2), out=tmp_path / "cut", callbacks=[InterruptAt(2, 1)], verbose=False)
    resumed = fit(None, out=tmp_path / "cut", resume=True, verbose=False)
    assert stable(resumed.metrics) == stable(full.metrics)
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_works_on_a_third_party_model_without_normalization():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.squeezenet1_1(num_classes=10)  # no norm layers; 26 convs, fire modules
    x = torch.randn(8, 3, 64, 64)
    steps = lsuv_init(model, x, generator=torch.Generator().manual_seed(0))
    assert len(steps) == 26 and steps[-1].name == "classifier.1"
    after = _output_variances(model, x)
    assert all(s.converged and abs(after[s.name] - 1.0) < 0.1 for s in steps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_model_with_a_cpu_generator():
    torch.manual_seed(0)
    model = build_model("resnet20", 4, norm="none", input_size=8).cuda()
    x = torch.randn(16, 3, 8, 8, device="cuda")
    steps = lsuv_init(model, x, generator=torch.Generator().manual_seed(0))
    assert abs(_output_variances(model, x)[steps[-1].name] - 1.0) < 0.1
