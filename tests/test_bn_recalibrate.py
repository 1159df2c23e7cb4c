"""Precise BN: statistics equal closed-form numpy statistics, do not depend on the batch split,
and every mode, momentum and hook is restored, also on error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from normlab.bn import recalibrate_batchnorm
from normlab.errors import DataError
from normlab.norms import BatchRenorm2d, FrozenBatchNorm, GhostBatchNorm2d

torch.set_num_threads(1)


def data(n: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64) * 2.0 + 0.7


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.BatchNorm2d(3),  # sees the raw input: closed-form statistics are plain numpy
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4, momentum=None),  # cumulative average: momentum restored as None
        nn.ReLU(),
        nn.Dropout(0.5),  # must be off while recalibrating
        nn.Conv2d(4, 2, 1),
        nn.BatchNorm2d(2),
    ).double()


def batches(x: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], torch.zeros(len(x[i : i + size]))) for i in range(0, len(x), size)]


def test_first_layer_statistics_are_closed_form() -> None:
    x = data()
    model = net()
    result = recalibrate_batchnorm(model, batches(x, 16))
    arr = x.numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    bn = model[0]
    np.testing.assert_allclose(bn.running_mean.numpy(), arr.mean(1), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var.numpy(), arr.var(1, ddof=1), rtol=1e-12)
    population = result.population["0"]  # the probes' convention: biased variance
    np.testing.assert_allclose(population.mean.numpy(), arr.mean(1), rtol=1e-12)
    np.testing.assert_allclose(population.var.numpy(), arr.var(1, ddof=0), rtol=1e-12)
    assert population.count == 48 * 25
    assert result.layers == ["0", "2", "6"]
    assert result.batches == 3 and result.samples == 48
    assert result.values_per_channel["0"] == 48 * 25


def test_deeper_layer_statistics_are_closed_form() -> None:
    """The second BN sees conv(BN0 in train mode, i.e. normalised per batch): recompute that."""
    x = data()
    model = net()
    recalibrate_batchnorm(model, batches(x, 16))
    feats = []
    with torch.no_grad():
        for xb, _ in batches(x, 16):
            mu = xb.mean((0, 2, 3), keepdim=True)
            var = xb.var((0, 2, 3), unbiased=False, keepdim=True)
            bn0 = model[0]
            h = (xb - mu) / torch.sqrt(var + bn0.eps) * bn0.weight.view(1, -1, 1, 1)
            h = h + bn0.bias.view(1, -1, 1, 1)
            feats.append(model[1](h))
    arr = torch.cat(feats).numpy().transpose(1, 0, 2, 3).reshape(4, -1)
    np.testing.assert_allclose(model[2].running_mean.numpy(), arr.mean(1), rtol=1e-10)
    np.testing.assert_allclose(model[2].running_var.numpy(), arr.var(1, ddof=1), rtol=1e-10)


@pytest.mark.parametrize("sizes", [(48,), (24, 24), (8,) * 6, (20, 20, 8), (5, 13, 30)])
def test_first_layer_independent_of_batch_split(sizes: tuple[int, ...]) -> None:
    x = data()
    reference = net()
    recalibrate_batchnorm(reference, [x])
    model = net()
    chunks, start = [], 0
    for s in sizes:
        chunks.append(x[start : start + s])
        start += s
    recalibrate_batchnorm(model, chunks)
    torch.testing.assert_close(model[0].running_mean, reference[0].running_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(model[0].running_var, reference[0].running_var, rtol=1e-12, atol=0)


def test_equal_batches_average_equals_pooled_statistics() -> None:
    """Equal-size batches: the result is the plain average of per-batch means and E[x^2]."""
    x = data(40)
    model = net()
    recalibrate_batchnorm(model, x.split(10))
    per = [b.transpose(0, 1).reshape(3, -1) for b in x.split(10)]
    mean = torch.stack([p.mean(1) for p in per]).mean(0)
    ex2 = torch.stack([(p**2).mean(1) for p in per]).mean(0)
    n = 40 * 25
    torch.testing.assert_close(model[0].running_mean, mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        model[0].running_var, (ex2 - mean**2) * n / (n - 1), rtol=1e-10, atol=0
    )


def test_modes_momenta_and_hooks_restored() -> None:
    model = net()
    model.train()
    model[4].eval()  # a mixed state must come back exactly
    modes = [m.training for m in model.modules()]
    momenta = [getattr(m, "momentum", "-") for m in model.modules()]
    nbt = int(model[0].num_batches_tracked)
    recalibrate_batchnorm(model, batches(data(), 16), num_batches=2)
    assert [m.training for m in model.modules()] == modes
    assert [getattr(m, "momentum", "-") for m in model.modules()] == momenta
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert int(model[0].num_batches_tracked) == nbt + 2


class Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3, momentum=0.3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom")
        return self.bn(x)


def test_state_restored_on_error() -> None:
    model = Boom().eval()
    mean = model.bn.running_mean.clone()
    with pytest.raises(RuntimeError, match="boom"):
        recalibrate_batchnorm(model, [torch.randn(4, 3, 2, 2)] * 3)
    assert not model.training and not model.bn.training
    assert model.bn.momentum == 0.3
    assert not model.bn._forward_pre_hooks
    assert torch.equal(model.bn.running_mean, mean)  # nothing written on failure


def test_batchnorm_variants_frozen_and_untracked() -> None:
    model = nn.Sequential(
        BatchRenorm2d(3, warmup_steps=0),
        GhostBatchNorm2d(3, ghost_batch_size=4),
        FrozenBatchNorm(3),
        nn.BatchNorm2d(3, track_running_stats=False),
    )
    x = data(16).float()
    result = recalibrate_batchnorm(model, [x])
    assert result.layers == ["0", "1"]
    assert [name for name, _ in result.skipped] == ["3"]
    arr = x.numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(model[0].running_mean.numpy(), arr.mean(1), rtol=1e-5)
    assert torch.equal(model[2].running_var, torch.ones(3))  # frozen BN untouched


def test_bad_input() -> None:
    with pytest.raises(DataError, match="empty"):
        recalibrate_batchnorm(net(), [])
    with pytest.raises(DataError, match="more than 1 value"):
        recalibrate_batchnorm(nn.Sequential(nn.BatchNorm1d(3)), [torch.randn(1, 3)])
    with pytest.raises(DataError, match="model input"):
        recalibrate_batchnorm(net(), [object()])
