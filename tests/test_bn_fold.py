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


def _settled_model(name: str, placement: str) -> tuple[nn.Module, torch.Tensor]:
    """A small normlab model with realistic BN statistics, and an input for it."""
    kwargs = {"input_size": 8} if name in ("mlp", "mobilenetv2", "resnet18", "resnet50") else {}
    if name == "mobilenetv2":
        kwargs["alpha"] = 0.35
    torch.manual_seed(0)
    model = build_model(name, 5, placement=placement, **kwargs)
    x = torch.randn(*SHAPES.get(name, (2, 3, 8, 8)))
    settle(model, x)
    return model, x


@pytest.mark.parametrize(("name", "placement"), MODEL_CASES)
def test_fold_equivalence_every_normlab_model(name: str, placement: str) -> None:
    model, x = _settled_model(name, placement)
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
    # a BN subclass that does more than BN (timm's BatchNormAct2d) stays, its BN part the identity
    kept_as_identity = sum("BN part the identity" in s.note for s in result.folded)
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


# ---- exact or refused without an example input; the true reason; group verification --------


def assert_same_outputs(a: nn.Module, b: nn.Module, *inputs: torch.Tensor) -> None:
    """The oracle: ``b`` computes what ``a`` does on inputs the folder never saw."""
    for x in inputs:
        with torch.no_grad():
            ya, yb = a.eval()(x), b.eval()(x)
        assert (ya - yb).abs().max() <= 1e-4 * max(1.0, float(ya.abs().max())), x.shape


class BNReLU(nn.BatchNorm2d):
    """A norm+activation module, as timm's BatchNormAct2d: BN, then its own activation."""

    def __init__(self, c: int, act: nn.Module | None = None) -> None:
        super().__init__(c)
        self.act = nn.ReLU() if act is None else act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class BNPlusInput(nn.BatchNorm2d):
    """``x + bn(x)``: a BN subclass whose forward is not BN followed by an elementwise op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


def _norm_act_net(norm: type[nn.Module] = BNReLU) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        norm(6),  # after a conv: its BN part folds into the conv, its activation stays
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        norm(6),  # after an activation: folding it into the next conv would be wrong
        nn.Conv2d(6, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


@pytest.mark.parametrize("example", [False, True])
def test_norm_act_module_folds_only_into_the_layer_before(example: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = settle(_norm_act_net(), x)
    result = fold_batchnorm_report(model, x if example else None)
    assert [(s.norm, s.into, s.placement) for s in result.folded] == [("1", "0", "pre")]
    assert isinstance(result.model[1], BNReLU)  # kept, for its activation
    ((left, reason),) = result.skipped
    assert left == "4" and "applies ReLU after the norm" in reason
    assert_same_outputs(model, result.model, x, torch.randn(2, 3, 11, 7))


def test_norm_with_identity_activation_is_plain_and_folds_after_an_activation() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = settle(_norm_act_net(lambda c: BNReLU(c, nn.Identity())), x)
    result = fold_batchnorm_report(model)
    assert {(s.norm, s.placement) for s in result.folded} == {("1", "pre"), ("4", "post")}
    assert not result.skipped and bn_count(result.model) == 0
    assert_same_outputs(model, result.model, x)


@pytest.mark.parametrize("example", [False, True])
def test_norm_module_with_another_forward_is_refused(example: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = settle(_norm_act_net(BNPlusInput), x)
    result = fold_batchnorm_report(model, x if example else None)
    assert not result.folded and [n for n, _ in result.skipped] == ["1", "4"]
    assert all("neither its BN affine map" in r for _, r in result.skipped)
    assert_same_outputs(model, result.model, x)


class Tokens(nn.Module):
    """Linear on (N, L, C) tokens, then BatchNorm1d over dim 1 (L), with L == C so that the
    channel counts match and only the axes tell the fold is wrong. ``from_image``: the tokens
    come from a conv (the rank is known without an example input); else they are the input."""

    def __init__(self, from_image: bool) -> None:
        super().__init__()
        self.from_image = from_image
        self.embed = nn.Conv2d(3, 8, 2, stride=2)  # 16x16 -> 8x8: L = 64 tokens of C = 8
        self.proj = nn.Linear(8, 64 if from_image else 8)
        self.norm = nn.BatchNorm1d(64 if from_image else 8)  # over dim 1: the tokens
        self.head = nn.Linear(64 if from_image else 8, 5)
        self.norm2 = nn.BatchNorm1d(64 if from_image else 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.from_image:
            x = self.embed(x).flatten(2).transpose(1, 2)  # (N, 64, 8)
        return self.head(self.norm2(torch.relu(self.norm(self.proj(x)))))


@pytest.mark.parametrize("from_image", [True, False])
@pytest.mark.parametrize("example", [False, True])
def test_linear_on_tokens_then_batchnorm1d_is_refused_with_the_channel_reason(
    from_image: bool, example: bool
) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16) if from_image else torch.randn(4, 8, 8)
    model = settle(Tokens(from_image), x)
    result = fold_batchnorm_report(model, x if example else None)
    assert not result.folded
    reasons = dict(result.skipped)
    assert set(reasons) == {"norm", "norm2"}
    if example or from_image:  # the rank is known: 3-d, so the axes do not line up
        assert all(
            "Linear on a 3-d tensor: the channels do not line up" in r for r in reasons.values()
        )
    else:  # the rank of a graph input is unknown without an example: refused, saying so
        assert all("rank of its" in r and "unknown" in r for r in reasons.values())
    assert_same_outputs(model, result.model, x)


def test_linear_on_flattened_features_folds_without_an_example() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5),  # pre: the Linear's input is 2-d (a flatten)
        nn.ReLU(),
        nn.BatchNorm1d(5),  # post, into a Linear on a 2-d tensor
        nn.Linear(5, 2),
    )
    x = torch.randn(6, 3, 8, 8)
    settle(model, x)
    result = fold_batchnorm_report(model)
    assert [s.placement for s in result.folded] == ["pre", "post"] and bn_count(result.model) == 0
    assert_same_outputs(model, result.model, x)


@pytest.mark.parametrize(("name", "placement"), MODEL_CASES)
def test_fold_without_example_is_exact_on_every_normlab_model(name: str, placement: str) -> None:
    model, x = _settled_model(name, placement)
    blind = fold_batchnorm_report(model)
    seen = fold_batchnorm_report(model, x)
    assert_same_outputs(model, blind.model, x, torch.randn(x.shape))
    # the example input adds nothing on these graphs: the same folds, none undone
    assert [s.norm for s in blind.folded] == [s.norm for s in seen.folded]


class Reused(nn.Module):
    """``n`` conv -> BN blocks; in those listed in ``bad`` the conv's output also reaches the
    block's output, which hooks cannot see (the model is untraceable): those folds change the
    output, the others are exact. Counts its forwards (shared by deep copies)."""

    forwards = 0

    def __init__(self, n: int, bad: set[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(n))
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(n))
        self.bad = bad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).forwards += 1
        if x.sum() > -1e9:  # data-dependent: torch.fx cannot trace it
            for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
                y = conv(x)
                x = bn(y) + (0.5 * y if i in self.bad else 0)
        return x


@pytest.mark.parametrize("bad", [set(), {5}, {0, 9, 10}, set(range(16))])
def test_group_verification_leaves_exactly_the_bad_folds(bad: set[int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5)
    model = settle(Reused(16, bad), x)
    Reused.forwards = 0
    groups = fold_batchnorm_report(model, x)
    group_forwards, Reused.forwards = Reused.forwards, 0
    each = fold_batchnorm_report(model, x, verify="each")
    each_forwards = Reused.forwards
    assert groups.graph_method == "hooks"
    left = {int(name.split(".")[1]) for name, _ in groups.skipped}
    assert left == bad == {int(name.split(".")[1]) for name, _ in each.skipped}
    assert all("changed the output" in reason for _, reason in groups.skipped)
    assert len(groups.folded) == 16 - len(bad)
    assert groups.exact and groups.max_abs_error <= groups.tolerance
    assert_same_outputs(model, groups.model, x, torch.randn(2, 4, 3, 3))
    # the cost: analysis (the failed trace, the hooks forward, the shapes forward), the
    # reference, then one forward per group tried
    assert each_forwards == 4 + 16
    expected = {0: 1, 1: 9}.get(len(bad))  # all exact: one check; one bad fold: 2 log2(16) + 1
    if expected is not None:
        assert group_forwards == 4 + expected


ISSUE_MODELS = ["dpn48b", "dpn68", "resnetv2_50", "botnet26t_256", "lambda_resnet26t"]
ISSUE_MODELS += ["densenet121", "mixnet_s"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ISSUE_MODELS)
def test_timm_norm_act_models_fold_exactly_with_and_without_an_example(name: str) -> None:
    """The 7 timm models that were silently wrong without an example input (1.5-115 %) and took
    up to minutes with one: exact both ways, in a handful of forwards."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kwargs = {"img_size": 64} if name.startswith(("botnet", "lambda")) else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    x = torch.randn(2, 3, 64, 64)
    settle(model, x, steps=1)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))  # copies share it
    blind = fold_batchnorm_report(model)
    calls.clear()
    seen = fold_batchnorm_report(model, x)
    handle.remove()
    assert len(calls) == 3  # shapes, reference, one check (densenet121: was one per layer)
    for result in (blind, seen):
        assert_same_outputs(model, result.model, x, torch.randn(3, 3, 64, 64))
    assert not any("changed the output" in reason for _, reason in seen.skipped)
    assert [s.norm for s in blind.folded] == [s.norm for s in seen.folded]
    assert any("after the norm inside the module" in reason for _, reason in seen.skipped)
