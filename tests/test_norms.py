"""normlab.norms: specs, the registry, and the custom layers against closed-form statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.errors import ConfigError
from normlab.norms import (
    NORMS,
    BatchRenorm1d,
    BatchRenorm2d,
    FrozenBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    NormSpec,
    is_norm,
    make_norm,
    uses_batch_stats,
)
from normlab.norms.swap import swap_modules

EPS = 1e-5
ALL_NORMS = ("bn", "brn", "frozen_bn", "ghost_bn", "gn", "in", "ln", "none")


pytestmark = pytest.mark.usefixtures("one_thread")


def _x(*shape: int, seed: int = 0, scale: float = 2.0, shift: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def _np_norm(x: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float = EPS) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) per channel of (N, C, H, W)."""
    return (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + eps)


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel mean, biased and unbiased variance of (N, C, H, W)."""
    axes = (0, 2, 3)
    return x.mean(axes), x.var(axes), x.var(axes, ddof=1)


def _affine(m: nn.Module, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Give ``m`` a random affine transform; return (weight, bias) as numpy."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy()


def _bc(v: np.ndarray) -> np.ndarray:
    return v[None, :, None, None]


# ---------------------------------------------------------------------------------------------
# registry, spec, factory


def test_registry_has_exactly_the_documented_norms() -> None:
    assert sorted(NORMS.names()) == sorted(ALL_NORMS)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gn_groups", 0),
        ("gn_groups", 2.5),
        ("gn_groups", True),
        ("bn_momentum", 1.5),
        ("bn_momentum", -0.1),
        ("bn_momentum", float("nan")),
        ("bn_eps", 0.0),
        ("bn_convention", "tf"),
        ("brn_r_max", 0.5),
        ("brn_d_max", -1.0),
        ("brn_warmup_steps", -1),
        ("ghost_batch_size", 0),
    ],
)
def test_spec_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"norm.{field}"):
        NormSpec(**{field: value})


def test_unknown_norm_lists_known_names() -> None:
    with pytest.raises(ConfigError, match=r"norm\.name") as err:
        NormSpec(name="batchnorm")
    for name in ALL_NORMS:
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="known norms"):
        make_norm("batchnorm", 8)


def test_torch_and_keras_conventions_resolve() -> None:
    assert NormSpec().torch_momentum() == 0.1 and NormSpec().eps() == 1e-5
    keras = NormSpec(bn_convention="keras", bn_momentum=0.99)
    assert keras.torch_momentum() == pytest.approx(0.01, abs=1e-15)
    assert keras.eps() == 1e-3
    # Keras defaults: momentum 0.99 (torch 0.01), eps 1e-3
    assert NormSpec(bn_convention="keras").torch_momentum() == pytest.approx(0.01, abs=1e-15)
    assert NormSpec(bn_convention="keras", bn_eps=1e-4).eps() == 1e-4
    # torch convention passes momentum through unchanged
    assert NormSpec(bn_momentum=0.99).torch_momentum() == 0.99


def test_keras_momentum_gives_the_keras_moving_average() -> None:
    """moving = moving * 0.99 + batch * 0.01 (Keras' formula), on fixed tensors, k = 4 steps."""
    spec = NormSpec(name="bn", bn_convention="keras", bn_momentum=0.99)
    bn = make_norm(spec, 3)
    assert isinstance(bn, nn.BatchNorm2d)
    assert bn.eps == 1e-3 and bn.momentum == pytest.approx(0.01, abs=1e-15)
    bn.double().train()
    moving_mean, moving_var = np.zeros(3), np.ones(3)
    for k in range(4):
        x = _x(4, 3, 2, 2, seed=k, shift=float(k))
        bn(x)
        mean, _, var_unbiased = _stats(x.numpy())
        moving_mean = moving_mean * 0.99 + mean * 0.01
        # torch's running_var tracks the unbiased batch variance (Keras' the biased one)
        moving_var = moving_var * 0.99 + var_unbiased * 0.01
    np.testing.assert_allclose(bn.running_mean.numpy(), moving_mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(bn.running_var.numpy(), moving_var, rtol=1e-12)


@pytest.mark.parametrize("name", ALL_NORMS)
@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_make_norm_builds_the_documented_module(name: str, kind: str) -> None:
    expected: dict[tuple[str, str], type[nn.Module] | None] = {
        ("bn", "conv"): nn.BatchNorm2d,
        ("bn", "dense"): nn.BatchNorm1d,
        ("gn", "conv"): nn.GroupNorm,
        ("gn", "dense"): nn.GroupNorm,
        ("ln", "conv"): nn.GroupNorm,
        ("ln", "dense"): nn.LayerNorm,
        ("in", "conv"): nn.InstanceNorm2d,
        ("frozen_bn", "conv"): FrozenBatchNorm,
        ("frozen_bn", "dense"): FrozenBatchNorm,
        ("brn", "conv"): BatchRenorm2d,
        ("brn", "dense"): BatchRenorm1d,
        ("ghost_bn", "conv"): GhostBatchNorm2d,
        ("ghost_bn", "dense"): GhostBatchNorm1d,
        ("none", "conv"): None,
        ("none", "dense"): None,
    }
    if (name, kind) == ("in", "dense"):
        with pytest.raises(ConfigError, match="dense"):
            make_norm(name, 8, kind)
        return
    m = make_norm(NormSpec(name=name, gn_groups=4), 8, kind)
    cls = expected[(name, kind)]
    if cls is None:
        assert m is None
        return
    assert type(m) is cls
    assert m is not None and is_norm(m)
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params == (0 if name == "frozen_bn" else 2 * 8)  # affine weight + bias
    if name == "ln" and kind == "conv":
        assert isinstance(m, nn.GroupNorm) and m.num_groups == 1
    if name == "gn":
        assert isinstance(m, nn.GroupNorm) and m.num_groups == 4
    x = _x(4, 8, 3, 3).float() if kind == "conv" else _x(4, 8).float()
    assert m(x).shape == x.shape


def test_make_norm_none_and_bad_arguments() -> None:
    assert make_norm(None, 8) is None
    assert make_norm("none", 8) is None
    with pytest.raises(ConfigError, match="kind"):
        make_norm("bn", 8, kind="conv3d")
    with pytest.raises(ConfigError, match="num_features"):
        make_norm("bn", 0)


def test_bn_family_uses_resolved_momentum_and_eps() -> None:
    spec = NormSpec(bn_momentum=0.05, bn_eps=1e-4, ghost_batch_size=8, brn_r_max=2.0)
    for name in ("bn", "brn", "ghost_bn"):
        m = make_norm(spec.replace(name=name), 8)
        assert m is not None and m.momentum == 0.05 and m.eps == 1e-4
    assert make_norm(spec.replace(name="frozen_bn"), 8).eps == 1e-4
    brn = make_norm(spec.replace(name="brn"), 8)
    assert isinstance(brn, BatchRenorm2d) and brn.r_max == 2.0
    ghost = make_norm(spec.replace(name="ghost_bn"), 8)
    assert isinstance(ghost, GhostBatchNorm2d) and ghost.ghost_batch_size == 8


def test_gn_groups_clamped_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"norm.gn_groups=32 exceeds the 16 channels"):
        m = make_norm(NormSpec(name="gn", gn_groups=32), 16)
    assert isinstance(m, nn.GroupNorm) and m.num_groups == 16


def test_gn_groups_not_dividing_channels_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"norm.gn_groups=3 does not divide C=16") as err:
        make_norm(NormSpec(name="gn", gn_groups=3), 16)
    assert "choose a divisor of 16 (1, 2, 4, 8, 16)" in str(err.value)


def test_is_norm_and_uses_batch_stats() -> None:
    table: list[tuple[nn.Module, bool, bool]] = [
        (nn.BatchNorm2d(4), True, True),
        (nn.BatchNorm1d(4), True, True),
        (nn.SyncBatchNorm(4), True, True),
        (BatchRenorm2d(4), True, True),
        (GhostBatchNorm2d(4), True, True),
        (FrozenBatchNorm(4), True, False),
        (nn.GroupNorm(2, 4), True, False),
        (nn.LayerNorm(4), True, False),
        (nn.InstanceNorm2d(4, affine=True), True, False),
        (nn.Conv2d(4, 4, 1), False, False),
        (nn.Linear(4, 4), False, False),
        (nn.ReLU(), False, False),
    ]
    for m, norm, batch in table:
        assert is_norm(m) is norm, m
        assert uses_batch_stats(m) is batch, m


def test_brn_and_ghost_are_batchnorms_for_isinstance_and_state_dict() -> None:
    bn = nn.BatchNorm2d(4)
    for m in (BatchRenorm2d(4), GhostBatchNorm2d(4)):
        assert isinstance(m, nn.BatchNorm2d)
        assert list(m.state_dict()) == list(bn.state_dict())
        m.load_state_dict(bn.state_dict())  # strict


# ---------------------------------------------------------------------------------------------
# Batch Renormalization


def test_brn_with_no_clipping_room_is_batchnorm_in_training() -> None:
    """r_max = 1, d_max = 0: outputs, input/affine gradients and running stats equal BN's."""
    bn = nn.BatchNorm2d(3).double()
    brn = BatchRenorm2d(3, r_max=1.0, d_max=0.0, warmup_steps=0).double()
    _affine(bn)
    _affine(brn)
    for step in range(3):
        x = _x(6, 3, 4, 4, seed=step, shift=float(step))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = bn(xa), brn(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-10)
        g = _x(6, 3, 4, 4, seed=100 + step)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        assert xa.grad is not None and xb.grad is not None
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(brn.weight.grad, bn.weight.grad)
    torch.testing.assert_close(brn.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(brn.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
    assert int(brn.num_batches_tracked) == 3


def test_brn_clips_r_and_d_as_the_paper_says() -> None:
    brn = BatchRenorm2d(3, r_max=2.0, d_max=0.5, warmup_steps=0, momentum=0.1).double()
    w, b = _affine(brn)
    rm = np.array([3.0, 0.0, 1.0])  # channel 0: d clipped at -0.5
    rv = np.array([4.0, 100.0, 0.01])  # channel 1: r clipped at 1/2; channel 2: at 2
    brn.running_mean.copy_(torch.from_numpy(rm))
    brn.running_var.copy_(torch.from_numpy(rv))
    x = _x(8, 3, 3, 3, seed=3)
    y = brn(x).detach().numpy()

    xn = x.numpy()
    mean, var, var_unbiased = _stats(xn)
    sigma_b, sigma = np.sqrt(var + EPS), np.sqrt(rv + EPS)
    r_raw, d_raw = sigma_b / sigma, (mean - rm) / sigma
    r, d = np.clip(r_raw, 0.5, 2.0), np.clip(d_raw, -0.5, 0.5)
    assert r_raw[1] < 0.5 and r_raw[2] > 2.0 and d_raw[0] < -0.5  # the clips are active
    expected = ((xn - _bc(mean)) / _bc(sigma_b) * _bc(r) + _bc(d)) * _bc(w) + _bc(b)
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-10)
    # running statistics: BN's update, from the statistics before this step
    np.testing.assert_allclose(brn.running_mean.numpy(), 0.9 * rm + 0.1 * mean, rtol=1e-12)
    np.testing.assert_allclose(brn.running_var.numpy(), 0.9 * rv + 0.1 * var_unbiased, rtol=1e-12)


def test_brn_r_and_d_get_no_gradient() -> None:
    """With r, d constants, dL/dx = r * (BN's gradient) channel-wise."""
    brn = BatchRenorm2d(3, r_max=2.0, d_max=0.5, warmup_steps=0, affine=False).double()
    brn.running_mean.fill_(0.7)
    brn.running_var.copy_(torch.tensor([4.0, 100.0, 0.01], dtype=torch.float64))
    x = _x(8, 3, 3, 3, seed=5).requires_grad_()
    g = _x(8, 3, 3, 3, seed=6)
    with torch.no_grad():
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        r = (torch.sqrt(var + EPS) / torch.sqrt(brn.running_var + EPS)).clamp(0.5, 2.0)
    (brn(x) * g).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    (
        F.batch_norm(x2, None, None, training=True, eps=EPS) * g * r.view(1, -1, 1, 1)
    ).sum().backward()
    assert x.grad is not None and x2.grad is not None
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-9, atol=1e-12)
    assert mean.shape == (3,)


def test_brn_eval_uses_running_statistics() -> None:
    brn = BatchRenorm2d(3).double()
    w, b = _affine(brn)
    rm, rv = np.array([0.5, -1.0, 2.0]), np.array([0.25, 4.0, 9.0])
    brn.running_mean.copy_(torch.from_numpy(rm))
    brn.running_var.copy_(torch.from_numpy(rv))
    brn.eval()
    x = _x(4, 3, 2, 2)
    expected = _np_norm(x.numpy(), rm, rv) * _bc(w) + _bc(b)
    np.testing.assert_allclose(brn(x).detach().numpy(), expected, rtol=1e-10)
    assert int(brn.num_batches_tracked) == 0  # eval forwards are not training steps
    np.testing.assert_array_equal(brn.running_mean.numpy(), rm)


def test_brn_warmup_schedule() -> None:
    """Plain BN for t < W; r_max 1 -> 3 over [W, 8W], d_max 0 -> 5 over [W, 5W]."""
    brn = BatchRenorm2d(2, r_max=3.0, d_max=5.0, warmup_steps=100)
    cases = {
        0: (1.0, 0.0),
        99: (1.0, 0.0),
        100: (1.0, 0.0),
        450: (1.0 + 2.0 * 350 / 700, 5.0 * 350 / 400),
        500: (1.0 + 2.0 * 400 / 700, 5.0),
        800: (3.0, 5.0),
        10_000: (3.0, 5.0),
    }
    for step, (r_lim, d_lim) in cases.items():
        assert brn.clip_limits(step) == pytest.approx((r_lim, d_lim), rel=1e-6), step
    assert BatchRenorm2d(2, warmup_steps=0).clip_limits(0) == (3.0, 5.0)
    assert brn.clip_limits() == (1.0, 0.0)


def test_brn_warmup_is_driven_by_training_forwards() -> None:
    """Before W training steps BRN equals BN even where clipping would bite; after, it does not."""
    bn = nn.BatchNorm2d(2).double()
    brn = BatchRenorm2d(2, r_max=3.0, d_max=5.0, warmup_steps=2).double()
    for m in (bn, brn):
        m.running_mean.fill_(3.0)  # far from the batch mean: d would be large
    for step in range(2):
        x = _x(4, 2, 3, 3, seed=step)
        torch.testing.assert_close(brn(x), bn(x), rtol=1e-10, atol=1e-10)
    brn.eval()
    brn(x)  # eval: no step
    brn.train()
    assert int(brn.num_batches_tracked) == 2
    brn.num_batches_tracked.fill_(2 * 8)  # fully relaxed
    assert not torch.allclose(brn(x), bn(x))


def test_brn_dense() -> None:
    brn = BatchRenorm1d(5, r_max=1.0, d_max=0.0, warmup_steps=0).double()
    bn = nn.BatchNorm1d(5).double()
    x = _x(8, 5)
    torch.testing.assert_close(brn(x), bn(x), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Ghost batch normalization


@pytest.mark.parametrize("ghost", [8, 100])
def test_ghost_bn_with_one_ghost_batch_is_batchnorm(ghost: int) -> None:
    bn, gbn = nn.BatchNorm2d(3), GhostBatchNorm2d(3, ghost_batch_size=ghost)
    _affine(bn)
    _affine(gbn)
    x = _x(8, 3, 4, 4).float()
    assert torch.equal(gbn(x), bn(x))
    assert torch.equal(gbn.running_mean, bn.running_mean)
    assert torch.equal(gbn.running_var, bn.running_var)


def _ghost_expected(
    x: np.ndarray, sizes: list[int], w: np.ndarray, b: np.ndarray, momentum: float = 0.1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closed form: each chunk normalised by its own stats; running stats from the
    size-weighted mean of chunk means and unbiased variances."""
    out, means, uvars = [], [], []
    start = 0
    for s in sizes:
        c = x[start : start + s]
        mean, var, uvar = _stats(c)
        out.append(_np_norm(c, mean, var) * _bc(w) + _bc(b))
        means.append(mean * s / len(x))
        uvars.append(uvar * s / len(x))
        start += s
    running_mean = (1 - momentum) * 0.0 + momentum * np.sum(means, axis=0)
    running_var = (1 - momentum) * 1.0 + momentum * np.sum(uvars, axis=0)
    return np.concatenate(out), running_mean, running_var


@pytest.mark.parametrize(
    ("n", "ghost", "sizes"),
    [
        (8, 4, [4, 4]),  # B / 2: each half normalised separately
        (8, 2, [2, 2, 2, 2]),
        (7, 3, [3, 2, 2]),  # remainder: ceil(7 / 3) = 3 near-equal chunks, none above 3
        (6, 4, [3, 3]),
    ],
)
def test_ghost_bn_normalises_each_ghost_batch_separately(
    n: int, ghost: int, sizes: list[int]
) -> None:
    gbn = GhostBatchNorm2d(3, ghost_batch_size=ghost).double()
    w, b = _affine(gbn)
    assert gbn.num_chunks(n) == len(sizes)
    x = _x(n, 3, 2, 3, seed=n)
    y = gbn(x).detach().numpy()
    expected, rm, rv = _ghost_expected(x.numpy(), sizes, w, b)
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gbn.running_mean.numpy(), rm, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gbn.running_var.numpy(), rv, rtol=1e-12)
    assert int(gbn.num_batches_tracked) == 1


def test_ghost_bn_gradients_match_separate_batchnorms() -> None:
    gbn = GhostBatchNorm2d(3, ghost_batch_size=4).double()
    _affine(gbn)
    x = _x(8, 3, 2, 2).requires_grad_()
    g = _x(8, 3, 2, 2, seed=9)
    (gbn(x) * g).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    w = gbn.weight.detach().clone().requires_grad_()
    b = gbn.bias.detach().clone()
    halves = [F.batch_norm(h, None, None, w, b, training=True, eps=EPS) for h in x2.split(4)]
    (torch.cat(halves) * g).sum().backward()
    assert x.grad is not None and x2.grad is not None
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gbn.weight.grad, w.grad)


def test_ghost_bn_eval_and_dense() -> None:
    gbn = GhostBatchNorm1d(4, ghost_batch_size=2).double()
    x = _x(8, 4)
    out = gbn(x)
    # dense: each pair of rows normalised on its own
    pair = x[:2]
    torch.testing.assert_close(out[:2], F.batch_norm(pair, None, None, training=True, eps=EPS))
    gbn.eval()
    bn = nn.BatchNorm1d(4).double().eval()
    bn.load_state_dict(gbn.state_dict())
    torch.testing.assert_close(gbn(x), bn(x))


# ---------------------------------------------------------------------------------------------
# Frozen batch normalization


def _trained_bn(c: int = 3) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c).double()
    _affine(bn)
    for k in range(3):
        bn(_x(4, c, 3, 3, seed=k, shift=float(k)))
    return bn


def test_frozen_bn_loads_a_batchnorm_state_dict_and_matches_its_eval() -> None:
    bn = _trained_bn()
    frozen = FrozenBatchNorm(3).double()
    frozen.load_state_dict(bn.state_dict())  # strict; num_batches_tracked is ignored
    assert "num_batches_tracked" in bn.state_dict()
    assert list(frozen.parameters()) == []
    assert sorted(frozen.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    x = _x(2, 3, 4, 4, seed=7)
    bn.eval()
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(FrozenBatchNorm.from_batchnorm(bn)(x), bn(x))


def test_frozen_bn_train_and_eval_are_identical() -> None:
    frozen = FrozenBatchNorm.from_batchnorm(_trained_bn())
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = _x(2, 3, 4, 4, seed=8)
    frozen.train()
    y_train = frozen(x)
    frozen.eval()
    assert torch.equal(frozen(x), y_train)
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k])


def test_frozen_bn_dense_and_shape_check() -> None:
    frozen = FrozenBatchNorm(4)
    frozen.running_var.fill_(4.0)
    x = torch.ones(3, 4)
    torch.testing.assert_close(frozen(x), x / np.sqrt(4.0 + EPS))
    with pytest.raises(ValueError, match="expects input"):
        frozen(torch.ones(3, 5))


# ---------------------------------------------------------------------------------------------
# both custom batch norms: momentum=None and reduced-precision inputs


def test_cumulative_average_momentum_none_matches_batchnorm() -> None:
    bn = nn.BatchNorm2d(3, momentum=None).double()
    brn = BatchRenorm2d(3, momentum=None, r_max=1.0, d_max=0.0, warmup_steps=0).double()
    ghost = GhostBatchNorm2d(3, momentum=None, ghost_batch_size=64).double()
    for step in range(3):
        x = _x(4, 3, 2, 2, seed=step, shift=float(step))
        for m in (bn, brn, ghost):
            m(x)
    for m in (brn, ghost):
        torch.testing.assert_close(m.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.running_var, bn.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["brn", "ghost_bn", "frozen_bn"])
def test_bfloat16_input_keeps_its_dtype_and_float32_statistics(name: str) -> None:
    m = make_norm(NormSpec(name=name, ghost_batch_size=2, brn_warmup_steps=0), 4)
    assert m is not None
    x = _x(8, 4, 3, 3).to(torch.bfloat16).requires_grad_()
    y = m(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad is not None
    assert m.running_mean.dtype == torch.float32


# ---- swapping layers -------------------------------------------------------------------------


def test_swap_modules_visits_in_order_keeps_sharing_and_replaces_the_root() -> None:
    shared = nn.BatchNorm1d(3)
    model = nn.Sequential(
        nn.Linear(3, 3), shared, nn.Sequential(shared, nn.Sequential(nn.ReLU())), shared
    )
    asked: list[str] = []

    def to_identity(name: str, m: nn.Module) -> nn.Module | None:
        asked.append(name)
        return nn.Identity() if isinstance(m, nn.BatchNorm1d | nn.Sequential) and name else None

    out = swap_modules(model, to_identity)
    assert out is model
    assert asked == ["", "0", "1", "2"]  # "1" once for its three places; "2" not entered
    assert isinstance(model[1], nn.Identity) and model[1] is model[3]
    assert isinstance(model[2], nn.Identity) and isinstance(model[0], nn.Linear)
    root = nn.BatchNorm2d(2)
    assert isinstance(swap_modules(root, lambda name, m: nn.Identity()), nn.Identity)
    assert swap_modules(root, lambda name, m: None) is root
