"""normlab.models: exact parameter counts against reference architectures, torchvision names,
placement order, XBNBlock positions, init, and errors.

Parameter counts are taken on the meta device (no memory, no init cost), so every norm and
placement of ResNet-50 can be counted without building it for real.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from normlab.errors import ConfigError
from normlab.models import (
    MODELS,
    BuildContext,
    ConvNormAct,
    build_model,
    init_weights,
    list_models,
)
from normlab.models.mobilenetv2 import InvertedResidual
from normlab.models.resnet import BasicBlock, Bottleneck, ResNet
from normlab.norms import NORMS, FrozenBatchNorm, NormSpec, is_norm

ALL_MODELS = {
    "mlp",
    "mobilenetv2",
    "resnet18",
    "resnet50",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
}
CIFAR_DEPTHS = (20, 32, 44, 56, 110)


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def meta_model(name: str, num_classes: int = 1000, **kwargs: object) -> nn.Module:
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # gn group clamping on narrow layers
        return build_model(name, num_classes, **kwargs)


# ---------------------------------------------------------------------------------------------
# Channel bookkeeping of the reference architectures, written out independently of the model
# code. Every conv in these networks is followed by exactly one norm of its output width, so
#   S_all = sum of all conv output channels     (= norm channels; affine params = 2 * S_all)
#   S_act = the part of S_all whose conv is followed by an activation (gets a bias in `post`)


def _mobilenetv2_channels() -> tuple[int, int]:
    setting = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]
    s_act, s_lin = 32 + 1280, 0  # stem conv, last 1x1 conv
    inp = 32
    for t, c, n in setting:
        for _ in range(n):
            hidden = inp * t
            s_act += (hidden if t != 1 else 0) + hidden  # expand 1x1, depthwise 3x3
            s_lin += c  # projection 1x1: no activation
            inp = c
    return s_act + s_lin, s_act


def _resnet_channels(bottleneck: bool, blocks: tuple[int, ...]) -> tuple[int, int]:
    s_act, s_lin = 64, 0  # stem conv1
    inplanes = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
        out = planes * (4 if bottleneck else 1)
        for i in range(n):
            if bottleneck:
                s_act += 2 * planes  # conv1 1x1, conv2 3x3
                s_lin += out  # conv3 1x1 before the addition
            else:
                s_act += planes  # conv1
                s_lin += planes  # conv2 before the addition
            if i == 0 and (stage > 0 or inplanes != out):
                s_lin += out  # downsample 1x1
            inplanes = out
    return s_act + s_lin, s_act


REFERENCE = {
    # name: (torchvision parameter count with 1000 classes, (S_all, S_act))
    "mobilenetv2": (3_504_872, _mobilenetv2_channels()),
    "resnet18": (11_689_512, _resnet_channels(False, (2, 2, 2, 2))),
    "resnet50": (25_557_032, _resnet_channels(True, (3, 4, 6, 3))),
}
# GroupNorm options per model that divide every layer width (MobileNetV2 has 24 and 144).
GN_OK = {"mobilenetv2": {"gn_groups": 8}, "resnet18": {}, "resnet50": {}}


def test_registry_lists_every_model_with_options() -> None:
    assert set(MODELS.names()) == ALL_MODELS
    entries = {e.name: e for e in list_models()}
    assert set(entries) == ALL_MODELS
    assert set(entries["mobilenetv2"].options) == {
        "alpha",
        "dropout",
        "xbn",
        "xbn_groups",
        "skip_init",
    }
    assert set(entries["resnet50"].options) == {
        "zero_init_residual",
        "xbn",
        "xbn_groups",
        "skip_init",
    }
    assert set(entries["resnet20"].options) == {
        "shortcut",
        "zero_init_residual",
        "xbn",
        "xbn_groups",
        "skip_init",
    }
    assert set(entries["mlp"].options) == {"hidden", "dropout"}
    for e in entries.values():
        assert e.description and all(isinstance(h, str) and h for _, h in e.options.values())


def test_reference_channel_sums() -> None:
    """The bookkeeping itself, against sums done by hand.

    resnet18: S_all = 64 + 2 blocks x 2 convs x (64+128+256+512) + downsample (128+256+512)
                    = 64 + 3840 + 896 = 4800;  S_act = 64 + 2 x 960 (conv1 of each block) = 1984
    resnet50: S_all = 64 + 3x6x64 + 4x6x128 + 6x6x256 + 3x6x512 (1x1, 3x3, 1x1 x4 per block)
                      + 4 x (64+128+256+512) (downsample) = 64 + 1152 + 3072 + 9216 + 9216 + 3840
                    = 26560;  S_act = 64 + 2 x (3x64 + 4x128 + 6x256 + 3x512) = 7616
    mobilenetv2: S_act = 32 (stem) + 1280 (last) + 32 (block 1 dw)
                         + 2 x (96+144 + 144+192+192 + 192+384+384+384 + 384+576+576
                                + 576+960+960 + 960) (expand and dw of blocks 2..17) = 15552
                 S_all = S_act + 16 + 2x24 + 3x32 + 4x64 + 3x96 + 3x160 + 320 = 15552 + 1504
    """
    assert REFERENCE["resnet18"][1] == (4800, 1984)
    assert REFERENCE["resnet50"][1] == (26_560, 7616)
    assert REFERENCE["mobilenetv2"][1] == (17_056, 15_552)


@pytest.mark.parametrize("name", sorted(REFERENCE))
@pytest.mark.parametrize("norm", ["bn", "gn", "ln", "in", "brn", "ghost_bn", "frozen_bn"])
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_parameter_count_matches_torchvision(name: str, norm: str, placement: str) -> None:
    canonical, (s_all, _) = REFERENCE[name]
    opts = GN_OK[name] if norm == "gn" else {}
    model = meta_model(name, norm=norm, placement=placement, conv_bias=False, **opts)
    if norm == "frozen_bn":
        # weight and bias are buffers: the affine parameters leave the count, the buffers
        # (weight, bias, running mean, running var) hold 4 values per channel
        assert n_params(model) == canonical - 2 * s_all
        assert sum(b.numel() for b in model.buffers()) == 4 * s_all
    else:
        assert n_params(model) == canonical
    if norm == "bn" and placement == "pre":
        # conv_bias auto puts no bias anywhere in `pre`: the canonical network
        assert n_params(meta_model(name)) == canonical


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_parameter_count_bias_rule(name: str) -> None:
    canonical, (s_all, s_act) = REFERENCE[name]
    # post + auto: exactly the convs followed by an activation (then the norm) get a bias
    assert n_params(meta_model(name, placement="post")) == canonical + s_act
    # every conv with a bias
    assert n_params(meta_model(name, conv_bias=True)) == canonical + s_all
    # norm none: all affine parameters go, every conv gets a bias, in either placement
    for placement in ("pre", "post"):
        model = meta_model(name, norm="none", placement=placement)
        assert n_params(model) == canonical - 2 * s_all + s_all
        assert not any(is_norm(m) for m in model.modules())
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert all(c.bias is not None for c in convs)
    assert n_params(meta_model(name, norm=None)) == canonical - s_all


def _cifar_resnet_params(depth: int, num_classes: int = 10, shortcut: str = "A") -> int:
    """He et al. 2016 sec 4.2, counted by hand. n = (depth - 2) / 6 blocks per stage.

    stem:    3x3 conv 3->16 (432) + BN(16) (32)
    stage c: first block  3x3 c_in->c + 3x3 c->c + 2 BN(c) (4c) [+ option B: 1x1 c_in->c + BN]
             n - 1 blocks 2 x (3x3 c->c) + 4c
    head:    fc 64 -> classes, with bias
    resnet20 (n = 3), option A:
      stem 432 + 32                                                =    464
      16 ch: 3 x (2 x 2304 + 64)                                   = 14_016
      32 ch: (4608 + 9216 + 128) + 2 x (2 x 9216 + 128)            = 51_072
      64 ch: (18432 + 36864 + 256) + 2 x (2 x 36864 + 256)         = 203_520
      fc 64 x 10 + 10                                              =    650
      total                                                        = 269_722 (the paper's 0.27M)
    """
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16
    c_in = 16
    for c in (16, 32, 64):
        total += c_in * c * 9 + c * c * 9 + 4 * c
        if shortcut == "B" and c_in != c:
            total += c_in * c + 2 * c
        total += (n - 1) * (2 * c * c * 9 + 4 * c)
        c_in = c
    return total + 64 * num_classes + num_classes


def test_cifar_resnet20_count_pinned() -> None:
    assert _cifar_resnet_params(20) == 269_722
    assert n_params(meta_model("resnet20", 10)) == 269_722


@pytest.mark.parametrize("depth", CIFAR_DEPTHS)
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_resnet_counts(depth: int, shortcut: str) -> None:
    model = meta_model(f"resnet{depth}", 10, shortcut=shortcut)
    assert n_params(model) == _cifar_resnet_params(depth, 10, shortcut)
    # the paper's table: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M
    paper = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6}[depth]
    assert abs(n_params(model) - paper) / paper < 0.02
    # norm none with option A: affine params out, biases in
    blocks = 3 * (depth - 2) // 6
    if shortcut == "A":
        s_all = 16 + 2 * blocks // 3 * (16 + 32 + 64)  # stem + two convs per block
        none = meta_model(f"resnet{depth}", 10, norm="none")
        assert n_params(none) == _cifar_resnet_params(depth) - 2 * s_all + s_all


# ---------------------------------------------------------------------------------------------
# torchvision module names


def test_resnet18_state_dict_keys_are_torchvision() -> None:
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = {"conv1.weight", *(f"bn1.{k}" for k in bn), "fc.weight", "fc.bias"}
    for stage in range(1, 5):
        for block in range(2):
            p = f"layer{stage}.{block}."
            keys |= {p + "conv1.weight", p + "conv2.weight"}
            keys |= {f"{p}bn1.{k}" for k in bn} | {f"{p}bn2.{k}" for k in bn}
            if stage > 1 and block == 0:
                keys |= {p + "downsample.0.weight"} | {f"{p}downsample.1.{k}" for k in bn}
    for placement in ("pre", "post"):
        model = meta_model("resnet18", placement=placement, conv_bias=False)
        assert set(model.state_dict()) == keys


def test_mobilenetv2_state_dict_keys_are_torchvision() -> None:
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = {"features.0.0.weight", *(f"features.0.1.{k}" for k in bn)}
    index = 1
    for t, n in [(1, 1), (6, 2), (6, 3), (6, 4), (6, 3), (6, 3), (6, 1)]:
        for _ in range(n):
            p = f"features.{index}.conv."
            units = ["0", "1"] if t != 1 else ["0"]  # [expand], depthwise: ConvNormAct
            for u in units:
                keys |= {f"{p}{u}.0.weight"} | {f"{p}{u}.1.{k}" for k in bn}
            proj = len(units)
            keys |= {f"{p}{proj}.weight"} | {f"{p}{proj + 1}.{k}" for k in bn}
            index += 1
    assert index == 18
    keys |= {"features.18.0.weight", *(f"features.18.1.{k}" for k in bn)}
    keys |= {"classifier.1.weight", "classifier.1.bias"}
    for placement in ("pre", "post"):
        model = meta_model("mobilenetv2", placement=placement, conv_bias=False)
        assert set(model.state_dict()) == keys


def test_resnet50_names_include_bottleneck_and_downsample() -> None:
    keys = set(meta_model("resnet50").state_dict())
    assert {"layer1.0.bn3.weight", "layer1.0.downsample.0.weight", "layer4.2.conv3.weight"} <= keys
    assert "layer1.1.downsample.0.weight" not in keys
    assert len(keys) == 320  # 53 convs + 53 BN x 5 + fc weight and bias


# ---------------------------------------------------------------------------------------------
# forward passes


def _train_step(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    model.train()
    out = model(x)
    assert out.shape == (x.shape[0], num_classes)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (x.shape[0], num_classes) and torch.isfinite(out).all()


CHEAP = {"mobilenetv2": {"alpha": 0.5, "gn_groups": 8}, "resnet20": {}, "mlp": {"hidden": (16,)}}


@pytest.mark.parametrize("name", sorted(CHEAP))
@pytest.mark.parametrize("norm", sorted(NORMS.names()))
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_every_norm_and_placement_trains_and_evaluates(
    name: str, norm: str, placement: str
) -> None:
    opts = dict(CHEAP[name])
    if norm != "gn":
        opts.pop("gn_groups", None)
    kwargs = dict(norm=norm, placement=placement, input_size=32, in_channels=3, **opts)
    if name == "mlp" and norm == "in":
        with pytest.raises(ConfigError, match="dense"):
            build_model(name, 10, **kwargs)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(name, 10, **kwargs)
    torch.manual_seed(0)
    _train_step(model, torch.randn(2, 3, 32, 32), 10)


def _output_of(module: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Size:
    shapes: list[torch.Size] = []
    handle = module.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        handle.remove()
    return shapes[0]


def test_small_input_shapes_grayscale() -> None:
    x = torch.randn(2, 1, 32, 32)
    mb = build_model("mobilenetv2", 10, in_channels=1, input_size=32)
    assert _output_of(mb.features, mb, x) == (2, 1280, 4, 4)  # stride 8: 32 -> 4
    r18 = build_model("resnet18", 10, "gn", "post", in_channels=1, input_size=32)
    assert r18.conv1.kernel_size == (3, 3) and isinstance(r18.maxpool, nn.Identity)
    assert _output_of(r18.layer4, r18, x) == (2, 512, 4, 4)
    r50 = build_model("resnet50", 10, "brn", "post", in_channels=1, input_size=32)
    _train_step(r50, x, 10)
    assert _output_of(r50.layer4, r50, x) == (2, 2048, 4, 4)
    r20 = build_model("resnet20", 10, in_channels=1, input_size=32)
    assert _output_of(r20.layer3, r20, x) == (2, 64, 8, 8)
    mlp = build_model("mlp", 10, in_channels=1, input_size=32)
    assert mlp.hidden[0][0].in_features == 32 * 32
    assert _output_of(mlp, mlp, x) == (2, 10)


@pytest.mark.slow
def test_imagenet_size_shapes() -> None:
    """224x224 once per ImageNet model: torchvision's geometry (7x7 final maps)."""
    x3, x1 = torch.randn(2, 3, 224, 224), torch.randn(2, 1, 224, 224)
    mb = build_model("mobilenetv2", 1000, input_size=224)
    assert _output_of(mb.features, mb, x3) == (2, 1280, 7, 7)
    r18 = build_model("resnet18", 5, in_channels=1, input_size=224)
    assert r18.conv1.kernel_size == (7, 7) and isinstance(r18.maxpool, nn.MaxPool2d)
    assert _output_of(r18.layer4, r18, x1) == (2, 512, 7, 7)
    r50 = build_model("resnet50", 1000, input_size=224)
    assert _output_of(r50.layer4, r50, x3) == (2, 2048, 7, 7)
    assert _output_of(r50.fc, r50, x3) == (2, 1000)


def test_small_input_explicit_overrides_auto() -> None:
    big = meta_model("resnet18", 10, input_size=32, small_input=False)
    assert big.conv1.kernel_size == (7, 7)
    small = meta_model("mobilenetv2", 10, small_input=True)
    assert small.features[0][0].stride == (1, 1)
    assert meta_model("mobilenetv2", 10, input_size=64).features[0][0].stride == (2, 2)


# ---------------------------------------------------------------------------------------------
# placement order (forward hooks record the call order)


def _call_order(model: nn.Module, x: torch.Tensor, watch: dict[str, nn.Module]) -> list[str]:
    order: list[str] = []
    handles = [
        m.register_forward_hook(lambda mod, i, o, name=name: order.append(name))
        for name, m in watch.items()
    ]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return order


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_placement_order_in_a_basic_block(placement: str) -> None:
    model = build_model("resnet20", 10, placement=placement, input_size=32)
    block = model.layer1[0]
    assert isinstance(block, BasicBlock)
    watch = {"conv1": block.conv1, "bn1": block.bn1, "relu": block.relu, "conv2": block.conv2}
    watch["bn2"] = block.bn2
    order = _call_order(model, torch.randn(2, 3, 32, 32), watch)
    order = order[: order.index("bn2") + 1]  # this block's calls (relu is reused at the end)
    if placement == "pre":
        assert order == ["conv1", "bn1", "relu", "conv2", "bn2"]
    else:
        assert order == ["conv1", "relu", "bn1", "conv2", "bn2"]  # bn2: no act, stays put
    # a conv followed by an activation (then a norm) gets a bias in post; conv2 never
    assert (block.conv1.bias is not None) == (placement == "post")
    assert block.conv2.bias is None


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_placement_order_in_mobilenetv2_and_mlp(placement: str) -> None:
    mb = build_model("mobilenetv2", 10, placement=placement, input_size=32, alpha=0.35)
    stem, block = mb.features[0], mb.features[2]
    assert isinstance(stem, ConvNormAct) and isinstance(block, InvertedResidual)
    dw, proj_conv, proj_norm = block.depthwise(), block.conv[2], block.conv[3]
    watch = {
        "stem.conv": stem[0],
        "stem.norm": stem[1],
        "stem.act": stem[2],
        "dw.conv": dw[0],
        "dw.norm": dw[1],
        "dw.act": dw[2],
        "proj.conv": proj_conv,
        "proj.norm": proj_norm,
    }
    order = _call_order(mb, torch.randn(2, 3, 32, 32), watch)
    expected = {
        "pre": ["stem.conv", "stem.norm", "stem.act", "dw.conv", "dw.norm", "dw.act"],
        "post": ["stem.conv", "stem.act", "stem.norm", "dw.conv", "dw.act", "dw.norm"],
    }[placement]
    assert order == [*expected, "proj.conv", "proj.norm"]

    mlp = build_model("mlp", 10, "bn", placement, input_size=8, hidden=(16,))
    unit = mlp.hidden[0]
    order = _call_order(
        mlp, torch.randn(2, 3, 8, 8), {"linear": unit[0], "norm": unit[1], "act": unit[2]}
    )
    assert order == (["linear", "norm", "act"] if placement == "pre" else ["linear", "act", "norm"])
    assert (unit[0].bias is not None) == (placement == "post")


def test_stem_placement_resnet() -> None:
    model = build_model("resnet18", 10, placement="post", input_size=32)
    order = _call_order(
        model,
        torch.randn(2, 3, 32, 32),
        {"conv1": model.conv1, "bn1": model.bn1, "layer1": model.layer1},
    )
    assert order == ["conv1", "bn1", "layer1"]  # hooks on relu would include block calls
    assert model.conv1.bias is not None


# ---------------------------------------------------------------------------------------------
# XBNBlock


def _group_norms(model: nn.Module) -> list[nn.GroupNorm]:
    return [m for m in model.modules() if isinstance(m, nn.GroupNorm)]


def test_xbn_resnet50_one_gn_per_bottleneck_at_bn2() -> None:
    model = meta_model("resnet50", xbn=True)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16 and len(_group_norms(model)) == 16
    for b in blocks:
        assert isinstance(b.bn2, nn.GroupNorm) and b.bn2.num_groups == 32
        assert type(b.bn1) is nn.BatchNorm2d and type(b.bn3) is nn.BatchNorm2d
    assert n_params(model) == 25_557_032  # GN has the same affine parameters as BN


def test_xbn_resnet18_one_gn_per_basic_block_at_bn1() -> None:
    model = meta_model("resnet18", xbn=True, xbn_groups=16)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8 and len(_group_norms(model)) == 8
    for b in blocks:
        assert isinstance(b.bn1, nn.GroupNorm) and b.bn1.num_groups == 16
        assert type(b.bn2) is nn.BatchNorm2d


def test_xbn_mobilenetv2_gn_after_every_depthwise_conv() -> None:
    model = meta_model("mobilenetv2", xbn=True)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17 and len(_group_norms(model)) == 17
    for b in blocks:
        norm = b.depthwise()[1]
        assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 16
        assert b.depthwise()[0].groups == b.depthwise()[0].in_channels
    assert n_params(model) == 3_504_872


def test_xbn_groups_are_clamped_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="gn_groups=32 exceeds the 16 channels"):
        model = build_model("resnet20", 10, input_size=32, xbn=True, xbn_groups=32)
    groups = {
        name: m.num_groups for name, m in model.named_modules() if isinstance(m, nn.GroupNorm)
    }
    assert len(groups) == 9  # one per block
    assert groups["layer1.0.bn1"] == 16 and groups["layer2.0.bn1"] == 32
    assert groups["layer3.2.bn1"] == 32
    _train_step(model, torch.randn(2, 3, 32, 32), 10)


# ---------------------------------------------------------------------------------------------
# options, norm overrides, errors


def test_norm_options_override_the_spec() -> None:
    model = meta_model("resnet20", 10, norm="gn", gn_groups=4)
    assert {m.num_groups for m in _group_norms(model)} == {4}
    spec = NormSpec(name="bn", bn_convention="keras")
    model = meta_model("resnet20", 10, norm=spec, bn_momentum=0.9)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == pytest.approx(0.1) and m.eps == 1e-3 for m in bns)


def test_unknown_model_lists_known_models() -> None:
    with pytest.raises(ConfigError, match="unknown model 'resnet19'") as err:
        build_model("resnet19", 10)
    for name in ALL_MODELS:
        assert name in str(err.value)


def test_unknown_option_lists_the_models_options() -> None:
    with pytest.raises(ConfigError, match="model 'resnet20' has no option 'alpha'") as err:
        build_model("resnet20", 10, alpha=0.5)
    for opt in ("shortcut", "zero_init_residual", "xbn", "xbn_groups", "gn_groups"):
        assert opt in str(err.value)


def test_bad_placement_norm_and_bias_rule() -> None:
    with pytest.raises(ConfigError, match="placement must be one of pre, post"):
        build_model("resnet20", 10, placement="middle")
    with pytest.raises(ConfigError, match="known norms: bn, brn"):
        build_model("resnet20", 10, norm="batchnorm")
    with pytest.raises(ConfigError, match="conv_bias"):
        build_model("resnet20", 10, conv_bias="yes")
    with pytest.raises(ConfigError, match="conv_bias"):
        build_model("resnet20", 10, conv_bias=1)
    with pytest.raises(ConfigError, match=r"norm\.gn_groups"):
        build_model("resnet20", 10, norm="gn", gn_groups=0)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("mobilenetv2", {"alpha": 0}, "alpha"),
        ("mobilenetv2", {"dropout": 1.0}, "dropout"),
        ("mobilenetv2", {"xbn": "yes"}, "xbn"),
        ("resnet18", {"xbn_groups": 0}, "xbn_groups"),
        ("resnet20", {"shortcut": "C"}, "shortcut"),
        ("mlp", {"input_size": 8, "hidden": "big"}, "hidden"),
        ("mlp", {}, "input_size"),
        ("resnet20", {"num_classes": 0}, "num_classes"),
        ("resnet20", {"in_channels": 0}, "in_channels"),
    ],
)
def test_bad_option_values(name: str, kwargs: dict[str, object], match: str) -> None:
    num_classes = kwargs.pop("num_classes", 10)
    with pytest.raises(ConfigError, match=match):
        meta_model(name, num_classes, **kwargs)


def test_mobilenetv2_gn_groups_must_divide_its_widths() -> None:
    # 24 channels clamp 32 -> 24; the first 144-channel expansion cannot be split into 32 groups
    with pytest.raises(ConfigError, match=r"norm.gn_groups=32 does not divide C=144"):
        meta_model("mobilenetv2", norm="gn")


# ---------------------------------------------------------------------------------------------
# initialisation and state_dict compatibility


def _norm_modules(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if is_norm(m))


@pytest.mark.filterwarnings("ignore:norm.gn_groups=32 exceeds")
@pytest.mark.parametrize("norm", ["gn", "ln", "brn", "frozen_bn", "in"])
def test_init_sets_every_norm_to_identity_affine(norm: str) -> None:
    model = build_model("resnet20", 10, norm=norm, placement="post", input_size=32)
    norms = list(_norm_modules(model))
    assert norms and all(type(m) is not nn.BatchNorm2d for m in norms)
    with torch.no_grad():  # scramble, then re-init
        for m in norms:
            m.weight.normal_()
            m.bias.normal_()
        for p in model.parameters():
            p.add_(1.0)
    init_weights(model)
    for m in norms:
        assert torch.equal(m.weight, torch.ones_like(m.weight))
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
    fc = model.fc
    assert torch.equal(fc.bias, torch.zeros_like(fc.bias))
    assert 0.008 < fc.weight.std().item() < 0.012  # N(0, 0.01), 640 values
    conv = model.layer3[1].conv1  # 64 -> 64, 3x3: fan_out 576, std sqrt(2 / 576)
    assert conv.bias is not None and torch.equal(conv.bias, torch.zeros_like(conv.bias))
    assert abs(conv.weight.std().item() / (2 / 576) ** 0.5 - 1) < 0.03


def test_built_gn_model_has_identity_norms() -> None:
    model = build_model("mlp", 10, "ln", input_size=4, hidden=(8, 8))
    norms = list(_norm_modules(model))
    assert len(norms) == 2 and all(isinstance(m, nn.LayerNorm) for m in norms)
    for m in norms:
        assert torch.equal(m.weight, torch.ones(8)) and torch.equal(m.bias, torch.zeros(8))


def test_zero_init_residual() -> None:
    model = build_model("resnet20", 10, input_size=32, zero_init_residual=True)
    for block in model.modules():
        if isinstance(block, BasicBlock):
            assert block.bn2 is not None and block.bn1 is not None
            assert torch.equal(block.bn2.weight, torch.zeros(block.bn2.weight.shape))
            assert torch.equal(block.bn1.weight, torch.ones(block.bn1.weight.shape))
    # bottleneck: bn3 (a small ResNet with one bottleneck per stage, built directly)
    ctx = BuildContext(norm=NormSpec("gn"), small_input=True)
    small = ResNet(ctx, Bottleneck, (1, 1, 1, 1), 10, zero_init_residual=True)
    bottlenecks = [m for m in small.modules() if isinstance(m, Bottleneck)]
    assert len(bottlenecks) == 4
    for b in bottlenecks:
        assert b.bn3 is not None and b.bn2 is not None
        assert not b.bn3.weight.any() and b.bn2.weight.all()
    # frozen BN weights are buffers: left alone (the block could never recover)
    frozen = build_model("resnet20", 10, "frozen_bn", input_size=32, zero_init_residual=True)
    assert all(m.weight.all() for m in frozen.modules() if isinstance(m, FrozenBatchNorm))
    build_model("resnet20", 10, "none", input_size=32, zero_init_residual=True)  # nothing to do


def test_bn_checkpoint_loads_into_every_batch_norm_variant() -> None:
    torch.manual_seed(0)
    bn_model = build_model("resnet20", 10, "bn", input_size=32)
    bn_model.train()
    for _ in range(2):
        bn_model(torch.randn(4, 3, 32, 32))
    state = bn_model.state_dict()
    x = torch.randn(2, 3, 32, 32)
    expected = bn_model.eval()(x)
    for norm in ("brn", "ghost_bn", "frozen_bn"):
        other = build_model("resnet20", 10, norm, input_size=32)
        other.load_state_dict(state)  # strict
        torch.testing.assert_close(other.eval()(x), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# SkipInit (De & Smith 2020): one scalar per residual branch, every block the identity at init

# residual blocks, counted from the architectures' definitions: resnet18 2+2+2+2, resnet50
# 3+4+6+3, CIFAR ResNet-(6n+2) 3n, MobileNetV2 the blocks with stride 1 and equal widths
# (repeats after the first of each stage: 0+1+2+3+2+2+0)
RESIDUAL_BLOCKS = {"resnet18": 8, "resnet50": 16, "resnet20": 9, "resnet110": 54, "mobilenetv2": 10}


@pytest.mark.parametrize("name", sorted(RESIDUAL_BLOCKS))
def test_skip_init_adds_one_scalar_per_residual_block(name: str) -> None:
    plain = n_params(meta_model(name, norm="none"))
    assert n_params(meta_model(name, norm="none", skip_init=True)) == plain + RESIDUAL_BLOCKS[name]
    with_bn = n_params(meta_model(name))
    assert n_params(meta_model(name, skip_init=True)) == with_bn + RESIDUAL_BLOCKS[name]


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "mobilenetv2"])
def test_skip_init_blocks_are_the_identity_at_init_and_learn(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 4, norm="none", input_size=32, skip_init=True)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(block: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        (x,) = inputs
        if isinstance(block, InvertedResidual):
            if block.use_res_connect:
                seen.append((out, x))
            return
        identity = x if block.downsample is None else block.downsample(x)
        seen.append((out, torch.relu(identity)))

    blocks = [
        m for m in model.modules() if isinstance(m, BasicBlock | Bottleneck | InvertedResidual)
    ]
    handles = [b.register_forward_hook(hook) for b in blocks]
    logits = model(torch.randn(2, 3, 32, 32))
    for h in handles:
        h.remove()
    assert len(seen) == RESIDUAL_BLOCKS.get(name, 16)
    for out, expected in seen:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    logits.sum().backward()
    alphas = [p for n, p in model.named_parameters() if n.endswith("skip.alpha")]
    assert len(alphas) == len(seen) and all(float(a.grad.abs()) > 0 for a in alphas)
