"""The doctor: every finding fires on its planted defect and stays silent without it; no false
alarms on normlab's, torchvision's and timm's models; exit codes; JSON; static-check speed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import settle
from torch import nn

from normlab.bn import diagnose, recalibrate_batchnorm
from normlab.bn.diagnose import CHECKS, Report, diagnose_layers
from normlab.bn.evidence import checkpoint_evidence
from normlab.models import build_model, list_models

torch.set_num_threads(1)


def small_net(**bn: object) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8, **bn),  # type: ignore[arg-type]
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


X = torch.randn(16, 3, 8, 8)


def trained_net(**bn: object) -> nn.Sequential:
    return settle(small_net(**bn), X)  # type: ignore[return-value]


def layers_with(report: Report, finding_id: str) -> list[str | None]:
    return [f.layer for f in report.by_id(finding_id)]


# ---- each finding: planted and absent --------------------------------------------------------


def test_stats_initial_in_trained_model() -> None:
    model = trained_net()
    with torch.no_grad():
        model[1].running_mean.zero_()
        model[1].running_var.fill_(1.0)
    report = diagnose(model, dynamic=False)
    assert layers_with(report, "bn-stats-initial") == ["1"]
    assert report.exit_code == 2
    f = report.by_id("bn-stats-initial")[0]
    assert f.severity == "error" and f.fixable and "recalibrate" in f.fix
    assert diagnose(trained_net(), dynamic=False).exit_code == 0


def test_untrained_model_is_not_flagged_unless_declared_trained() -> None:
    fresh = small_net().eval()
    report = diagnose(fresh, dynamic=False)
    assert report.ids() == {"model-untrained"} and report.exit_code == 0
    declared = diagnose(fresh, dynamic=False, trained=True)
    assert layers_with(declared, "bn-stats-initial") == ["1", "4"]


def test_counter_zero_with_initial_stats_in_trained_model() -> None:
    model = small_net().eval()
    with torch.no_grad():
        model[1].weight.mul_(1.5)  # trained affine, statistics never updated, counter 0
    report = diagnose(model, dynamic=False)
    assert layers_with(report, "bn-stats-initial") == ["1", "4"]
    assert report.by_id("bn-stats-initial")[0].evidence["num_batches_tracked"] == 0


@pytest.mark.parametrize("defect", ["nan_mean", "inf_var", "negative_var", "nan_weight"])
def test_nonfinite_statistics(defect: str) -> None:
    model = trained_net()
    bn = model[4]
    with torch.no_grad():
        if defect == "nan_mean":
            bn.running_mean[2] = float("nan")
        elif defect == "inf_var":
            bn.running_var[0] = float("inf")
        elif defect == "negative_var":
            bn.running_var[1] = -0.5
        else:
            bn.weight[0] = float("nan")
    report = diagnose(model, dynamic=False)
    (f,) = report.by_id("bn-stats-nonfinite")
    assert f.layer == "4" and report.exit_code == 2
    assert f.fixable == (defect != "nan_weight")  # recalibration cannot repair weights


def test_train_mode_at_inference_confirmed_dynamically() -> None:
    model = trained_net().train()
    report = diagnose(model, example_input=X[:4])
    assert layers_with(report, "bn-train-mode") == ["1", "4"]
    assert report.by_id("bn-train-mode")[0].evidence["sample_vs_batch_max_diff"] > 1e-3
    assert report.exit_code == 2
    assert model.training  # the doctor changed nothing
    assert "bn-train-mode" not in diagnose(trained_net(), example_input=X[:4]).ids()
    # a rebuilt model's mode is meaningless: not flagged
    assert "bn-train-mode" not in diagnose(model, mode_recorded=False, dynamic=False).ids()
    # about to be trained: train mode is expected
    assert "bn-train-mode" not in diagnose(model, context="training", dynamic=False).ids()


def test_batch_statistics_at_inference() -> None:
    report = diagnose(trained_net(track_running_stats=False), dynamic=False)
    assert layers_with(report, "bn-batch-stats-eval") == ["1"]
    assert report.exit_code == 2


def test_bias_before_bn() -> None:
    model = trained_net()
    model[0] = nn.Conv2d(3, 8, 3, padding=1, bias=True)
    report = diagnose(model, dynamic=False)
    (f,) = report.by_id("bn-bias-before")
    assert f.layer == "1" and f.severity == "info" and f.fixable
    assert report.exit_code == 0
    assert "bn-bias-before" not in diagnose(trained_net(), dynamic=False).ids()


def test_bn_after_activation() -> None:
    post = build_model("resnet20", 4, placement="post").eval()
    report = diagnose(post, dynamic=False)
    names = layers_with(report, "bn-after-activation")
    assert "layer1.0.bn1" in names and "layer1.0.bn2" not in names
    assert report.exit_code == 0
    by_layer = {f.layer: f for f in report.by_id("bn-after-activation")}
    assert by_layer["layer1.0.bn1"].fixable  # folds into layer1.0.conv2
    assert not by_layer["bn1"].fixable  # feeds a block and its shortcut
    pre = build_model("resnet20", 4, placement="pre").eval()
    assert "bn-after-activation" not in diagnose(pre, dynamic=False).ids()


@pytest.mark.parametrize(
    ("momentum", "expected", "status"),
    [(0.99, "bn-momentum-keras", 1), (0.0, "bn-momentum-zero", 2)],
)
def test_suspicious_momentum(momentum: float, expected: str, status: int) -> None:
    report = diagnose(trained_net(momentum=momentum), dynamic=False)
    assert layers_with(report, expected) == ["1"]
    # momentum 0 also left the statistics at their initial values: that is the error
    assert report.exit_code == status
    assert ("bn-stats-initial" in report.ids()) == (momentum == 0.0)
    clean = diagnose(trained_net(momentum=0.1), dynamic=False)
    assert not {"bn-momentum-keras", "bn-momentum-zero"} & clean.ids()


def test_keras_eps_is_a_note() -> None:
    report = diagnose(trained_net(eps=1e-3), dynamic=False)
    assert layers_with(report, "bn-eps-keras") == ["1"] and report.exit_code == 0
    assert "bn-eps-keras" not in diagnose(trained_net(eps=1e-5), dynamic=False).ids()


def test_frozen_parameters_but_statistics_updating() -> None:
    model = trained_net()
    for p in model[1].parameters():
        p.requires_grad_(False)
    model.train()
    report = diagnose(model, example_input=X[:4], context="training")
    (f,) = report.by_id("bn-frozen-updating")
    assert f.layer == "1" and f.evidence["statistics_moved_in_one_forward"] is True
    assert report.exit_code == 1
    model.eval()  # frozen and in eval: really frozen
    assert "bn-frozen-updating" not in diagnose(model, dynamic=False).ids()


def test_tiny_normalisation_count() -> None:
    head = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.BatchNorm1d(8),  # after global pooling: count = batch size
        nn.Linear(8, 2),
    )
    model = settle(head, X)
    x = X[:2]
    assert layers_with(diagnose(model, example_input=x, batch_size=4), "bn-tiny-count") == ["5"]
    assert diagnose(model, example_input=x, batch_size=4).exit_code == 1
    one = diagnose(model, example_input=x, batch_size=1)
    assert {f.severity for f in one.by_id("bn-tiny-count")} == {"error"}
    assert layers_with(one, "bn-tiny-count") == ["5"]  # layer 1: 1 x 6 x 6 = 36 >= 16 is fine
    assert "bn-tiny-count" not in diagnose(model, example_input=x, batch_size=128).ids()
    unknown = diagnose(model, dynamic=False)
    assert layers_with(unknown, "bn-after-global-pool") == ["5"] and unknown.exit_code == 0


def test_group_norm_groups_must_divide_channels() -> None:
    model = build_model("resnet20", 4, norm="gn", gn_groups=4).eval()
    gn = model.layer1[0].bn1
    assert isinstance(gn, nn.GroupNorm)
    gn.num_groups = 3  # planted: 16 channels
    report = diagnose(model, dynamic=False)
    (f,) = report.by_id("gn-groups")
    assert f.layer == "layer1.0.bn1" and f.evidence == {"groups": 3, "channels": 16}
    assert report.exit_code == 2
    clean = build_model("resnet20", 4, norm="gn", gn_groups=4).eval()
    assert "gn-groups" not in diagnose(clean, dynamic=False).ids()


def test_estimation_shift_after_weight_averaging() -> None:
    data = [X[i : i + 8] for i in range(0, 16, 8)]
    model = trained_net()
    recalibrate_batchnorm(model, data)
    clean = diagnose(model, data)
    assert "bn-estimation-shift" not in clean.ids() and "data" in clean.checks
    # SWA-style: average with another model's weights, keep the (now stale) statistics
    other = settle(small_net(), X * 3.0 + 1.0, seed=1)
    with torch.no_grad():
        for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
            if name.startswith("3."):
                p.mul_(0.3).add_(q, alpha=0.7).mul_(3.0)
    report = diagnose(model, data)
    assert "4" in layers_with(report, "bn-estimation-shift")
    assert report.exit_code == 1
    recalibrate_batchnorm(model, data)
    assert "bn-estimation-shift" not in diagnose(model, data).ids()


def _np_shift(
    running_mean: np.ndarray, running_var: np.ndarray, values: np.ndarray, eps: float
) -> tuple[float, float]:
    """The estimation shift written out: ``values`` is (C, n), the population variance biased."""
    mean, var = values.mean(1), values.var(1, ddof=0)
    mean_shift = np.mean(np.abs(running_mean - mean) / np.sqrt(var + eps))
    var_shift = np.mean(np.abs(np.log(running_var + eps) - np.log(var + eps)))
    return float(mean_shift), float(var_shift)


def test_estimation_shift_equals_closed_form_with_the_biased_variance() -> None:
    """Few values per channel (2 batches x 4 x 3 x 3 = 72), so the unbiased variance would
    differ by log(72 / 71) = 0.014 in the variance shift: far above the tolerance."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1, bias=False), nn.BatchNorm2d(2, eps=1e-3)
    ).double()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(2)]
    with torch.no_grad():
        for bn in (model[0], model[2]):
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.uniform_(-0.5, 0.5, generator=g)
            bn.running_mean.uniform_(-1.0, 1.0, generator=g)
            bn.running_var.uniform_(0.5, 3.0, generator=g)
    model.eval()
    # closed form: layer 0 sees the raw input; layer 2 the 1x1 conv of layer 0's output, which
    # normalises each batch by its own (biased) statistics, as in training
    per_channel = [b.numpy().transpose(1, 0, 2, 3).reshape(3, -1) for b in batches]
    bn0, w = model[0], model[1].weight.detach().numpy()[:, :, 0, 0]
    gamma, beta = bn0.weight.detach().numpy()[:, None], bn0.bias.detach().numpy()[:, None]
    normalised = [
        (v - v.mean(1, keepdims=True)) / np.sqrt(v.var(1, ddof=0, keepdims=True) + bn0.eps)
        for v in per_channel
    ]
    inputs = {
        "0": np.concatenate(per_channel, axis=1),
        "2": np.concatenate([w @ (gamma * h + beta) for h in normalised], axis=1),
    }
    before = {
        n: (model[int(n)].running_mean.clone(), model[int(n)].running_var.clone()) for n in inputs
    }

    report = diagnose(
        model, batches, trained=True, shift_mean_threshold=0.0, shift_var_threshold=0.0
    )
    found = {f.layer: f.evidence for f in report.by_id("bn-estimation-shift")}
    assert sorted(found) == ["0", "2"]
    for name, values in inputs.items():
        bn = model[int(name)]
        rm, rv = (t.numpy() for t in before[name])
        mean_shift, var_shift = _np_shift(rm, rv, values, bn.eps)
        assert found[name]["mean_shift"] == pytest.approx(mean_shift, rel=1e-10)
        assert found[name]["var_log_ratio"] == pytest.approx(var_shift, rel=1e-10)
        assert torch.equal(bn.running_mean, before[name][0])  # the model itself is untouched


def test_sync_batchnorm_is_noted() -> None:
    model = trained_net()
    sync = nn.SyncBatchNorm(8)
    sync.load_state_dict(model[4].state_dict())
    model[4] = sync.eval()
    report = diagnose(model, dynamic=False)
    assert layers_with(report, "bn-sync") == ["4"] and report.exit_code == 0


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) if x.sum() > -1e9 else x


def test_untraceable_model_without_input_notes_the_missing_graph() -> None:
    report = diagnose(Untraceable().eval(), dynamic=False)
    assert "graph-unavailable" in report.ids() and report.exit_code == 0
    with_input = diagnose(Untraceable().eval(), example_input=X[:2])
    assert "bn-bias-before" in with_input.ids()  # found through the hook fallback
    assert any("torch.fx failed" in n for n in with_input.notes)


# ---- report format and exit codes ------------------------------------------------------------


def test_report_json_and_text() -> None:
    model = trained_net(momentum=0.99)
    with torch.no_grad():
        model[4].running_mean.zero_()
        model[4].running_var.fill_(1.0)
    report = diagnose(model, dynamic=False, target="net.pt")
    data = json.loads(report.to_json())
    assert data["exit_status"] == 2 and data["counts"]["error"] == 1
    ids = {f["id"] for f in data["findings"]}
    assert ids == {"bn-stats-initial", "bn-momentum-keras"} and ids <= set(CHECKS)
    for f in data["findings"]:
        assert set(f) == {"id", "severity", "layer", "message", "fix", "fixable", "evidence"}
    text = report.format_text()
    assert text.index("ERROR bn-stats-initial") < text.index("WARNING bn-momentum-keras")
    assert text.rstrip().endswith("-> exit 2")


# ---- no false alarms -------------------------------------------------------------------------

NORMS = ["bn", "gn", "frozen_bn", "brn", "ghost_bn", "none"]
BIG = {"resnet50", "resnet18", "resnet110"}  # fewer norms there, to keep the suite fast


@pytest.mark.filterwarnings("ignore:norm.gn_groups")
@pytest.mark.parametrize("name", [e.name for e in list_models()])
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_no_false_alarms_on_normlab_models(name: str, placement: str) -> None:
    size = 8
    kwargs = {"input_size": size} if name in ("mlp", "mobilenetv2", "resnet18", "resnet50") else {}
    x = torch.randn(4, 3, size, size)
    for norm in NORMS[:3] if name in BIG else NORMS:
        extra = {"gn_groups": 8} if name == "mobilenetv2" and norm == "gn" else {}
        if name == "mlp" and norm == "gn":
            continue  # mlp's dense norms: ln covers the per-sample case
        model = build_model(name, 5, norm=norm, placement=placement, **kwargs, **extra).eval()
        report = diagnose(model, dynamic=False)
        assert report.exit_code == 0, (norm, report.format_text())
    trained = settle(build_model(name, 5, placement=placement, **kwargs), x, steps=1)
    report = diagnose(trained, example_input=x)
    assert report.exit_code == 0, report.format_text()
    assert not {"bn-stats-initial", "model-untrained"} & report.ids()


ZOO = {
    "torchvision": [
        "resnet50",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "efficientnet_b0",
        "densenet121",
        "shufflenet_v2_x0_5",
        "vgg11_bn",
    ],
    "timm": [
        "resnet50",
        "efficientnet_b0",
        "mobilenetv3_small_100",
        "regnetx_002",
        "convnext_atto",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize(("lib", "name"), [(lib, n) for lib, names in ZOO.items() for n in names])
def test_no_false_alarms_torchvision_timm(lib: str, name: str) -> None:
    if lib == "torchvision":
        tv = pytest.importorskip("torchvision")
        model = tv.models.get_model(name, weights=None, num_classes=10)
    else:
        timm = pytest.importorskip("timm")
        model = timm.create_model(name, pretrained=False, num_classes=10)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    fresh = diagnose(model, example_input=x)
    assert fresh.exit_code == 0, fresh.format_text()
    trained = settle(model, x, steps=1)
    report = diagnose(trained, example_input=x)
    assert report.exit_code == 0, report.format_text()


def test_static_checks_on_resnet50_under_two_seconds() -> None:
    model = build_model("resnet50", 1000).eval()
    start = time.perf_counter()
    report = diagnose(model, dynamic=False)
    elapsed = time.perf_counter() - start
    assert report.exit_code == 0
    assert elapsed < 2.0, f"static doctor on resnet50 took {elapsed:.2f} s"


# ---- the table of checks ---------------------------------------------------------------------


def test_checks_table_is_the_registry_and_the_docs_table_is_generated() -> None:
    from normlab.bn.checks import CHECK_REGISTRY
    from normlab.bn.checks_doc import DOC, render

    assert set(CHECKS) == set(CHECK_REGISTRY.names())
    assert all(CHECKS[name] == CHECK_REGISTRY.get(name).title for name in CHECKS)
    assert DOC.read_text() == render(), "regenerate it: python -m normlab.bn.checks_doc"
    for name in CHECKS:
        assert f"| `{name}` |" in render()


def test_a_finding_must_use_a_registered_id_and_severity() -> None:
    from normlab.bn.findings import Finding

    Finding("bn-tiny-count", "warning", "x", "m", "f", fixable=False)
    with pytest.raises(ValueError, match="unknown finding id"):
        Finding("bn-typo", "error", "x", "m", "f", fixable=False)
    with pytest.raises(ValueError, match="registered"):
        Finding("bn-sync", "error", "x", "m", "f", fixable=False)  # bn-sync is a note


def test_a_check_is_one_registered_function_and_runs_from_the_table() -> None:
    """Registering a layer check is all it takes for diagnose to run it (then it is removed)."""
    from normlab.bn.checks import CHECK_REGISTRY, check
    from normlab.bn.findings import Finding

    @check("test-every-bn", "info", "test", "a test check", kind="layer")
    def every_bn(layer, ctx):
        yield Finding("test-every-bn", "info", layer.name, "seen", "none", fixable=False)

    try:
        report = diagnose(trained_net(), dynamic=False)
        assert layers_with(report, "test-every-bn") == ["1", "4"]
        with pytest.raises(ValueError, match="already registered"):
            check("test-every-bn", "info", "again", "again", kind="layer")(every_bn)
    finally:
        del CHECK_REGISTRY._items["test-every-bn"]
    assert "test-every-bn" not in diagnose(trained_net(), dynamic=False).ids()


# ---- evidence of training --------------------------------------------------------------------

KERAS = Path(__file__).parent / "fixtures" / "keras"
KERAS_EXPECTED = json.loads((KERAS / "expected.json").read_text())


def _repvgg_like(widths: tuple[int, ...] = (32, 32, 64, 64, 96, 96)) -> nn.Sequential:
    """Convs with BNs initialised as timm's RepVGG does: weight N(0.1, 0.1), bias N(0, 0.1)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    c = 3
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        c = w
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 4))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 0.1, 0.1)
            nn.init.normal_(m.bias, 0.0, 0.1)
    return model.eval()


def test_fresh_timm_repvgg_is_untrained_and_says_why() -> None:
    """timm's repvgg_a0 draws its BN weights from N(0.1, 0.1): once taken for trained (61
    errors); no counter, num_batches_tracked 0 and weights alike in every layer say fresh."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("repvgg_a0", pretrained=False, num_classes=10).eval()
    report = diagnose(model, dynamic=False)
    assert report.counts()["error"] == 0 and "model-untrained" in report.ids()
    assert report.training is not None and report.training["verdict"] == "untrained"
    said = {e["category"] for e in report.training["rests_on"]}
    assert said == {"batches", "affine"}
    (f,) = report.by_id("model-untrained")
    assert "num_batches_tracked=0 in all 61 BN layer(s)" in f.message
    assert "alike in every layer" in f.message and "eval mode" in f.message
    # the same weights, with an optimizer that took steps: now the 61 layers are errors, and
    # the cause is named (the BN layers never ran in training mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # lr 0: the step keeps the weights, the state records it
    opt.step()
    opt.zero_grad(set_to_none=True)
    counted = diagnose(model, dynamic=False, evidence=checkpoint_evidence(
        {"optimizer": opt.state_dict()}
    ))  # fmt: skip
    initial = counted.by_id("bn-stats-initial")
    assert len(initial) == 61 and counted.training["verdict"] == "trained"
    assert {f.evidence["cause"] for f in initial} == {"never-in-train-mode"}
    assert "momentum buffers" in initial[0].message


def test_random_affine_init_is_told_from_layers_that_moved_each_their_own_way() -> None:
    """alike() on the affine of 6 BN layers (32 to 96 channels): a fresh N(0.1, 0.1) draw passes,
    and so does a uniform one, but not one centred on the default 1; layers moved each their
    own way fail: each scaled by its own
    factor (0.8**i or 1.3**i, i = 0..5) or shifted by 0.03 * i. (Measured power at these widths:
    0.85**i, 1.2**i and 0.02 * i still pass; wider and deeper models are told apart sooner.)
    Too few values are never called a random initialisation."""
    fresh = _repvgg_like()
    assert diagnose(fresh, dynamic=False).training["verdict"] == "untrained"
    uniform = _repvgg_like()
    with torch.no_grad():
        for m in uniform.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.0, 0.2)  # a non-normal draw
    assert diagnose(uniform, dynamic=False).training["verdict"] == "untrained"
    # alike but centred on the default 1: as a default init moved a little by training looks
    for low, high in ((0.5, 1.5), (0.95, 1.05)):
        near_one = _repvgg_like()
        with torch.no_grad():
            for m in near_one.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(low, high)
        assert diagnose(near_one, dynamic=False).training["verdict"] == "trained"
    moves = [
        lambda w, i: w.mul_(0.8**i),
        lambda w, i: w.mul_(1.3**i),
        lambda w, i: w.add_(0.03 * i),
    ]
    for move in moves:
        moved = _repvgg_like()
        with torch.no_grad():
            bns = [m for m in moved.modules() if isinstance(m, nn.BatchNorm2d)]
            for i, m in enumerate(bns):
                move(m.weight, i)
        report = diagnose(moved, dynamic=False)
        assert report.training["verdict"] == "trained"
        assert len(report.by_id("bn-stats-initial")) == 6
    tiny = _repvgg_like(widths=(4, 4, 4, 4, 4, 4))  # 24 values: too few to tell
    assert diagnose(tiny, dynamic=False).training["verdict"] == "trained"


def test_a_live_model_with_gradients_was_trained() -> None:
    """Trained for 10 steps with BN kept in eval mode (statistics frozen while the parameters
    train): its .grad tensors say trained, and the cause is named."""
    model = _repvgg_like()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    report = diagnose(model, dynamic=False)
    assert report.training["verdict"] == "trained"
    assert [e["category"] for e in report.training["rests_on"]] == ["batches"]
    causes = {f.evidence["cause"] for f in report.by_id("bn-stats-initial")}
    assert causes == {"never-in-train-mode"} and report.exit_code == 2


def test_checkpoint_counters(tmp_path: Path) -> None:
    """A real optimizer and scheduler state: steps taken say trained, step 0 untrained; an empty
    state and epoch 0 (many trainers count from 0) say nothing."""
    model = small_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    # no step yet, and plain SGD keeps no state however long it trains: neither says anything
    assert [e.says for e in checkpoint_evidence({"optimizer": opt.state_dict()})] == ["neutral"]
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    model(X).sum().backward()
    plain.step()
    assert plain.state_dict()["state"] == {}
    assert [e.says for e in checkpoint_evidence({"optimizer": plain.state_dict()})] == ["neutral"]
    model.zero_grad()
    for _ in range(3):
        model(X).sum().backward()
        opt.step()
        sched.step()
    found = checkpoint_evidence(
        {"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(), "epoch": 0}
    )
    details = [e.detail for e in found]
    assert details == ["'optimizer' optimizer step=3 (8 parameter(s))", "'lr_scheduler' "
                       "scheduler last_epoch=3"]  # fmt: skip
    assert checkpoint_evidence({"global_step": torch.tensor(0)})[0].says == "untrained"
    assert checkpoint_evidence({"epoch": 0, "step": "x"}) == []


def test_checkpoint_with_optimizer_steps_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A state_dict file whose affine looks fresh (all 1/0) and statistics initial: untrained by
    the tensors alone, trained by the optimizer state saved beside it."""
    from normlab.cli import main

    model = small_net().eval()  # BN in eval mode: its statistics stay initial
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)  # only conv 0 trains
    model(X).sum().backward()
    opt.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict(), "optimizer": opt.state_dict()}, path)
    assert main(["doctor", str(path), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["training"]["verdict"] == "trained"
    assert "'optimizer' optimizer holds per-parameter state" in report["training"]["summary"]
    initial = [f for f in report["findings"] if f["id"] == "bn-stats-initial"]
    assert [f["layer"] for f in initial] == ["1", "4"]
    assert all(f["evidence"]["cause"] == "never-in-train-mode" for f in initial)
    torch.save({"state_dict": model.state_dict()}, path)  # no optimizer: fresh by its tensors
    assert main(["doctor", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["training"]["verdict"] == "untrained"


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras_iterations_are_read_from_the_file(suffix: str) -> None:
    pytest.importorskip("h5py")
    from normlab.bn.keras_file import read_keras_training

    # trained/never_updated: 96 samples / batch 16 x 3 epochs; the others record their count
    for stem, steps in (("trained", 18), ("never_updated", 18), ("frozen_bn", 94)):
        assert KERAS_EXPECTED.get(stem, {}).get("iterations", steps) == steps
        got = read_keras_training(KERAS / f"{stem}{suffix}")
        assert got.iterations == steps and got.optimizer == "SGD"
    assert KERAS_EXPECTED["momentum_one"]["iterations"] == 94


def test_keras_frozen_bn_in_a_trained_model_is_an_identity_layer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Keras BN trainable=False from the start, convs trained 94 steps: once 'an untrained
    model, where that is expected', exit 0. Now an error naming the counter and the cause."""
    pytest.importorskip("h5py")
    from normlab.cli import main

    bn = KERAS_EXPECTED["frozen_bn"]["bn"]
    assert all(not v["trainable"] and set(v["gamma"]) == {1.0} for v in bn.values())
    for suffix in (".keras", ".h5"):
        assert main(["doctor", str(KERAS / f"frozen_bn{suffix}"), "--json"]) == 2
        report = json.loads(capsys.readouterr().out)
        frozen = [f for f in report["findings"] if f["id"] == "bn-frozen-initial"]
        assert [f["layer"] for f in frozen] == ["bn1", "bn2"]
        assert "iterations=94" in frozen[0]["message"] and "identity" in frozen[0]["message"]
        assert "Do not recalibrate" in frozen[0]["fix"] and not frozen[0]["fixable"]
        assert not {"bn-stats-initial", "model-untrained"} & {f["id"] for f in report["findings"]}
        assert report["training"]["rests_on"][0]["value"] == 94


def test_keras_momentum_one_names_the_momentum_read_from_the_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("h5py")
    from normlab.cli import main

    assert {v["momentum"] for v in KERAS_EXPECTED["momentum_one"]["bn"].values()} == {1.0}
    for suffix in (".keras", ".h5"):
        assert main(["doctor", str(KERAS / f"momentum_one{suffix}"), "--json"]) == 2
        report = json.loads(capsys.readouterr().out)
        initial = [f for f in report["findings"] if f["id"] == "bn-stats-initial"]
        assert [f["layer"] for f in initial] == ["bn1", "bn2"]
        assert all(f["evidence"]["cause"] == "momentum" for f in initial)
        assert "Keras momentum is 1.0" in initial[0]["message"]
        assert "iterations=94" in initial[0]["message"]


def test_keras_file_without_optimizer_state_falls_back_to_the_affine(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    from normlab.bn.evidence import keras_evidence
    from normlab.bn.keras_file import read_keras, read_keras_training

    copy = tmp_path / "no_optimizer.h5"
    copy.write_bytes((KERAS / "never_updated.h5").read_bytes())
    with h5py.File(copy, "r+") as h5:
        del h5["optimizer_weights"]
    training = read_keras_training(copy)
    assert training.iterations is None and keras_evidence(training) == []
    report = diagnose_layers(read_keras(copy).layers, evidence=keras_evidence(training))
    assert report.training["verdict"] == "trained"  # gamma and beta moved
    assert report.training["rests_on"][0]["category"] == "affine"


def test_nothing_says_whether_trained_is_a_warning_not_a_guess() -> None:
    from normlab.bn.graph import NormLayer

    layer = NormLayer(
        "bn",
        "batchnorm",
        "BatchNormalization",
        4,
        running_mean=torch.zeros(4, dtype=torch.float64),
        running_var=torch.ones(4, dtype=torch.float64),
        convention="onnx",
    )
    report = diagnose_layers([layer])
    assert report.ids() == {"training-unknown"} and report.exit_code == 1
    assert report.training["verdict"] == "unknown"
    assert diagnose_layers([layer], trained=True).ids() == {"bn-stats-initial"}
    assert diagnose_layers([layer], trained=False).ids() == {"model-untrained"}


def test_file_checks_plug_in_and_share_one_scan(tmp_path: Path) -> None:
    """The place scan.py's unsafe-content findings go: a 'file' check receives the target's
    path; two checks sharing ctx.memo scan the file once; file_findings runs them alone."""
    from normlab.bn.checks import CHECK_REGISTRY, check
    from normlab.bn.diagnose import file_findings
    from normlab.bn.findings import Finding

    scans: list[Path] = []

    def scan(path: Path) -> list[tuple[str, str]]:
        scans.append(path)
        return [("test-file-a", "found a"), ("test-file-b", "found b")]

    def make(fid: str):  # type: ignore[no-untyped-def]
        @check(fid, "error", fid, "a test file check", kind="file")
        def run(ctx):  # type: ignore[no-untyped-def]
            for got, message in ctx.memo("scan", lambda: scan(ctx.path)):
                if got == fid:
                    yield Finding(fid, "error", str(ctx.path), message, "none", fixable=False)

    make("test-file-a")
    make("test-file-b")
    target = tmp_path / "model.pt"
    target.write_bytes(b"")
    try:
        report = diagnose(trained_net(), dynamic=False, path=target)
        assert {"test-file-a", "test-file-b"} <= report.ids() and report.exit_code == 2
        assert report.checks[0] == "file" and scans == [target]
        assert {f.id for f in file_findings(target)} == {"test-file-a", "test-file-b"}
        assert "test-file-a" not in diagnose(trained_net(), dynamic=False).ids()  # no path
    finally:
        del CHECK_REGISTRY._items["test-file-a"], CHECK_REGISTRY._items["test-file-b"]


def test_default_init_trained_in_eval_mode_stays_an_error_from_the_tensors_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Seed 002 in PyTorch: default BN init (1, 0), 20 Adam steps with the model in eval mode,
    saved as a bare state_dict (no optimizer, no .grad): the gammas moved a little and alike in
    every layer, which must not read as a random initialisation."""
    from normlab.cli import main

    model = _repvgg_like()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()  # PyTorch's default: weight 1, bias 0, statistics 0 / 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    assert main(["doctor", str(tmp_path / "sd.pt"), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["training"]["verdict"] == "trained"
    assert report["training"]["rests_on"][0]["category"] == "affine"
    initial = [f for f in report["findings"] if f["id"] == "bn-stats-initial"]
    assert len(initial) == 6
    assert {f["evidence"]["cause"] for f in initial} == {"never-in-train-mode"}


def test_the_cause_the_layer_shows_is_named() -> None:
    """PyTorch momentum 0 (batches counted, statistics unmoved); a Keras file whose BN was
    called with training=False (no batch counter, gamma and beta trained)."""
    pytest.importorskip("h5py")
    from normlab.bn.evidence import keras_evidence
    from normlab.bn.keras_file import read_keras, read_keras_training

    report = diagnose(trained_net(momentum=0.0), dynamic=False)
    (f,) = report.by_id("bn-stats-initial")
    assert f.evidence["cause"] == "momentum" and "momentum=0" in f.message
    assert f.evidence["momentum"] == 0.0
    path = KERAS / "never_updated.keras"
    keras = diagnose_layers(
        read_keras(path).layers, evidence=keras_evidence(read_keras_training(path))
    )
    causes = {f.evidence["cause"] for f in keras.by_id("bn-stats-initial")}
    assert causes == {"frozen-statistics"}
    assert "frozen while the parameters trained" in keras.by_id("bn-stats-initial")[0].message
    assert "iterations=18" in keras.by_id("bn-stats-initial")[0].message
