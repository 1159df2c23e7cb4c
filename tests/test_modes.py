"""Every helper that switches a model to eval (or train) mode gives each module its own flag
back: a submodule kept in eval mode during training (BN frozen by a fine-tuning loop) must not
silently start updating its statistics again after an evaluation or a probe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.bn.graph import eval_mode
from normlab.bn.recalibrate import recalibrate_batchnorm
from normlab.engine.evaluate import evaluate, evaluate_with_predictions
from normlab.models.lsuv import lsuv_init
from normlab.models.modes import preserved_modes
from normlab.probes.gap import train_eval_gap
from normlab.probes.stats import batch_statistics_mode


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    m.train()
    m[1].eval()  # frozen by the user
    return m


def _flags(m: nn.Module) -> list[bool]:
    return [x.training for x in m.modules()]


X = torch.randn(8, 3, 6, 6)
Y = torch.randint(0, 3, (8,))
LOADER = [(X, Y)]

HELPERS = {
    "evaluate": lambda m: evaluate(m, LOADER),
    "evaluate_with_predictions": lambda m: evaluate_with_predictions(m, LOADER),  # type: ignore[arg-type]
    "batch_statistics_mode": lambda m: _enter_exit(batch_statistics_mode(m), m),
    "recalibrate": lambda m: recalibrate_batchnorm(m, [X]),
    "lsuv": lambda m: lsuv_init(m, X),
    "gap": lambda m: train_eval_gap(m, X, Y),
}


def _enter_exit(cm, m):
    with cm:
        m(X)


@pytest.mark.parametrize("name", list(HELPERS))
def test_every_module_keeps_its_own_training_flag(name):
    m = _model()
    before = _flags(m)
    assert before[2] is False  # the frozen BN (index 0 is the Sequential itself)
    HELPERS[name](m)
    assert _flags(m) == before


def test_eval_mode_and_preserved_modes_restore_on_exit_and_on_error():
    m = _model()
    before = _flags(m)
    with eval_mode(m):
        assert not any(_flags(m))
    assert _flags(m) == before
    with pytest.raises(RuntimeError), preserved_modes(m):
        m.train()
        raise RuntimeError
    assert _flags(m) == before


def test_a_callback_can_keep_bn_frozen_through_fit(tmp_path):
    """fit puts the model in training mode *before* on_epoch_start, and evaluation restores
    each module's flag, so a callback freezing BN for every epoch really freezes it: its
    moving statistics stay at their initial values (mean 0, var 1, no batches counted) while
    every other parameter trains."""
    from _helpers import tiny_config

    from normlab.train import Callback, fit

    class FreezeBN(Callback):
        def on_epoch_start(self, state, epoch):
            assert state.model.training  # fit's training mode comes first
            for m in state.model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()

    result = fit(tiny_config(epochs=2), out=tmp_path / "r", callbacks=[FreezeBN()], verbose=False)
    assert result.status == "completed"
    bns = [m for m in result.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for m in bns:
        assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
        assert torch.equal(m.running_var, torch.ones_like(m.running_var))
        assert int(m.num_batches_tracked) == 0
    unfrozen = fit(tiny_config(epochs=2), out=tmp_path / "u", verbose=False)
    moved = [m for m in unfrozen.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(m.num_batches_tracked) > 0 for m in moved)  # without it, they update
