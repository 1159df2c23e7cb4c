"""Probes: oracle tests of the math (closed forms, numpy/scipy), state hygiene, fit integration."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from _helpers import InterruptAt, stable, tiny_config
from torch import nn

from normlab.errors import ConfigError
from normlab.models import build_model
from normlab.probes import PROBES, ShiftProbe, build_probes
from normlab.probes.acts import activation_summary
from normlab.probes.bn import bn_summaries
from normlab.probes.gap import train_eval_gap
from normlab.probes.stats import (
    ChannelMoments,
    batch_statistics_mode,
    estimation_shift,
    init_fraction,
    layer_input_moments,
    load_population_statistics,
    norm_layers,
    population_statistics,
    substituted_statistics,
)
from normlab.probes.weights import angle_between, scale_invariant_layers
from normlab.train import Callback, fit

torch.set_num_threads(1)

ALL = ["weights", "bn", "shift", "acts", "gap"]
TRAIN_KEYS = ("epoch", "train/loss", "train/acc", "val/loss", "val/acc", "lr")


def small_net(seed: int = 0) -> nn.Module:
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> linear: three layers, two BNs."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1, bias=False),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshot[key]), key


def no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )


# --------------------------------------------------------------------------------------------
# weights: scale invariance and the effective learning rate


def test_conv_followed_by_bn_is_scale_invariant_and_its_gradient_scales_by_one_over_a():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, bias=False).double()
    bn = nn.BatchNorm2d(4, eps=1e-15).double().train()  # eps breaks it by O(eps / var)
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    target = torch.randn(8, 4, 4, 4, dtype=torch.float64)
    a = 3.7

    def output_and_grad(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        w = (conv.weight.detach() * scale).requires_grad_(True)
        out = bn(nn.functional.conv2d(x, w))
        ((out - target) ** 2).sum().backward()
        assert w.grad is not None
        return out.detach(), w.grad

    out1, grad1 = output_and_grad(1.0)
    out_a, grad_a = output_and_grad(a)
    torch.testing.assert_close(out_a, out1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad_a, grad1 / a, rtol=1e-8, atol=1e-12)
    # hence one SGD step of lr on w turns it as a step of lr / ||w||^2 on w / ||w|| does
    lr = 0.1
    w = conv.weight.detach()
    u = w / w.norm()
    step_w = w - lr * grad1
    step_u = u - (lr / w.norm() ** 2) * (grad1 * w.norm())  # grad at u is ||w|| * grad at w
    torch.testing.assert_close(step_w / step_w.norm(), step_u / step_u.norm())


def test_scale_invariant_layers_are_the_ones_feeding_a_norm():
    pre = build_model("resnet20", 4, input_size=16)
    found = scale_invariant_layers(pre, torch.zeros(2, 3, 16, 16))
    assert found["conv1"] == "bn1"
    assert found["layer1.0.conv1"] == "layer1.0.bn1" and found["layer3.2.conv2"] == "layer3.2.bn2"
    assert "fc" not in found and len(found) == 19
    assert no_hooks(pre)
    # post placement: conv -> ReLU -> BN; 'auto' gives those convs a bias, which breaks the
    # invariance; without bias the ReLU (positively homogeneous) keeps it
    post = build_model("resnet20", 4, placement="post", input_size=16)
    found = scale_invariant_layers(post, torch.zeros(2, 3, 16, 16))
    assert "conv1" not in found and "layer1.0.conv1" not in found
    assert found["layer1.0.conv2"] == "layer1.0.bn2"  # no activation between: still conv -> BN
    post_nobias = build_model("resnet20", 4, placement="post", conv_bias=False, input_size=16)
    assert scale_invariant_layers(post_nobias, torch.zeros(2, 3, 16, 16))["conv1"] == "bn1"
    # GroupNorm (XBN blocks) makes the conv before it invariant too; no norm: nothing is
    xbn = build_model("resnet20", 4, input_size=16, xbn=True)
    assert scale_invariant_layers(xbn, torch.zeros(2, 3, 16, 16))["layer1.0.conv1"] == (
        "layer1.0.bn1"
    )
    plain = build_model("resnet20", 4, norm="none", input_size=16)
    assert scale_invariant_layers(plain, torch.zeros(2, 3, 16, 16)) == {}
    mlp = build_model("mlp", 4, input_size=4, hidden=(8,))
    assert scale_invariant_layers(mlp, torch.zeros(2, 3, 4, 4)) == {"hidden.0.0": "hidden.0.1"}


def test_angle_between_is_accurate_also_for_tiny_angles():
    u = torch.tensor([1.0, 0.0, 0.0])
    for theta in (1e-9, 1e-4, 0.3, 2.0, math.pi):
        v = torch.tensor([math.cos(theta), math.sin(theta), 0.0], dtype=torch.float64) * 5
        assert angle_between(u, v) == pytest.approx(theta, rel=1e-9)


# --------------------------------------------------------------------------------------------
# bn: initial-value fraction


@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.5])
def test_init_fraction_is_one_minus_m_to_the_k_as_a_real_bn_layer_shows(momentum):
    for k in (0, 1, 7, 100):
        assert init_fraction(momentum, k) == pytest.approx((1 - momentum) ** k, rel=1e-12)
    # a BN layer whose running mean starts at r0 and sees k batches of exactly zero mean keeps
    # (1 - m)^k of r0, in PyTorch's convention running = (1 - m) running + m batch
    bn = nn.BatchNorm1d(3, momentum=momentum).double().train()
    r0 = torch.tensor([5.0, -2.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.copy_(r0)
    g = torch.Generator().manual_seed(0)
    k = 9
    for _ in range(k):
        half = torch.randn(4, 3, generator=g, dtype=torch.float64)
        bn(torch.cat([half, -half]))  # batch mean exactly 0
    torch.testing.assert_close(
        bn.running_mean / r0, torch.full((3,), (1 - momentum) ** k, dtype=torch.float64)
    )
    summary = bn_summaries(nn.Sequential(bn))
    assert summary["bn/num_batches_tracked/0"] == k
    assert summary["bn/init_fraction/0"] == pytest.approx((1 - momentum) ** k)


def test_init_fraction_of_cumulative_average_and_bad_input():
    assert init_fraction(None, 0) == 1.0 and init_fraction(None, 3) == 0.0
    with pytest.raises(ValueError):
        init_fraction(0.1, -1)


# --------------------------------------------------------------------------------------------
# moments against numpy / scipy


def fixed_activations() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 4, 5, 5, generator=g, dtype=torch.float64)
    x[:, 1] = torch.relu(x[:, 1])  # skewed, with exact zeros
    x[:, 2] = torch.exp(x[:, 2])  # strongly skewed
    x[:, 3] = 0.0  # a dead channel: no skewness
    return x


def test_channel_moments_equal_numpy_and_scipy_whatever_the_batch_split():
    x = fixed_activations()
    ref = x.transpose(0, 1).reshape(4, -1).numpy()
    for split in ([10], [5, 5], [1, 3, 6], [2] * 5):
        m = ChannelMoments(third=True, zeros=True)
        for chunk in torch.split(x, split):
            m.update(chunk)
        assert m.count == 10 * 25
        np.testing.assert_allclose(m.mean.numpy(), ref.mean(1), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(m.var.numpy(), ref.var(1), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(m.zeros.numpy(), (ref == 0).mean(1))
        skew = m.skew.numpy()
        np.testing.assert_allclose(skew[:3], scipy.stats.skew(ref[:3], axis=1), rtol=1e-10)
        assert math.isnan(skew[3])
    summary = activation_summary(m)
    assert summary["mean"] == pytest.approx(ref.mean())
    assert summary["std"] == pytest.approx(ref.std(1).mean())
    assert summary["skew"] == pytest.approx(scipy.stats.skew(ref[:3], axis=1).mean())
    assert summary["zeros"] == pytest.approx((ref == 0).mean())


def test_norm_input_moments_are_those_of_the_relu_output_before_a_post_placed_bn():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4)).double()
    xs = [torch.randn(6, 3, 5, 5, dtype=torch.float64) for _ in range(3)]
    moments = layer_input_moments(model, xs, norm_layers(model), third=True, zeros=True)
    with torch.no_grad():
        seen = torch.cat([torch.relu(model[0](x)) for x in xs])
    ref = seen.transpose(0, 1).reshape(4, -1).numpy()
    m = moments["2"]
    np.testing.assert_allclose(m.mean.numpy(), ref.mean(1), rtol=1e-10)
    np.testing.assert_allclose(m.skew.numpy(), scipy.stats.skew(ref, axis=1), rtol=1e-8)
    np.testing.assert_allclose(m.zeros.numpy(), (ref == 0).mean(1))
    assert (m.skew > 0).all()  # ReLU output is right-skewed (seed 003)


# --------------------------------------------------------------------------------------------
# population statistics and estimation shift


def test_population_statistics_of_the_first_bn_are_the_data_statistics_for_any_split():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)).double()
    data = torch.randn(32, 3, 4, 4, dtype=torch.float64) * 2 + 1
    ref = data.transpose(0, 1).reshape(3, -1)
    for bs in (4, 8, 32):
        stats = population_statistics(model, torch.split(data, bs))
        assert list(stats) == ["0", "2"]  # execution order
        first = stats["0"]
        assert first.count == 32 * 16
        torch.testing.assert_close(first.mean, ref.mean(1))
        torch.testing.assert_close(first.var, ref.var(1, unbiased=False))


@pytest.mark.parametrize("norm", ["bn", "brn", "ghost_bn"])
def test_population_statistics_read_from_bn_buffers_equal_those_of_the_layer_inputs(norm):
    torch.manual_seed(0)
    model = build_model("resnet20", 4, norm=norm, input_size=8, ghost_batch_size=4)
    momenta = [m.momentum for m in model.modules() if hasattr(m, "momentum")]
    batches = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    fast = population_statistics(model, batches)
    bns = {n: m for n, m in model.named_modules() if n in fast}
    hooked = layer_input_moments(model, batches, bns)  # statistics of the inputs themselves
    assert list(fast) == list(hooked) and len(fast) == 19
    for name, pop in fast.items():
        assert pop.count == hooked[name].count
        torch.testing.assert_close(pop.mean, hooked[name].mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pop.var, hooked[name].var, rtol=1e-4, atol=1e-5)
    assert [m.momentum for m in model.modules() if hasattr(m, "momentum")] == momenta
    assert no_hooks(model)


def test_estimation_shift_is_zero_after_recalibration_and_follows_a_known_perturbation():
    model = small_net().train()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 6, 6, generator=g) for _ in range(4)]
    for x in batches:  # a few training-mode passes: running stats partly updated
        model(x)
    before = population_statistics(model, batches)
    shifts = [
        estimation_shift(m.running_mean, m.running_var, before[n], m.eps)
        for n, m in (("1", model[1]), ("4", model[4]))
    ]
    assert all(s[1] > 0.5 for s in shifts)  # the EMA is far from the population statistics

    load_population_statistics(model, before)
    after = population_statistics(model, batches)  # the same data again
    for name in ("1", "4"):
        bn = model[int(name)]
        mean_shift, var_shift = estimation_shift(
            bn.running_mean, bn.running_var, after[name], bn.eps
        )
        assert mean_shift < 1e-6 and var_shift < 1e-6

    # perturb layer 4 by a known amount: delta standard deviations, variance (+eps) times k
    bn, pop = model[4], after["4"]
    delta, k = 0.3, 2.5
    sd = (pop.var + bn.eps).sqrt()
    signs = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.copy_(pop.mean + signs * delta * sd)
        bn.running_var.copy_(k * (pop.var + bn.eps) - bn.eps)
    mean_shift, var_shift = estimation_shift(bn.running_mean, bn.running_var, pop, bn.eps)
    assert mean_shift == pytest.approx(delta, rel=1e-5)
    assert var_shift == pytest.approx(math.log(k), rel=1e-5)
    # and the closed form for an arbitrary perturbation
    g2 = torch.Generator().manual_seed(5)
    rm = pop.mean + torch.randn(5, generator=g2, dtype=torch.float64)
    rv = pop.var * torch.rand(5, generator=g2, dtype=torch.float64) * 3 + 0.01
    expected_mean = np.mean(
        np.abs(rm.numpy() - pop.mean.numpy()) / np.sqrt(pop.var.numpy() + bn.eps)
    )
    expected_var = np.mean(np.abs(np.log(rv.numpy() + bn.eps) - np.log(pop.var.numpy() + bn.eps)))
    got = estimation_shift(rm, rv, pop, bn.eps)
    assert got == pytest.approx((expected_mean, expected_var), rel=1e-9)


def test_substituted_statistics_restore_the_running_ones_bit_for_bit():
    model = small_net().train()
    x = torch.randn(8, 3, 6, 6)
    model(x)
    snapshot = state_snapshot(model)
    stats = population_statistics(model, [x])
    with pytest.raises(RuntimeError, match="boom"), substituted_statistics(model, stats):
        torch.testing.assert_close(model[1].running_mean, stats["1"].mean.float())
        raise RuntimeError("boom")
    assert_same_state(model, snapshot)


def test_train_eval_gap_closes_when_running_statistics_are_the_batch_statistics():
    model = small_net().train()
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 3, (16,))
    model(x)
    snapshot = state_snapshot(model)
    gap = train_eval_gap(model, x, y)
    assert gap["train/loss"] != pytest.approx(gap["eval/loss"], abs=1e-4)
    assert_same_state(model, snapshot) and model.training
    # with every BN's running statistics equal to this batch's (biased) statistics, eval mode
    # computes exactly what training mode computes on this batch
    load_population_statistics(model, population_statistics(model, [x]))
    gap = train_eval_gap(model, x, y)
    assert gap["eval/loss"] == pytest.approx(gap["train/loss"], abs=1e-5)
    assert gap["eval/acc"] == gap["train/acc"]


# --------------------------------------------------------------------------------------------
# hygiene: hooks, modes and buffers after an exception


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom inside the forward pass")


def test_hooks_modes_and_buffers_are_restored_after_an_exception_inside_a_probe():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), Boom())
    model.train()
    model[2].eval()  # an unusual mix of flags, to check that each is restored as it was
    model[1].momentum = None  # cumulative average
    flags = [m.training for m in model.modules()]
    snapshot = state_snapshot(model)
    x, y = torch.randn(4, 3, 5, 5), torch.zeros(4, dtype=torch.long)
    calls = [
        lambda: population_statistics(model, [x]),
        lambda: population_statistics(model, [x], normalize_with="running"),
        lambda: layer_input_moments(model, [x], norm_layers(model), third=True, zeros=True),
        lambda: scale_invariant_layers(model, x),
        lambda: train_eval_gap(model, x, y),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="boom"):
            call()
        assert no_hooks(model)
        assert [m.training for m in model.modules()] == flags
        assert model[1].momentum is None
        assert_same_state(model, snapshot)


def test_batch_statistics_mode_runs_bn_in_training_mode_and_dropout_off():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    with batch_statistics_mode(model) as restore:
        assert model[1].training and not model[2].training and not model[0].training
        model(torch.randn(8, 4))
        assert int(model[1].num_batches_tracked) == 1
        restore()
        assert int(model[1].num_batches_tracked) == 0
    assert all(m.training for m in model.modules())


# --------------------------------------------------------------------------------------------
# build_probes


def test_build_probes_parses_options_and_names_bad_input():
    probes = build_probes(["weights", "shift:batches=8:val_samples=0:inference=true", "acts"])
    assert [p.name for p in probes] == ["weights", "shift", "acts"]
    assert probes[1].options == {"batches": 8, "images": 0, "val_samples": 0, "inference": True}
    assert isinstance(probes[1], ShiftProbe)
    assert PROBES.names() == ["acts", "bn", "gap", "shift", "weights"]
    with pytest.raises(ConfigError, match=r"unknown probe 'nope'.*acts, bn, gap, shift, weights"):
        build_probes(["nope"])
    with pytest.raises(ConfigError, match=r"probe 'shift' has no option 'size'.*batches"):
        build_probes(["shift:size=3"])
    with pytest.raises(ConfigError, match="option batches of probe 'shift' must be an integer"):
        build_probes(["shift:batches=many"])
    with pytest.raises(ConfigError, match="must be >= 1"):
        build_probes(["shift:batches=0"])
    with pytest.raises(ConfigError, match="given twice"):
        build_probes(["bn", "bn"])
    with pytest.raises(ConfigError, match="NAME:KEY=VALUE"):
        build_probes(["shift:8"])
    with pytest.raises(ConfigError, match="mode of probe 'acts' must be train or eval"):
        build_probes(["acts:mode=test"])


# --------------------------------------------------------------------------------------------
# fit integration


@pytest.fixture(scope="module")
def runs_with_and_without_probes(tmp_path_factory):
    root = tmp_path_factory.mktemp("probes")
    probes = ["weights:k=5", "bn", "shift:inference=true:val_samples=8", "acts", "gap"]
    with_probes = fit(tiny_config(probes=probes), out=root / "with", verbose=False)
    without = fit(tiny_config(), out=root / "without", verbose=False)
    return with_probes, without


def test_fit_with_all_probes_writes_every_key_to_metrics_jsonl(runs_with_and_without_probes):
    result, _ = runs_with_and_without_probes
    rows = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in rows] == [1, 2]
    bns = [n for n, m in result.model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for row in rows:
        for layer in ("conv1", "layer2.1.conv2", "fc"):
            assert row[f"weights/norm/{layer}"] > 0
            assert 0 <= row[f"weights/angle/{layer}"] <= math.pi
        assert "weights/eff_lr/fc" not in row  # fc feeds no norm
        assert len(row["weights/first/conv1"]) == 5
        for layer in bns:
            for key in (
                "running_mean",
                "running_var",
                "gamma",
                "beta",
                "num_batches_tracked",
                "init_fraction",
                "shift/mean",
                "shift/var",
                "inference_shift/mean",
                "inference_shift/var",
            ):
                assert isinstance(row[f"bn/{key}/{layer}"], float | int), (key, layer)
            for stat in ("mean", "std", "skew", "zeros"):
                assert f"acts/{stat}/{layer}" in row
        for key in ("acc_precise", "loss_precise", "acc_running", "loss_running"):
            assert f"shift/val/{key}" in row
        for key in ("train/loss", "train/acc", "eval/loss", "eval/acc"):
            assert f"gap/{key}" in row
    # shift keys come in execution order (depth)
    assert [k.split("/", 3)[3] for k in rows[-1] if k.startswith("bn/shift/mean/")] == bns
    # the effective learning rate is lr / ||w||^2 of the final weights
    final = dict(result.model.named_modules())
    last = rows[-1]
    for layer in ("conv1", "layer3.2.conv2"):
        norm = float(final[layer].weight.detach().double().norm())
        assert last[f"weights/norm/{layer}"] == pytest.approx(norm, rel=1e-12)
        assert last[f"weights/eff_lr/{layer}"] == pytest.approx(last["lr"] / norm**2, rel=1e-12)
    assert last["weights/first/conv1"] == pytest.approx(
        final["conv1"].weight.detach().flatten()[:5].tolist()
    )
    steps = 2 * (48 // 16)
    assert last["bn/num_batches_tracked/bn1"] == steps
    assert last["bn/init_fraction/bn1"] == pytest.approx(0.9**steps)


def test_probes_on_or_off_train_exactly_the_same(runs_with_and_without_probes):
    with_probes, without = runs_with_and_without_probes
    for a, b in zip(with_probes.metrics, without.metrics, strict=True):
        assert {k: a[k] for k in TRAIN_KEYS} == {k: b[k] for k in TRAIN_KEYS}
    assert_same_state(with_probes.model, state_snapshot(without.model))
    assert no_hooks(with_probes.model)


def test_resume_with_probes_gives_the_same_probe_metrics(tmp_path):
    cfg = tiny_config(probes=ALL, epochs=3)
    full = fit(cfg, out=tmp_path / "full", verbose=False)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, out=tmp_path / "cut", callbacks=[InterruptAt(epoch=2, step=1)], verbose=False)
    resumed = fit(None, out=tmp_path / "cut", resume=True, verbose=False)

    assert stable(resumed.metrics) == stable(full.metrics)


def test_probe_figures_draw_every_figure_for_probed_runs(runs_with_and_without_probes):
    pytest.importorskip("matplotlib")
    from normlab.probes.plots import ProbeRun, layer_order, probe_figures

    with_probes, without = runs_with_and_without_probes
    runs = [
        ProbeRun("bn", 0, with_probes.metrics),
        ProbeRun("bn", 1, copy.deepcopy(with_probes.metrics)),
        ProbeRun("plain", 0, without.metrics),  # no probe keys: contributes nothing
    ]
    figures = dict(probe_figures(runs))
    assert list(figures) == [
        "weights",
        "estimation_shift",
        "recalibration",
        "activations",
        "train_eval_gap",
        "bn_init_fraction",
    ]
    for name, fig in figures.items():
        assert fig._suptitle is not None and fig._suptitle.get_text(), name
        for ax in fig.axes:
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), name
            assert ax.lines, name
            assert ax.get_legend() is not None, name
    assert probe_figures([ProbeRun("plain", 0, without.metrics)]) == []
    assert probe_figures([]) == []
    # layers missing from a variant keep their place in the merged order
    assert layer_order([["a", "b", "c"], ["a", "x", "c"], ["y", "a"]]) == ["y", "a", "x", "b", "c"]


def test_probe_figures_draw_only_what_is_recorded_and_tolerate_nulls():
    pytest.importorskip("matplotlib")
    from normlab.probes.plots import ProbeRun, probe_figures

    rows = [
        {
            "epoch": e,
            "gap/train/acc": 0.5 + e / 10,
            "gap/eval/acc": None,
            "gap/train/loss": 1.0,
            "gap/eval/loss": 2.0 / e,
            "acts/skew/bn1": None,
            "acts/zeros/bn1": 0.5,
        }
        for e in (1, 2, 3)
    ]
    figures = dict(probe_figures([ProbeRun("a", 0, rows), ProbeRun("a", 1, rows[:2])]))
    assert list(figures) == ["activations", "train_eval_gap"]
    gap = figures["train_eval_gap"]
    acc_lines = {line.get_label(): list(line.get_ydata()) for line in gap.axes[0].lines}
    assert acc_lines["a train mode"] == pytest.approx([0.6, 0.7, 0.8])
    assert "a eval mode" not in acc_lines  # every value null: nothing to draw


@pytest.mark.parametrize("batch_size, images, expected", [(16, 0, 48), (4, 0, 32), (4, 30, 28)])
def test_shift_and_acts_sample_batches_or_a_fixed_number_of_images(
    tmp_path, batch_size, images, expected
):
    """``batches`` x batch size images by default (capped by the split), or ``images`` cut to
    whole batches; each pass covers exactly that sample, forwarded in training-size batches."""
    seen: dict[str, list[int]] = {}

    class Spy(Callback):
        def on_fit_start(self, state) -> None:
            for probe in state_probes:
                seen[probe.name] = [int(x.shape[0]) for x, _ in probe._train]

    state_probes = build_probes([f"shift:images={images}", f"acts:batches=8:images={images}"])
    cfg = tiny_config(batch_size=batch_size, epochs=1)
    fit(cfg, out=tmp_path / "r", callbacks=[*state_probes, Spy()], verbose=False)
    for name in ("shift", "acts"):
        assert sum(seen[name]) == expected
        assert set(seen[name]) == {batch_size}
