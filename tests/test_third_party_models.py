"""Third-party architectures (torchvision:NAME, timm:NAME, module:callable) with the norm axis
and XBNBlock applied by module replacement.

Oracles: hand-computed parameter counts; normlab's own resnet18/resnet50/mobilenetv2, whose
module names are torchvision's, built natively with each norm, against the torchvision model
swapped to it (same state_dict keys and shapes, and the same training-mode forward, bit for
bit, from the same weights); module-type censuses; the random number generator's state."""

from __future__ import annotations

import sys
import warnings
from collections import Counter

import pytest
import torch
from torch import nn

from normlab.errors import ConfigError
from normlab.models import build_model
from normlab.norms import NormSpec
from normlab.norms.replace import NormAct, replace_batchnorms

tvm = pytest.importorskip("torchvision.models")
timm = pytest.importorskip("timm")

torch.set_num_threads(1)

NORMS = ("bn", "gn", "ln", "in", "frozen_bn", "brn", "ghost_bn", "none")
# torchvision resnet18's BatchNorm layers, by channels: stem, then per stage the 4 block norms
# (+ the downsample norm from stage 2 on)
RESNET18_BN = [64] + [64] * 4 + [128] * 5 + [256] * 5 + [512] * 5


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def census(model: nn.Module) -> Counter[str]:
    return Counter(type(m).__name__ for m in model.modules())


def build(name: str, norm: str = "bn", size: int = 32, channels: int = 3, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GroupNorm clamping warnings
        torch.manual_seed(0)
        return build_model(name, 10, norm, in_channels=channels, input_size=size, **options)


def test_resnet18_parameter_counts_after_each_swap_match_the_hand_count():
    # torchvision's resnet18 has 11,689,512 parameters with 1000 classes; fc is 513 x classes
    base = 11_689_512 - 513 * 1000 + 513 * 10
    affine = 2 * sum(RESNET18_BN)  # gamma and beta of every BatchNorm
    biases = sum(RESNET18_BN)  # norm none: the conv before each removed norm gets a bias
    expected = {
        "bn": base,
        "gn": base,  # GroupNorm keeps BN's 2C affine parameters per layer
        "ln": base,
        "brn": base,
        "ghost_bn": base,
        "frozen_bn": base - affine,  # its gamma and beta are buffers
        "none": base - affine + biases,
    }
    for norm, count in expected.items():
        assert params(build("torchvision:resnet18", norm)) == count, norm
    # one input channel: the stem keeps 1 of its 3 input slices of 64 x 7 x 7
    assert params(build("torchvision:resnet18", channels=1)) == base - 64 * 2 * 49


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("xbn", [False, True])
def test_torchvision_resnet18_swapped_is_normlabs_own_resnet18(norm, xbn):
    size = 64 if norm == "in" else 32  # InstanceNorm needs > 1 pixel at layer4
    theirs = build("torchvision:resnet18", norm, size, xbn=xbn)
    ours = build("resnet18", norm, size, small_input=False, xbn=xbn)
    shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ours.state_dict().items()}
    assert census(theirs)["BatchNorm2d"] == census(ours)["BatchNorm2d"]
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    assert torch.equal(theirs.train()(x), ours.train()(x))
    assert torch.equal(theirs.eval()(x), ours.eval()(x))


@pytest.mark.parametrize(
    ("arch", "ours", "norm"),
    [
        ("resnet50", "resnet50", "none"),
        ("resnet50", "resnet50", "gn"),
        ("mobilenet_v2", "mobilenetv2", "none"),
        ("mobilenet_v2", "mobilenetv2", "frozen_bn"),
    ],
)
def test_more_torchvision_models_swapped_are_normlabs_own(arch, ours, norm):
    theirs = build(f"torchvision:{arch}", norm, xbn=True)
    own = build(ours, norm, small_input=False, xbn=True)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {
        k: v.shape for k, v in own.state_dict().items()
    }
    theirs.load_state_dict(own.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    theirs.eval(), own.eval()  # (mobilenet's dropout draws in training mode)
    assert torch.equal(theirs(x), own(x))


def test_gn_swap_leaves_no_batchnorm_and_keeps_the_architectures_init():
    m = build("torchvision:resnet18", "gn", kwargs={"zero_init_residual": True})
    kinds = census(m)
    assert kinds["GroupNorm"] == len(RESNET18_BN) and kinds["BatchNorm2d"] == 0
    # zero_init_residual zeroed every block's bn2 weight: the GroupNorm there took it over
    assert all(
        float(b.bn2.weight.detach().abs().sum()) == 0 for b in m.modules() if hasattr(b, "bn2")
    )


def test_xbn_puts_exactly_one_group_norm_in_every_recognised_block():
    cases = {
        "torchvision:resnet18": ("BasicBlock", 8, "bn1"),
        "torchvision:resnet50": ("Bottleneck", 16, "bn2"),
        "timm:resnet18": ("BasicBlock", 8, "bn1"),
    }
    for name, (block, count, where) in cases.items():
        m = build(name, xbn=True)
        blocks = [b for b in m.modules() if type(b).__name__ == block]
        assert len(blocks) == count
        for b in blocks:
            assert sum(isinstance(x, nn.GroupNorm) for x in b.modules()) == 1
            assert isinstance(getattr(b, where), nn.GroupNorm)
            assert getattr(b, where).num_groups == 32
    for name in ("torchvision:mobilenet_v3_small", "torchvision:efficientnet_b0"):
        m = build(name, xbn=True, xbn_groups=8)
        kind = "InvertedResidual" if "mobilenet" in name else "MBConv"
        blocks = [b for b in m.modules() if type(b).__name__ == kind]
        assert blocks and all(
            sum(isinstance(x, nn.GroupNorm) for x in b.modules()) == 1 for b in blocks
        )
    # timm's BatchNormAct2d: the GroupNorm keeps the activation the layer applied
    m = build("timm:mobilenetv2_100", xbn=True, xbn_groups=8)
    swapped = [x for x in m.modules() if isinstance(x, NormAct)]
    assert len(swapped) == 17 and all(isinstance(x.norm, nn.GroupNorm) for x in swapped)
    assert all(isinstance(x.act, nn.ReLU6) for x in swapped)


def test_a_norm_with_activation_is_replaced_by_the_norm_then_its_activation():
    from timm.layers import BatchNormAct2d

    layer = nn.Sequential(BatchNormAct2d(8, act_layer=nn.SiLU))
    with torch.no_grad():
        layer[0].weight.uniform_(0.5, 1.5)
    weight = layer[0].weight.detach().clone()
    swapped, names = replace_batchnorms(layer, NormSpec(name="ln"))
    assert names == ["0"]
    x = torch.randn(3, 8, 5, 5)
    expected = nn.functional.silu(nn.functional.group_norm(x, 1, weight, torch.zeros(8), eps=1e-5))
    assert torch.allclose(swapped(x), expected, atol=1e-6)


def test_building_draws_only_the_constructors_random_numbers():
    torch.manual_seed(5)
    tvm.resnet18(num_classes=10)
    after_constructor = torch.get_rng_state()
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_model("torchvision:resnet18", 10, "none", in_channels=1, input_size=16, xbn=True)
    assert torch.equal(torch.get_rng_state(), after_constructor)


def test_one_input_channel_keeps_the_first_slice_of_the_built_stem():
    three = build("torchvision:resnet18", channels=3)
    one = build("torchvision:resnet18", channels=1)
    assert torch.equal(one.conv1.weight, three.conv1.weight[:, :1])
    assert one(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_timm_and_module_callable_names_build_the_same_networks_as_their_sources():
    torch.manual_seed(0)
    direct = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    named = build("timm:resnet18", channels=1)
    assert all(
        torch.equal(a, b) for a, b in zip(direct.parameters(), named.parameters(), strict=True)
    )
    via_callable = build("torchvision.models:resnet18")
    plain = build("torchvision:resnet18")
    assert all(
        torch.equal(a, b)
        for a, b in zip(plain.parameters(), via_callable.parameters(), strict=True)
    )


def test_modules_that_fail_or_hold_no_builder_are_refused_like_the_bn_toolbox_does(
    tmp_path, monkeypatch
):
    """One resolver for module:callable: a module whose own code raises while importing, a
    built-in and a non-callable give a ConfigError naming the model, not an internal error."""
    (tmp_path / "fails_on_import_xyz.py").write_text("raise RuntimeError('broken module')\n")
    (tmp_path / "holds_data_xyz.py").write_text("VALUE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, message in [
        ("fails_on_import_xyz:f", "importing module 'fails_on_import_xyz' failed (RuntimeError: "),
        ("holds_data_xyz:VALUE", "'VALUE' in 'holds_data_xyz' is not callable"),
        ("math:sqrt", "'sqrt' is a built-in function"),
    ]:
        with pytest.raises(ConfigError, match=f"model '{name}': " + message.replace("(", r"\(")):
            build(name, "bn", 32)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("torchvision:resnet19", {}, "close matches: resnet18"),
        ("timm:resnet5O", {}, "timm.list_models()"),
        ("torchvision:", {}, "must be"),
        ("no_such_module_xyz:f", {}, "cannot import module 'no_such_module_xyz'"),
        ("torchvision.models:resnet1000", {}, "has no attribute 'resnet1000'"),
        ("torchvision:resnet18", {"placement": "post"}, "cannot reorder"),
        ("torchvision:resnet18", {"small_input": True}, "data.image_size"),
        ("torchvision:resnet18", {"conv_bias": True}, "keeps its own conv biases"),
        ("torchvision:resnet18", {"kwargs": {"weights": "DEFAULT"}}, "may not set weights"),
        ("torchvision:densenet121", {"xbn": True}, "looked for: timm.models"),
        ("timm:convnext_atto", {"xbn": True}, "no block normlab recognises"),
        ("timm:convnext_atto", {"norm": "gn"}, "no BatchNorm layer"),
        ("torchvision:regnet_y_400mf", {"norm": "gn"}, "divide every layer: 1, 2, 4, 8"),
        ("torchvision:regnet_y_400mf", {"xbn": True}, "set model.xbn_groups"),
        ("torchvision:densenet121", {"size": 8}, "data.image_size"),
    ],
)
def test_what_cannot_be_built_is_refused_with_the_reason(name, options, message):
    options = dict(options)
    norm, size = options.pop("norm", "bn"), options.pop("size", 32)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(name, norm, size, **options)


def test_a_config_refuses_what_a_third_party_model_cannot_do_before_anything_runs():
    from normlab.config import config_from_dict
    from normlab.train.names import resolve_names

    config = config_from_dict({"model": {"name": "torchvision:resnet18", "placement": "post"}})
    with pytest.raises(ConfigError, match="cannot reorder"):
        resolve_names(config)
    with pytest.raises(ConfigError, match=r"model\.name"):
        config_from_dict({"model": {"name": ":resnet18"}})
    with pytest.raises(ConfigError, match="no option 'alpha'"):
        resolve_names(config_from_dict({"model": {"name": "timm:resnet18", "alpha": 1}}))


# --------------------------------------------------------------------------------------------
# runs: training, resume, the run directory rebuilding its model, the BN toolbox, a study

DIGITS = {"name": "digits", "limit_train": 64, "limit_val": 32}


def digits_config(**top):
    from _helpers import tiny_base

    return tiny_base(
        **{"model": {"name": "torchvision:resnet18"}, "data": dict(DIGITS), "epochs": 2, **top}
    )


def timeless(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]


@pytest.mark.slow
def test_a_torchvision_run_resumes_exactly_and_its_run_directory_rebuilds_its_model(
    tmp_path, capsys
):
    from normlab.cli import main
    from normlab.config import config_from_dict
    from normlab.store import RunDir
    from normlab.train import Callback, fit

    class StopAt2(Callback):
        def on_epoch_start(self, state, epoch):
            if epoch == 2:
                raise KeyboardInterrupt

    config = config_from_dict(digits_config(norm={"name": "bn"}))
    straight = fit(config, out=tmp_path / "straight", verbose=False)
    with pytest.raises(KeyboardInterrupt):
        fit(config, out=tmp_path / "resumed", callbacks=[StopAt2()], verbose=False)
    resumed = fit(None, out=tmp_path / "resumed", resume=True, verbose=False)
    assert timeless(resumed.metrics) == timeless(straight.metrics)

    run = RunDir(tmp_path / "resumed")
    rebuilt = run.build_model()
    rebuilt.load_state_dict(run.load_checkpoint()["model"])
    trained = resumed.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in rebuilt.state_dict().items())
    x = torch.randn(4, 1, 8, 8)  # (the trained model is channels-last: other kernels)
    assert torch.allclose(rebuilt.eval()(x), resumed.model.eval().cpu()(x), atol=1e-5)

    # the BN toolbox reads the run directory like a built-in one
    assert main(["doctor", str(run.path)]) in (0, 1)
    assert main(["fold", str(run.path), str(tmp_path / "folded.pt"), "--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "error:" not in out


@pytest.mark.slow
def test_a_bn_gn_xbn_study_over_torchvision_resnet18_on_digits_runs_to_a_report(
    tmp_path, monkeypatch
):
    import yaml

    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it (loggers.py)
    from normlab.cli import main

    spec = {
        "name": "tv-xbn",
        "seeds": 1,
        "base": digits_config(epochs=1),
        "variants": {
            "bn": {"norm.name": "bn"},
            "gn": {"norm.name": "gn"},
            "xbn": {"norm.name": "bn", "model.xbn": True},
        },
        "log": ["tensorboard", "mlflow"],
    }
    path = tmp_path / "tv-xbn.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "study"
    assert main(["study", str(path), "--out", str(out), "--jobs", "2", "--quiet"]) == 0
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    for variant in ("bn", "gn", "xbn"):
        assert (out / "runs" / variant / "seed-0" / "tensorboard").is_dir()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "tv-xbn"]
    tags = {
        r.data.tags["normlab.variant"]: r.data.tags for r in client.search_runs([exp.experiment_id])
    }
    assert sorted(tags) == ["bn", "gn", "xbn"]
    assert all(t["normlab.study"] == "tv-xbn" and t["normlab.seed"] == "0" for t in tags.values())


def test_the_command_line_takes_third_party_names_and_refuses_in_one_line(tmp_path, capsys):
    from normlab.cli import main

    code = main(["train", "--model", "torchvision:resnet18", "--placement", "post"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot reorder" in err
    code = main(["train", "--model", "timm:resnet5O", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown model 'timm:resnet5O'" in err and "resnet50" in err
    assert main(["models"]) == 0 and "torchvision:NAME" in capsys.readouterr().out


@pytest.mark.slow
def test_every_probe_records_on_a_third_party_model(tmp_path):
    from normlab.config import config_from_dict
    from normlab.train import fit

    config = digits_config(epochs=1, probes=["weights", "bn", "shift", "acts", "gap"])
    config["data"]["limit_train"] = 32
    config["model"]["xbn"] = True
    result = fit(config_from_dict(config), out=tmp_path / "run", verbose=False)
    (row,) = result.metrics
    for prefix in ("weights/", "bn/", "shift/", "acts/", "gap/"):
        assert any(k.startswith(prefix) for k in row), prefix


@pytest.mark.parametrize(
    ("name", "module"), [("timm:resnet18", "timm"), ("torchvision:resnet18", "torchvision")]
)
def test_a_missing_zoo_package_is_one_line_naming_the_extra(name, module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=rf"needs {module}.*pip install 'normlab\[zoo\]'"):
        build(name)


def test_a_study_plans_a_third_party_model_at_the_size_its_runs_use(tmp_path):
    from normlab.study.plan import plan_study
    from normlab.study.spec import spec_from_dict

    base = digits_config(epochs=1)
    base["data"]["image_size"] = 64  # InstanceNorm on resnet18 needs more than 32x32
    spec = spec_from_dict(
        {"name": "in64", "seeds": 1, "base": base, "variants": {"in": {"norm.name": "in"}}}
    )
    plan = plan_study(spec, tmp_path / "study")
    assert [r.key for r in plan.runs] == ["in/seed-0"]


def test_the_batch_norm_family_keeps_the_architectures_eps_and_momentum_unless_set():
    from normlab.norms import FrozenBatchNorm

    def bns(m):
        return [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]

    own = build("torchvision:mobilenet_v3_small")  # torchvision builds it with 1e-3 and 0.01
    assert {(x.eps, x.momentum) for x in bns(own)} == {(0.001, 0.01)}
    brn = build("torchvision:mobilenet_v3_small", "brn")
    assert {(x.eps, x.momentum) for x in bns(brn)} == {(0.001, 0.01)}
    assert type(bns(brn)[0]).__name__ == "BatchRenorm2d"
    frozen = [x for x in build("torchvision:mobilenet_v3_small", "frozen_bn").modules()]
    assert {x.eps for x in frozen if isinstance(x, FrozenBatchNorm)} == {0.001}
    set_ = build("torchvision:mobilenet_v3_small", bn_momentum=0.2, bn_eps=1e-4)
    assert {(x.eps, x.momentum) for x in bns(set_)} == {(1e-4, 0.2)}
