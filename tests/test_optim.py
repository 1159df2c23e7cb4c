"""Optimizer parameter groups, schedules and the Keras-style L2 penalty."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normlab.config import OptimConfig
from normlab.engine.optim import (
    L2Penalty,
    build_optimizer,
    build_scheduler,
    lr_factor,
    split_parameters,
)


def test_split_parameters_by_module_kind():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Linear(4, 2))
    kinds = split_parameters(net)
    assert [tuple(p.shape) for p in kinds.kernels] == [(4, 3, 3, 3), (2, 4)]
    assert [tuple(p.shape) for p in kinds.biases] == [(4,), (2,)]
    assert len(kinds.norm) == 4 and kinds.other == []


def test_weight_decay_groups():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt = build_optimizer(net, OptimConfig(weight_decay=0.1, weight_decay_norm=False))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert len(opt.param_groups[1]["params"]) == 3  # conv bias, gamma, beta
    opt = build_optimizer(net, OptimConfig(name="adamw", weight_decay=0.1))
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1


def test_l2_penalty_matches_keras_formula():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    conv, bn, lin = net[0], net[1], net[3]
    c = 1e-3
    expected = c * (conv.weight.pow(2).sum() + lin.weight.pow(2).sum())
    assert torch.allclose(L2Penalty(net, c, biases=False, norm_params=False)(), expected)
    with_bias = expected + c * (conv.bias.pow(2).sum() + lin.bias.pow(2).sum())
    assert torch.allclose(L2Penalty(net, c, biases=True, norm_params=False)(), with_bias)
    full = with_bias + c * (bn.weight.pow(2).sum() + bn.bias.pow(2).sum())
    assert torch.allclose(L2Penalty(net, c, biases=True, norm_params=True)(), full)
    # gradient of c * w^2 is 2 c w (Keras)
    net.zero_grad()
    L2Penalty(net, c, biases=False, norm_params=False)().backward()
    assert torch.allclose(conv.weight.grad, 2 * c * conv.weight)


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine"])
def test_schedules(schedule):
    cfg = OptimConfig(
        schedule=schedule, warmup_epochs=1, step_milestones=(0.5, 0.75), step_gamma=0.1
    )
    total, warm = 100, 10
    f = [lr_factor(s, total, warm, cfg) for s in range(total)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11)
    assert f[10] == pytest.approx(1.0)
    if schedule == "constant":
        assert f[99] == 1.0
    elif schedule == "step":
        assert f[49] == 1.0 and f[50] == pytest.approx(0.1) and f[75] == pytest.approx(0.01)
    else:
        mid = 10 + 45
        assert f[mid] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
        assert f[99] < 0.001


def test_scheduler_steps_per_iteration():
    net = nn.Linear(2, 2)
    opt = build_optimizer(net, OptimConfig(lr=1.0, schedule="step", step_milestones=(0.5,)))
    sched = build_scheduler(opt, OptimConfig(lr=1.0, schedule="step", step_milestones=(0.5,)), 5, 2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [1.0] * 5 + [pytest.approx(0.1)] * 5
