"""normlab.models.stack: K copies of one architecture as one wide module.

The oracle is always the K models themselves: the stacked module on ``torch.cat(xs, 1)`` must
compute, copy by copy, what each model computes on its own input (float32 here, beyond the
module's own float64 check), train to the same parameters and running statistics, keep the
documented tensor layout, and refuse what it cannot stack with a :class:`StackError` that says
where.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.models import build_model
from normlab.models.stack import (
    StackedLinear,
    StackError,
    copy_view,
    stack_models,
    stack_verified,
    unstack_into,
    verify_stacked,
)
from normlab.norms import FrozenBatchNorm

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 8  # image side: every model here builds and runs at 8x8
BATCH = 4
RTOL = 1e-5  # float32: relative to the reference's largest magnitude

# (model name, build options): every rule stack.py has, on normlab's own models
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet20-bn": ("resnet20", {"norm": "bn"}),
    "resnet20-gn": ("resnet20", {"norm": "gn", "gn_groups": 4}),
    "resnet20-xbn": ("resnet20", {"norm": "bn", "xbn": True, "xbn_groups": 4}),
    "resnet20-frozen_bn": ("resnet20", {"norm": "frozen_bn"}),
    "resnet20-none-skip_init": ("resnet20", {"norm": "none", "skip_init": True}),
    "resnet20-bn-shortcutB": ("resnet20", {"norm": "bn", "shortcut": "B"}),
    "mlp-bn": ("mlp", {"norm": "bn", "hidden": (32, 16)}),
}


def _build(seed: int, name: str, **options: Any) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, 10, input_size=SIZE, **options)


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Give the tensors a fresh build leaves equal in every copy (norm affines and statistics,
    SkipInit's alpha = 0) per-copy random values, so that a rule that mixed the copies up, or
    used copy 0's values for all, would show."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for m in model.modules():
            norm = (_BatchNorm, FrozenBatchNorm, nn.GroupNorm, nn.InstanceNorm2d)
            if isinstance(m, norm) and m.weight is not None:
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, _BatchNorm | FrozenBatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.copy_(0.5 * torch.randn((), generator=g))
    return model


def _models(key: str, k: int = 2) -> list[nn.Module]:
    name, options = CONFIGS[key]
    return [_randomise(_build(s, name, **options), s) for s in range(k)]


def _inputs(k: int, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, 3, SIZE, SIZE, generator=g) for _ in range(k)]


def _split(out: Tensor, k: int) -> list[Tensor]:
    """The stacked output, copy by copy (copy-major channels)."""
    return list(out.view(out.shape[0], k, -1).unbind(1))


def _assert_close(actual: Tensor, expected: Tensor, what: str, rtol: float = RTOL) -> None:
    assert actual.shape == expected.shape, what
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), what
        return
    scale = max(float(expected.abs().max()), 1e-12) if expected.numel() else 1.0
    err = float((actual - expected).abs().max()) / scale if expected.numel() else 0.0
    assert err <= rtol, f"{what}: relative difference {err:.3g} > {rtol:g}"


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def _assert_bit_identical(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def _flags(module: nn.Module) -> list[bool]:
    return [m.training for m in module.modules()]


# ---------------------------------------------------------------------------------------------
# float32 equivalence with the copies


@pytest.mark.parametrize(
    ("key", "k"),
    [(key, 2) for key in CONFIGS] + [("resnet20-bn", 3), ("mlp-bn", 3)],
    ids=[f"{key}-K2" for key in CONFIGS] + ["resnet20-bn-K3", "mlp-bn-K3"],
)
def test_stacked_forward_matches_each_copy_in_train_then_eval_mode(key: str, k: int) -> None:
    models = _models(key, k)
    stacked = stack_models(models)
    xs = _inputs(k)
    for training in (True, False):  # train first: the running stats update on both sides
        stacked.train(training)
        for m in models:
            m.train(training)
        with torch.no_grad():
            outs = _split(stacked(torch.cat(xs, 1)), k)
            refs = [m(x) for m, x in zip(models, xs, strict=True)]
        for i, (o, r) in enumerate(zip(outs, refs, strict=True)):
            _assert_close(o, r, f"copy {i} output, training={training}")
        # the copies differ, so a stacked module that computed one copy for all would fail
        assert not torch.allclose(refs[0], refs[1])


@pytest.mark.parametrize("key", list(CONFIGS))
def test_sgd_steps_on_the_stacked_module_match_steps_on_each_model(key: str) -> None:
    k = 2
    models = _models(key, k)
    stacked = stack_models(models).train()
    for m in models:
        m.train()

    def sgd(params: Any) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)

    opt_wide = sgd(stacked.parameters())
    opts = [sgd(m.parameters()) for m in models]
    g = torch.Generator().manual_seed(7)
    for step in range(2):  # the second step uses the momentum buffers
        xs = _inputs(k, seed=10 + step)
        ys = [torch.randint(0, 10, (BATCH,), generator=g) for _ in range(k)]
        opt_wide.zero_grad()
        outs = _split(stacked(torch.cat(xs, 1)), k)
        sum(F.cross_entropy(o, y) for o, y in zip(outs, ys, strict=True)).backward()  # type: ignore[union-attr]
        opt_wide.step()
        for m, opt, x, y in zip(models, opts, xs, ys, strict=True):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()

    before = [_snapshot(m) for m in models]
    trained = [copy.deepcopy(m) for m in models]
    unstack_into(stacked, trained)
    for i in range(k):
        state = trained[i].state_dict()
        for name, ref in models[i].state_dict().items():
            _assert_close(state[name], ref, f"copy {i} {name}")
        _assert_bit_identical(before[i], _snapshot(models[i]))  # unstack_into wrote `trained`
    # the step really moved the parameters (a no-op stacked optimiser would fail above)
    assert any(
        not torch.equal(p, q)
        for p, q in zip(_models(key, k)[0].parameters(), trained[0].parameters(), strict=True)
    )


# ---------------------------------------------------------------------------------------------
# layout


@pytest.mark.parametrize(
    "key", ["resnet20-bn-shortcutB", "resnet20-none-skip_init", "resnet20-gn", "mlp-bn"]
)
def test_every_stacked_tensor_is_the_copies_concatenated_on_dim0(key: str) -> None:
    k = 3
    models = _models(key, k)
    stacked = stack_models(models)
    wide = stacked.state_dict()
    states = [m.state_dict() for m in models]
    assert list(wide) == list(states[0])
    own = {t.data_ptr() for s in states for t in s.values()}
    for name, t in wide.items():
        parts = [s[name] for s in states]
        if parts[0].dim() == 0 and t.dim() == 0:  # num_batches_tracked: one shared value
            assert name.endswith("num_batches_tracked"), name
            assert all(torch.equal(t, p) for p in parts), name
            continue
        # SkipInit's alpha is 0-dim per copy: its "concatenation" is the stack
        expected = torch.stack(parts) if parts[0].dim() == 0 else torch.cat(parts)
        assert t.shape == expected.shape and torch.equal(t, expected), name
        for i, p in enumerate(parts):
            assert torch.equal(copy_view(t, i, k, p.shape), p), f"{name} copy {i}"
        assert t.data_ptr() not in own, f"{name} shares storage with a model"
    wide_params = dict(stacked.named_parameters())
    for name, p in models[0].named_parameters():
        assert wide_params[name].requires_grad == p.requires_grad, name


def test_buffers_without_a_gradient_stay_buffers_and_linears_become_stacked_linears() -> None:
    models = _models("resnet20-frozen_bn")
    stacked = stack_models(models)
    assert {n for n, _ in stacked.named_parameters()} == {
        n for n, _ in models[0].named_parameters()
    }
    assert {n for n, _ in stacked.named_buffers()} == {n for n, _ in models[0].named_buffers()}
    assert isinstance(stacked.fc, StackedLinear)
    assert (stacked.fc.copies, stacked.fc.in_features, stacked.fc.out_features) == (2, 64, 10)


def test_unstack_right_after_stacking_is_bit_identical_and_keeps_the_models_tensors() -> None:
    models = _models("resnet20-bn-shortcutB")
    stacked = stack_models(models)
    originals = [_snapshot(m) for m in models]
    ptrs = [{n: t.data_ptr() for n, t in m.state_dict().items()} for m in models]
    params = [list(m.parameters()) for m in models]
    with torch.no_grad():  # overwrite the models so the round trip has to restore every value
        for m in models:
            for t in m.state_dict().values():
                t.fill_(float("nan") if t.is_floating_point() else 123)
    unstack_into(stacked, models)
    for i, m in enumerate(models):
        _assert_bit_identical(originals[i], _snapshot(m))
        assert {n: t.data_ptr() for n, t in m.state_dict().items()} == ptrs[i]
        assert all(p is q for p, q in zip(params[i], m.parameters(), strict=True))


def test_stacked_module_starts_in_the_models_mode() -> None:
    models = [m.eval() for m in _models("mlp-bn")]
    assert not stack_models(models).training
    models = [m.train() for m in models]
    assert stack_models(models).training


# ---------------------------------------------------------------------------------------------
# refusals


class _Scale(nn.Module):
    """A layer with a parameter and no stacked rule."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(c))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.view(1, -1, 1, 1)


class _MyConv(nn.Conv2d):
    """A Conv2d subclass: the rules match exact types only."""


class _Mixing(nn.Module):
    """A parameter-free container whose forward mixes channels in one of three ways."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        n, c, h, w = y.shape
        if self.how == "cat-flip":
            return torch.cat([y, y.flip(1)], 1)
        if self.how == "shuffle":
            return y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return y - y.mean(1, keepdim=True)  # "channel-mean"


def _seeded(seed: int, make: Any) -> nn.Module:
    torch.manual_seed(seed)
    return make()


def test_batch_renorm_is_refused_naming_its_path() -> None:
    models = [_build(s, "resnet20", norm="brn") for s in range(2)]
    with pytest.raises(StackError, match=r"^bn1 \(BatchRenorm2d\) holds parameters"):
        stack_models(models)


def test_layer_norm_on_dense_features_is_refused_naming_its_path() -> None:
    models = [_build(s, "mlp", norm="ln", hidden=(8,)) for s in range(2)]
    with pytest.raises(StackError, match=r"^hidden\.0\.1 \(LayerNorm\) holds parameters"):
        stack_models(models)


@pytest.mark.parametrize(
    ("make", "where"),
    [
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.ReLU(), _Scale(4))), "1.1"),
        (lambda: nn.Sequential(nn.ReLU(), _MyConv(3, 4, 1)), "1"),
    ],
    ids=["custom-parameter", "conv-subclass"],
)
def test_custom_layers_with_parameters_are_refused_naming_their_path(make: Any, where: str) -> None:
    models = [_seeded(s, make) for s in range(2)]
    with pytest.raises(StackError, match=rf"^{where} \(_\w+\) holds parameters or buffers"):
        stack_models(models)


def test_a_parameter_free_layer_without_a_rule_is_refused() -> None:
    models = [nn.Sequential(nn.Conv2d(3, 4, 1), nn.Softmax(1)) for _ in range(2)]
    with pytest.raises(StackError, match=r"^1 \(Softmax\) is a layer without a stacked rule"):
        stack_models(models)


@pytest.mark.parametrize("how", ["cat-flip", "shuffle", "channel-mean"])
def test_a_container_that_mixes_channels_stacks_but_fails_verification(how: str) -> None:
    models = [_seeded(s, lambda: _Mixing(how)) for s in range(2)]
    stacked = stack_models(models)  # no rule is missing: only running it can tell
    example = torch.zeros(2, 3, SIZE, SIZE)
    with pytest.raises(StackError, match="do not compute what the models compute"):
        verify_stacked(stacked, models, example)
    with pytest.raises(StackError, match="do not compute what the models compute"):
        stack_verified(models, example)


def test_a_flatten_across_the_batch_is_refused() -> None:
    models = [nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(0, -1)) for _ in range(2)]
    with pytest.raises(StackError, match=r"^1: Flatten\(0, -1\) mixes the copies"):
        stack_models(models)


def test_a_flatten_from_the_channels_on_is_accepted() -> None:
    models = [_seeded(s, lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 3))) for s in range(2)]
    verify_stacked(stack_models(models), models, torch.zeros(2, 3, 2, 2))


def test_models_with_different_parameters_are_refused() -> None:
    with pytest.raises(StackError, match="do not have the same parameters and buffers"):
        stack_models([_build(0, "resnet20"), _build(1, "resnet20", shortcut="B")])
    with pytest.raises(StackError, match="do not have the same parameters and buffers"):
        stack_models([_build(0, "resnet20"), _build(1, "resnet20", norm="frozen_bn")])
    with pytest.raises(StackError, match="nothing to stack"):
        stack_models([])


def test_models_with_different_layer_types_are_refused_naming_the_layer() -> None:
    models = [nn.Sequential(nn.Conv2d(3, 4, 1), act) for act in (nn.ReLU(), nn.Tanh())]
    with pytest.raises(StackError, match=r"^1: the copies have different layer types"):
        stack_models(models)


def test_same_tensors_but_different_hyperparameters_are_refused() -> None:
    # gn and ln are both GroupNorm with the same tensors; a stacked module with copy 0's
    # num_groups would be wrong for copy 1: the settings comparison names it
    models = [_build(0, "resnet20", norm="gn", gn_groups=4), _build(1, "resnet20", norm="ln")]
    with pytest.raises(
        StackError, match=r"bn1 \(GroupNorm\): the copies' settings differ \(num_groups\)"
    ):
        stack_models(models)


def test_models_with_different_shapes_are_refused_with_a_stack_error() -> None:
    a = _build(0, "mlp", hidden=(8,))
    widths = _build(1, "mlp", hidden=(16,))
    torch.manual_seed(2)
    classes = build_model("mlp", 5, input_size=SIZE, hidden=(8,))
    for other in (widths, classes):
        with pytest.raises(StackError):
            stack_verified([a, other], torch.zeros(2, 3, SIZE, SIZE))


def test_copies_with_different_num_batches_tracked_are_refused() -> None:
    models = _models("resnet20-bn")
    models[0].train()(torch.randn(2, 3, SIZE, SIZE))  # copy 0 has now tracked one batch
    with pytest.raises(StackError, match="buffer 'num_batches_tracked' differs between"):
        stack_models(models)


# ---------------------------------------------------------------------------------------------
# dropout


def test_mobilenetv2_with_dropout_passes_verification() -> None:
    models = [_build(s, "mobilenetv2", alpha=0.25) for s in range(2)]
    assert any(isinstance(m, nn.Dropout) and m.p > 0 for m in models[0].modules())
    stacked = stack_verified(models, torch.zeros(2, 3, SIZE, SIZE))
    assert isinstance(stacked.classifier[1], StackedLinear)


def test_stacked_dropout_draws_a_mask_per_copy_and_is_off_in_eval() -> None:
    models = [_build(s, "mlp", norm="bn", hidden=(64,), dropout=0.5) for s in range(2)]
    assert verify_stacked(stack_models(models), models, torch.zeros(4, 3, SIZE, SIZE)) <= 1e-9
    stacked = stack_models(models)
    drop = stacked.dropout
    x = torch.ones(8, 2 * 64)
    torch.manual_seed(0)
    y = drop.train()(x).view(8, 2, 64)
    assert not torch.equal(y[:, 0], y[:, 1])  # independent masks, not one mask for all copies
    assert torch.equal(drop.eval()(x), x)


def test_copies_with_different_dropout_rates_are_refused() -> None:
    models = [
        _build(0, "mlp", norm="bn", hidden=(16,), dropout=0.0),
        _build(1, "mlp", norm="bn", hidden=(16,), dropout=0.5),
    ]
    with pytest.raises(StackError):
        stack_verified(models, torch.zeros(4, 3, SIZE, SIZE))


# ---------------------------------------------------------------------------------------------
# verify_stacked changes nothing; the stacked module shares nothing with the models


@pytest.mark.parametrize("stacked_training", [True, False], ids=["stacked-train", "stacked-eval"])
def test_verify_stacked_changes_neither_the_stacked_module_nor_the_models(
    stacked_training: bool,
) -> None:
    models = [_build(s, "mlp", norm="bn", hidden=(16,), dropout=0.2) for s in range(2)]
    stacked = stack_models(models).train(stacked_training)
    models[0].train()
    models[1].eval()
    before = [_snapshot(x) for x in (stacked, *models)]
    flags = [_flags(x) for x in (stacked, *models)]
    verify_stacked(stacked, models, torch.zeros(4, 3, SIZE, SIZE))
    for x, snap, fl in zip((stacked, *models), before, flags, strict=True):
        _assert_bit_identical(snap, _snapshot(x))
        assert _flags(x) == fl
        assert all(p.grad is None for p in x.parameters())


def test_verify_stacked_leaves_resnet_running_stats_untouched() -> None:
    models = [m.train() for m in _models("resnet20-bn")]
    stacked = stack_models(models)
    before = [_snapshot(x) for x in (stacked, *models)]
    verify_stacked(stacked, models, torch.zeros(2, 3, SIZE, SIZE))
    for x, snap in zip((stacked, *models), before, strict=True):
        _assert_bit_identical(snap, _snapshot(x))
        assert x.training


def test_switching_the_stacked_module_to_eval_leaves_the_models_alone() -> None:
    models = [_build(s, "mlp", norm="bn", hidden=(16,), dropout=0.5) for s in range(2)]
    stacked = stack_models([m.train() for m in models])
    stacked.eval()
    assert all(m.training for model in models for m in model.modules())


def test_a_hook_on_the_stacked_module_does_not_fire_on_the_models() -> None:
    models = _models("mlp-bn")
    stacked = stack_models(models)
    calls: list[str] = []
    stacked.register_forward_hook(lambda *_: calls.append("root"))
    stacked.fc.register_forward_hook(lambda *_: calls.append("fc"))
    models[0](torch.zeros(2, 3, SIZE, SIZE))
    assert calls == []
