"""BN folding: folded == unfolded for both placements on every normlab model, grouped and
depthwise convs, zero-padded post folds (exact or refused), linear heads, untraceable models,
torchvision and timm models."""

from __future__ import annotations

import _helpers
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.bn import fold_batchnorm, fold_batchnorm_report
from normlab.bn.fold import ShiftedConv, measure_throughput
from normlab.models import build_model, list_models

torch.set_num_threads(1)


def settle(model: nn.Module, x: torch.Tensor, steps: int = 3) -> nn.Module:
    """Trained-looking BNs with non-zero conv/linear biases, statistics from shifted inputs
    (a fold must carry both the biases and a non-zero mean)."""
    return _helpers.settle(model, x, steps=steps, noise=0.5, offset=0.3, biases=True)


def rel_error(result) -> float:
    return result.max_abs_error / max(result.output_scale, 1e-12)


def bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


MODEL_CASES = [
    (name, placement) for name in [e.name for e in list_models()] for placement in ("pre", "post")
]

# Inputs as small as each model allows (8x8; ImageNet models in small-input mode).
SHAPES = {"mlp": (4, 3, 8, 8)}


@pytest.mark.parametrize(("name", "placement"), MODEL_CASES)
def test_fold_equivalence_every_normlab_model(name: str, placement: str) -> None:
    kwargs = {"input_size": 8} if name in ("mlp", "mobilenetv2", "resnet18", "resnet50") else {}
    if name == "mobilenetv2":
        kwargs["alpha"] = 0.35
    torch.manual_seed(0)
    model = build_model(name, 5, placement=placement, **kwargs)
    x = torch.randn(*SHAPES.get(name, (2, 3, 8, 8)))
    settle(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fold_batchnorm_report(model, x)
    assert rel_error(result) < 1e-5, (result.max_abs_error, result.output_scale)
    assert result.graph_method == "fx"
    folded_bns = bn_count(result.model)
    if placement == "pre":
        assert folded_bns == 0 and not result.skipped
    else:
        # post: only a BN whose output feeds two places (the stem BN before the first residual
        # block, for ResNets) stays; every other BN folds into the preceding or next layer.
        assert folded_bns == len(result.skipped) <= 1
        assert any(s.placement == "post" for s in result.folded)
    assert not result.model.training
    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _bn_after_act_net(groups: int, bias: bool, padding: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, bias=bias),
        nn.BatchNorm2d(8),  # pre: folds into the conv before
        nn.ReLU(),
        nn.BatchNorm2d(8),  # post: folds into the next conv
        nn.Conv2d(8, 8, 3, stride=stride, padding=padding, groups=groups, bias=bias),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 6, 1, groups=2, bias=not bias),
        nn.BatchNorm2d(6),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("padding", "stride"), [(0, 1), (1, 1), (2, 2)])
def test_fold_grouped_depthwise_bias_padding(
    groups: int, bias: bool, padding: int, stride: int
) -> None:
    torch.manual_seed(1)
    model = _bn_after_act_net(groups, bias, padding, stride)
    x = torch.randn(3, 4, 9, 9)
    settle(model, x)
    result = fold_batchnorm_report(model, x)
    assert rel_error(result) < 1e-5
    assert bn_count(result.model) == 0
    shifted = [m for m in result.model.modules() if isinstance(m, ShiftedConv)]
    assert len(shifted) == (1 if padding else 0)  # zero padding needs the border correction
    # the border correction is computed per input size: another size is exact too
    y = torch.randn(2, 4, 12, 7)
    with torch.no_grad():
        assert torch.allclose(model(y), result.model(y), atol=1e-5, rtol=1e-4)


def test_refuse_padded_leaves_the_bn_with_a_reason() -> None:
    model = settle(_bn_after_act_net(1, False, 1), torch.randn(2, 4, 8, 8))
    result = fold_batchnorm_report(model, torch.randn(2, 4, 8, 8), padded="refuse")
    assert rel_error(result) < 1e-5
    (left,) = result.skipped
    assert left[0] == "3" and "zero-pads" in left[1]
    assert not any(isinstance(m, ShiftedConv) for m in result.model.modules())


def test_bn_after_activation_into_linear_through_flatten_and_pooling() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.BatchNorm2d(4),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
        nn.ReLU(),
        nn.BatchNorm1d(5),
        nn.Linear(5, 2),
    )
    x = torch.randn(6, 3, 6, 6)
    settle(model, x)
    result = fold_batchnorm_report(model, x)
    assert rel_error(result) < 1e-5 and bn_count(result.model) == 0
    assert {s.placement for s in result.folded} == {"post"}


def test_max_pool_between_folds_only_with_positive_scale() -> None:
    def net() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.MaxPool2d(2), nn.Conv2d(4, 2, 1)
        )

    x = torch.randn(4, 3, 8, 8)
    positive = settle(net(), x)
    assert bn_count(fold_batchnorm_report(positive, x).model) == 0
    negative = settle(net(), x)
    with torch.no_grad():
        negative[2].weight[0] = -1.0
    result = fold_batchnorm_report(negative, x)
    assert bn_count(result.model) == 1 and "max pooling" in result.skipped[0][1]
    assert rel_error(result) < 1e-5


def test_shared_producer_output_is_not_folded() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y  # the conv's output is used twice

    x = torch.randn(3, 3, 6, 6)
    model = settle(Branchy(), x)
    result = fold_batchnorm_report(model, x)
    assert bn_count(result.model) == 1 and rel_error(result) < 1e-6


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > -1e9:  # data-dependent
            z = self.conv2(y)
            return self.bn2(z) + z  # conv2's output feeds bn2 and the sum: must not fold
        return y


def test_untraceable_model_uses_hooks_and_verifies_each_fold() -> None:
    x = torch.randn(3, 3, 6, 6)
    model = settle(Untraceable(), x)
    result = fold_batchnorm_report(model, x)
    assert result.graph_method == "hooks"
    assert [s.norm for s in result.folded] == ["bn"]
    assert [name for name, _ in result.skipped] == ["bn2"]
    assert "changed the output" in result.skipped[0][1]
    assert rel_error(result) < 1e-6
    with pytest.raises(Exception, match="example input"):
        fold_batchnorm(model)


def test_fold_batchnorm_returns_eval_copy_and_keeps_frozen_and_no_stats_bns() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, track_running_stats=False),  # batch stats in eval: cannot fold
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4),
    )
    x = torch.randn(4, 3, 8, 8)
    settle(model, x)
    model.train()
    folded = fold_batchnorm(model, x)
    assert model.training and not folded.training
    assert isinstance(folded[1], nn.BatchNorm2d) and isinstance(folded[4], nn.Identity)


def test_throughput_is_measured_in_the_same_run() -> None:
    model = settle(build_model("resnet20", 10), torch.randn(2, 3, 8, 8))
    result = fold_batchnorm_report(
        model, torch.randn(4, 3, 8, 8), measure_speed=True, speed_repeats=1
    )
    assert result.images_per_s_before and result.images_per_s_after
    assert result.speedup == result.images_per_s_after / result.images_per_s_before
    assert measure_throughput(model, torch.randn(2, 3, 8, 8), repeats=1, min_seconds=0.01) > 0


ZOO = {
    "torchvision": ["resnet18", "mobilenet_v2", "efficientnet_b0", "vgg11_bn", "regnet_y_400mf"],
    "timm": ["resnet18d", "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002"],
}


def _zoo_model(lib: str, name: str) -> nn.Module:
    if lib == "torchvision":
        tv = pytest.importorskip("torchvision")
        return tv.models.get_model(name, weights=None, num_classes=10)
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=10)


@pytest.mark.slow
@pytest.mark.parametrize(("lib", "name"), [(lib, n) for lib, names in ZOO.items() for n in names])
def test_fold_equivalence_torchvision_timm(lib: str, name: str) -> None:
    torch.manual_seed(0)
    model = _zoo_model(lib, name)
    x = torch.randn(2, 3, 64, 64)
    settle(model, x, steps=1)
    result = fold_batchnorm_report(model, x)
    assert rel_error(result) < 1e-5
    assert result.graph_method == "fx"
    # a BN subclass that does more than BN (timm's BatchNormAct2d) stays, as the identity affine
    kept_as_identity = sum("identity-affine" in s.note for s in result.folded)
    assert bn_count(result.model) <= len(result.skipped) + kept_as_identity
    assert len(result.folded) >= 8


@pytest.mark.parametrize("dims", [1, 3])
def test_fold_conv1d_and_conv3d_with_zero_padding(dims: int) -> None:
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[dims]
    model = nn.Sequential(
        conv(2, 4, 3, padding=1), nn.ReLU(), bn(4), conv(4, 3, 3, padding=1), bn(3)
    )
    x = torch.randn(3, 2, *([6] * dims))
    settle(model, x)
    result = fold_batchnorm_report(model, x)
    assert rel_error(result) < 1e-5 and bn_count(result.model) == 0
    assert isinstance(result.model[3], ShiftedConv)
