"""The probes as a plain PyTorch API (normlab.probes.Instruments), checked against oracles:
normlab's own fit on the same model state (same keys, same values), closed forms (buffers,
lr / ||w||^2 per parameter group), bit-identical model state, and every generator's state."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from _helpers import tiny_config
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from normlab.data import BatchLoader
from normlab.errors import ConfigError
from normlab.models import build_model
from normlab.probes import DEFAULT_PROBES, Instruments
from normlab.probes.rng import preserved_random_state, reachable_generators
from normlab.probes.stats import batchnorm_layers, norm_layers
from normlab.probes.weights import weight_layers
from normlab.train import Callback, fit

torchvision = pytest.importorskip("torchvision")

torch.set_num_threads(1)


def digits(n: int = 40, size: int = 32, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def resnet18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10)


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[bool], list]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return state, flags, grads


def assert_unchanged(model: nn.Module, snap) -> None:
    state, flags, grads = snap
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert [m.training for m in model.modules()] == flags
    for p, g in zip(model.parameters(), grads, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def expected_keys(model: nn.Module, *, invariant: set[str], first: str, val: bool) -> set[str]:
    """The keys the five probes write for ``model`` (from the module docstrings' table)."""
    keys: set[str] = set()
    for name in weight_layers(model):
        keys |= {f"weights/norm/{name}", f"weights/angle/{name}"}
        if name in invariant:
            keys.add(f"weights/eff_lr/{name}")
    keys.add(f"weights/first/{first}")
    for name, m in batchnorm_layers(model).items():
        stats = ["running_mean", "running_var", "num_batches_tracked", "init_fraction"]
        stats += ["gamma", "beta"] if m.affine else []
        stats += ["shift/mean", "shift/var"]
        keys |= {f"bn/{s}/{name}" for s in stats}
    for name in norm_layers(model):
        keys |= {f"acts/{s}/{name}" for s in ("mean", "std", "skew", "zeros")}
    keys |= {f"gap/{m}/{s}" for m in ("train", "eval") for s in ("loss", "acc")}
    if val:
        keys |= {f"shift/val/{s}_{w}" for s in ("acc", "loss") for w in ("precise", "running")}
    return keys


# --------------------------------------------------------------------------------------------
# the same keys and values as normlab's fit


class ApiBesideFit(Callback):
    """Attaches Instruments to fit's own model (same images, as tensors) and measures it right
    after fit's probes did, so both see the very same model state."""

    def __init__(self, probes: list[str]) -> None:
        self.specs = probes
        self.rows: list[dict] = []
        self.fit_rows: list[dict] = []

    def on_fit_start(self, state) -> None:
        d = state.data
        mean, std = d.mean, d.std

        def tensors(images, labels):
            loader = BatchLoader.evaluation(images, labels, len(labels), mean=mean, std=std)
            return next(iter(loader))

        self.api = Instruments(
            state.model,
            self.specs,
            data=tensors(d.train_images, d.train_labels),
            val=tensors(d.val_images, d.val_labels),
            optimizer=state.optimizer,
            seed=state.config.seed,
            batch_size=state.config.batch_size,
        )

    def on_epoch_end(self, state, epoch, row):
        self.fit_rows.append(dict(row))
        self.rows.append(self.api.measure(epoch))
        self.lr_now = state.optimizer.param_groups[0]["lr"]
        return {}


@pytest.mark.slow
def test_instruments_give_fit_s_keys_and_values_on_the_same_model(tmp_path):
    probes = ["weights:k=5", "bn", "shift:val_samples=8:inference=true", "acts", "gap"]
    spy = ApiBesideFit(probes)
    cfg = tiny_config(
        probes=probes,
        epochs=2,
        **{"runtime.precision": "fp32", "runtime.memory_format": "contiguous"},
    )
    fit(cfg, out=tmp_path / "run", callbacks=[spy], verbose=False)
    for api, row in zip(spy.rows, spy.fit_rows, strict=True):
        fit_keys = {k for k in row if k.split("/")[0] in ("weights", "bn", "shift", "acts", "gap")}
        assert set(api) == fit_keys
        for key, value in api.items():
            if key.startswith("weights/eff_lr/"):
                continue  # fit: the lr of the epoch's last step; here: the optimizer's lr now
            if isinstance(value, list):
                assert value == row[key], key
            elif math.isnan(value):
                assert math.isnan(row[key]), key
            else:
                assert value == pytest.approx(row[key], rel=1e-6, abs=1e-9), key
    last = spy.rows[-1]
    for key in (k for k in last if k.startswith("weights/eff_lr/")):
        layer = key.removeprefix("weights/eff_lr/")
        norm = last[f"weights/norm/{layer}"]
        assert last[key] == pytest.approx(spy.lr_now / norm**2, rel=1e-12)


def test_instruments_on_a_torchvision_resnet18_give_every_key_and_closed_form_values():
    model = resnet18()
    x, y = digits()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for p in model.parameters() if all(p is not q for q in decay)]
    opt = torch.optim.SGD([{"params": decay, "lr": 0.1}, {"params": rest, "lr": 0.02}])
    api = Instruments(model, data=(x, y), val=(x[:12], y[:12]), optimizer=opt, batch_size=8)
    out = api.measure()
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(api.probes[0].invariant_layers) == convs  # every conv feeds a BN, fc none
    assert set(out) == expected_keys(model, invariant=convs, first="conv1", val=True)
    mods = dict(model.named_modules())
    for name in batchnorm_layers(model):
        bn = mods[name]
        assert out[f"bn/running_mean/{name}"] == pytest.approx(
            float(bn.running_mean.double().mean())
        )
        assert out[f"bn/running_var/{name}"] == pytest.approx(float(bn.running_var.double().mean()))
        assert out[f"bn/num_batches_tracked/{name}"] == 0
        assert out[f"bn/init_fraction/{name}"] == 1.0
    for name in convs:
        w = mods[name].weight.detach().double()
        assert out[f"weights/norm/{name}"] == pytest.approx(float(w.norm()), rel=1e-12)
        assert out[f"weights/eff_lr/{name}"] == pytest.approx(0.1 / float(w.norm()) ** 2, rel=1e-12)
        assert out[f"weights/angle/{name}"] == 0.0  # nothing trained since attaching
    assert out["weights/first/conv1"] == pytest.approx(mods["conv1"].weight.flatten()[:10].tolist())


def test_instruments_key_set_matches_on_a_normlab_model_and_without_optional_inputs():
    model = build_model("resnet20", 4, input_size=16)
    x, y = digits(32, 16, 4)
    api = Instruments(model, data=DataLoader(TensorDataset(x, y), batch_size=8))
    out = api.measure(1)
    # no optimizer: no eff_lr keys; no val: no shift/val keys; everything else as fit writes
    assert set(out) == expected_keys(model, invariant=set(), first="conv1", val=False)
    assert Instruments(model, ["bn"]).measure() == {
        k: v for k, v in out.items() if k.startswith("bn/") and "/shift/" not in k
    }


# --------------------------------------------------------------------------------------------
# guarantees: the model and every generator are left as they were


class DrawsInEval(nn.Module):
    """A model that draws a random number at every forward, in any mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.bn(self.conv(x)) + 0.0 * torch.rand(())
        return self.fc(x.mean((2, 3)))


def timm_mobilenet() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)  # stochastic depth (drop_path) draws in training mode
    return timm.create_model("mobilenetv3_small_100", num_classes=3, drop_path_rate=0.2)


@pytest.mark.parametrize("make", [resnet18, timm_mobilenet, lambda: DrawsInEval()])
def test_attach_and_measure_leave_the_model_and_every_generator_as_they_were(make):
    model = make()
    x, y = digits(24, 16, 3)
    # a training-looking state: some grads, BN statistics moved, one submodule in eval mode
    model.train()
    nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
    next(iter(model.children())).eval()
    loader_gen = torch.Generator().manual_seed(5)
    sampler_gen = torch.Generator().manual_seed(6)
    data = DataLoader(
        TensorDataset(x, y),
        batch_size=6,
        sampler=RandomSampler(range(24), generator=sampler_gen),
        generator=loader_gen,
    )
    val = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True)  # seeds from the global
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    before = snapshot(model)
    states = (
        torch.get_rng_state(),
        np.random.get_state()[1].copy(),
        random.getstate(),
        loader_gen.get_state(),
        sampler_gen.get_state(),
    )
    api = Instruments(model, data=data, val=val, optimizer=opt)
    out1, out2 = api.measure(), api.measure()
    assert_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]
    assert torch.equal(loader_gen.get_state(), states[3])
    assert torch.equal(sampler_gen.get_state(), states[4])
    # the fixed samples are the same at every call: the same model state gives the same values
    assert out1.keys() == out2.keys()
    for key in out1:
        assert out1[key] == out2[key] or (math.isnan(out1[key]) and math.isnan(out2[key])), key


@pytest.mark.slow
def test_a_loop_with_instruments_trains_exactly_as_without():
    def train(probed: bool) -> dict[str, torch.Tensor]:
        model = resnet18(seed=3)
        model.fc = nn.Sequential(nn.Dropout(0.5), model.fc)  # draws from the global generator
        x, y = digits(24, 16)
        torch.manual_seed(0)
        data = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        api = Instruments(model, data=data, optimizer=opt) if probed else None
        for epoch in (1, 2):
            model.train()
            for xb, yb in data:
                opt.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
            if api is not None:
                api.measure(epoch)
        return {k: v.clone() for k, v in model.state_dict().items()}

    with_probes, without = train(True), train(False)
    for key, value in without.items():
        assert torch.equal(with_probes[key], value), key


def test_preserved_random_state_restores_generators_of_every_kind():
    def generators() -> list:
        return [
            torch.Generator().manual_seed(1),
            np.random.default_rng(2),
            np.random.RandomState(3),
            random.Random(4),
        ]

    def draw(gens: list) -> list[float]:
        return [
            torch.rand(1, generator=gens[0]).item(),
            float(gens[1].random()),
            float(gens[2].random_sample()),
            gens[3].random(),
        ]

    reference = draw(generators())
    gens = generators()
    with preserved_random_state(*gens):
        draw(gens)
        torch.rand(3), np.random.rand(), random.random()
    assert draw(gens) == reference
    loader = DataLoader(list(range(4)), shuffle=True, generator=gens[0])
    assert reachable_generators(loader) == [gens[0]]


# --------------------------------------------------------------------------------------------
# samples: which images, and what is refused


def test_samples_of_tensors_come_from_the_whole_set_and_of_a_loader_from_its_first_images():
    x, y = digits(64, 8, 4)
    x += torch.arange(64).view(64, 1, 1, 1) * 1000  # image i's values lie near 1000 i

    def seen(api: Instruments) -> set[int]:
        probe = api.probes[0]
        return {round(float(xb[j].mean()) / 1000) for xb, _ in probe._train for j in range(len(xb))}

    model = build_model("resnet20", 4, input_size=8)
    whole = seen(Instruments(model, ["acts:batches=2"], data=(x, y), batch_size=4))
    assert len(whole) == 8 and max(whole) >= 8  # 8 of all 64
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    prefix = seen(Instruments(model, ["acts:batches=2"], data=loader))
    assert prefix == set(range(8))  # the loader's first 8 images, in a seeded order


def test_a_probe_s_sample_does_not_depend_on_the_other_probes():
    model = resnet18()
    x, y = digits(40, 16)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    alone = Instruments(model, ["shift:batches=3"], data=loader, val=loader).measure()
    together = Instruments(
        model, ["weights", "gap", "shift:batches=3", "acts"], data=loader, val=loader
    ).measure()
    assert alone == {k: together[k] for k in alone}


def test_bad_input_is_refused_with_a_message_naming_what_is_wrong():
    model = build_model("resnet20", 4, input_size=8)
    x, y = digits(16, 8, 4)
    pairs = [(x[:8], y[:8]), (x[8:], y[8:])]
    cases = [
        (dict(data=iter(pairs)), "one-shot iterator"),
        (
            dict(data=DataLoader(TensorDataset(x, y), num_workers=1, persistent_workers=True)),
            "persistent workers",
        ),
        (dict(data=[{"x": x, "y": y}]), "batch 0 is a dict; expected \\(x, y\\)"),
        (dict(data=[(x, y.float())]), "labels of dtype torch.float32"),
        (dict(data=[(x, y[:3])]), "expected x \\[B, ...\\] and class labels y \\[B\\]"),
        (dict(data=[(x[:8], y[:8]), (x[:8, :, :4], y[:8])]), "batch 1 has inputs of shape"),
        (dict(data=(x, y)), "given as tensors: pass batch_size="),
        (dict(data=3), "must be an iterable of \\(x, y\\) batches"),
        (dict(), "weights, shift, acts, gap forward samples"),
        (dict(data=pairs, optimizer="sgd"), "optimizer must be a torch.optim.Optimizer"),
        (dict(data=pairs, batch_size=0), "batch_size must be an integer >= 1"),
        (dict(data=[]), "yields no batch"),
    ]
    assert Instruments(model, ["bn", "gap"], data=pairs).batch_size == 8  # the first batch's
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            Instruments(model, DEFAULT_PROBES, **kwargs)
    with pytest.raises(ConfigError, match="unknown probe 'nope'"):
        Instruments(model, ["nope"], data=pairs)
    with pytest.raises(ConfigError, match=r"must be a torch nn\.Module"):
        Instruments("resnet", data=pairs)  # type: ignore[arg-type]
