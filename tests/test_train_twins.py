"""Momentum twins (``normlab.train.twins``): runs that differ only in BN momentum, trained once,
must be bit-identical to the same runs trained on their own: every tensor of every
checkpoint, every metric row but wall time, every prediction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import stable, tiny_config

from normlab.errors import ConfigError
from normlab.train import Callback, fit
from normlab.train.twins import fit_twins, twinnable

PROBES = ["bn", "shift:batches=2:val_samples=0"]


def _cfg(momentum, **dotted):
    return tiny_config(
        **{
            "epochs": 3,
            "data.augment": True,
            "probes": PROBES,
            "norm.bn_momentum": momentum,
            "model.options": {},
            **dotted,
        }
    )


MOMENTA = (0.1, 0.0, 0.01)


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    root = tmp_path_factory.mktemp("alone")
    return [fit(_cfg(m), out=root / f"m{i}", verbose=False) for i, m in enumerate(MOMENTA)]


def _same_run(a: Path, b: Path) -> None:
    ca, cb = (
        torch.load(a / "checkpoint.pt", weights_only=False),
        torch.load(b / "checkpoint.pt", weights_only=False),
    )
    for part in ("model", "scheduler"):
        sa, sb = ca[part], cb[part]
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(sa[key], sb[key]), (part, key)
            else:
                assert sa[key] == sb[key], (part, key)
    for index, state in ca["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, cb["optimizer"]["state"][index][key]), (index, key)
    assert torch.equal(ca["data_rng"], cb["data_rng"]) and torch.equal(
        ca["torch_rng"], cb["torch_rng"]
    )
    rows = [
        stable([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()])
        for d in (a, b)
    ]
    assert rows[0] == rows[1]
    pa, pb = np.load(a / "predictions.npz"), np.load(b / "predictions.npz")
    assert np.array_equal(pa["final"], pb["final"]) and np.array_equal(pa["best"], pb["best"])


def test_twins_are_bit_identical_to_runs_trained_alone(tmp_path, alone):
    outs = [tmp_path / f"t{i}" for i in range(len(MOMENTA))]
    results = fit_twins([_cfg(m) for m in MOMENTA], outs)
    assert [r.status for r in results] == ["completed"] * 3
    for own, twin in zip(alone, outs, strict=True):
        _same_run(own.run_dir, twin)
    # the statistics really differ: never updated stays at its initial values
    bn = results[1].model.bn1
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not torch.equal(results[0].model.bn1.running_mean, results[2].model.bn1.running_mean)
    summary = json.loads((outs[2] / "summary.json").read_text())
    assert summary["shared_training"]["bn_momenta"] == list(MOMENTA)
    assert summary["shared_training"]["trained"] is False


def test_interrupted_twins_resume_bit_identical(tmp_path, alone):
    outs = [tmp_path / f"t{i}" for i in range(len(MOMENTA))]
    cfgs = [_cfg(m) for m in MOMENTA]

    with pytest.raises(KeyboardInterrupt):
        fit_twins(cfgs, outs, callbacks=[[_StopAtEpochEnd(2)], [], []])
    results = fit_twins(cfgs, outs)
    assert [r.status for r in results] == ["completed"] * 3
    for own, twin in zip(alone, outs, strict=True):
        _same_run(own.run_dir, twin)
    # and a twin resumes on its own as an ordinary run
    solo = tmp_path / "solo"
    with pytest.raises(KeyboardInterrupt):
        fit_twins(cfgs[:2], [solo / "a", solo / "b"], callbacks=[[_StopAtEpochEnd(1)], []])
    fit(None, out=solo / "b", resume=True, verbose=False)
    _same_run(alone[1].run_dir, solo / "b")


class _StopAtEpochEnd(Callback):
    """Ctrl-C after epoch ``epoch``'s row and checkpoint are written (epoch-level only)."""

    observes_only = True  # it interrupts; it changes nothing

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, state, epoch):
        if epoch == self.epoch + 1:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("configs", "reason"),
    [
        ([_cfg(0.1), _cfg(0.1, **{"optim.lr": 0.01})], "differ in more than norm.bn_momentum"),
        ([_cfg(0.1)], "fewer than two runs"),
        (
            [_cfg(0.1, **{"runtime.compile": True}), _cfg(0.0, **{"runtime.compile": True})],
            "compile",
        ),
    ],
)
def test_configs_that_cannot_share_say_why(configs, reason):
    assert reason in (twinnable(configs) or "")


def test_models_and_callbacks_that_cannot_share_are_refused_before_training(tmp_path):
    class PerStep(Callback):
        def on_step_end(self, state, epoch, step):
            pass

    with pytest.raises(ConfigError, match="acts after every step"):
        fit_twins(
            [_cfg(0.1), _cfg(0.0)], [tmp_path / "a", tmp_path / "b"], callbacks=[[], [PerStep()]]
        )

    class Freeze(Callback):
        def on_fit_start(self, state):
            state.model.eval()

    with pytest.raises(ConfigError, match="Freeze overrides on_fit_start without"):
        fit_twins(
            [_cfg(0.1), _cfg(0.0)], [tmp_path / "e", tmp_path / "f"], callbacks=[[Freeze()], []]
        )
    renorm = {"norm.name": "brn"}
    with pytest.raises(ConfigError, match="not a plain BatchNorm"):
        fit_twins([_cfg(0.1, **renorm), _cfg(0.0, **renorm)], [tmp_path / "c", tmp_path / "d"])
    for d in "abcd":
        summary = tmp_path / d / "summary.json"
        assert not summary.is_file() or json.loads(summary.read_text())["epochs_completed"] == 0


def test_a_diverged_source_diverges_every_twin(tmp_path):
    cfgs = [_cfg(m, **{"optim.lr": 1e6, "epochs": 2}) for m in (0.1, 0.0)]
    results = fit_twins(cfgs, [tmp_path / "a", tmp_path / "b"])
    assert [r.status for r in results] == ["diverged", "diverged"]
    alone = fit(cfgs[1], out=tmp_path / "alone", verbose=False)
    assert alone.summary["diverged_at"] == results[1].summary["diverged_at"]


def test_study_momentum_twins_trains_each_seed_once_and_matches_separate_runs(tmp_path):
    from normlab.report import write_report
    from normlab.study.runner import run_study
    from normlab.study.spec import spec_from_dict

    doc = {
        "name": "twins",
        "baseline": "correct",
        "seeds": 2,
        "base": {
            "model": {"name": "resnet20"},
            "data": {"name": "synthetic", "image_size": 8, "limit_train": 32, "limit_val": 16},
            "epochs": 2,
            "batch_size": 8,
            "optim": {"name": "sgd", "lr": 0.05},
            "probes": ["bn"],
        },
        "variants": {
            "correct": {"set": {"norm.bn_momentum": 0.1}},
            "never": {"set": {"norm.bn_momentum": 0.0}},
            "keras": {"set": {"norm.bn_momentum": 0.99, "norm.bn_convention": "keras"}},
        },
    }
    spec = spec_from_dict(doc)
    twins = run_study(spec, tmp_path / "t", executor="serial", stream=None, momentum_twins=True)
    alone = run_study(spec, tmp_path / "a", executor="serial", stream=None)
    assert twins.ok and alone.ok
    for seed in (0, 1):
        runs = [tmp_path / "t" / "runs" / v / f"seed-{seed}" for v in ("correct", "never", "keras")]
        shared = [json.loads((r / "summary.json").read_text()).get("shared_training") for r in runs]
        assert [s["trained"] for s in shared[:2]] == [True, False]  # correct trains for never
        assert shared[2] is None  # keras has another eps: it trains on its own
        assert "not shared" not in (runs[2] / "train.log").read_text()
        for v in ("correct", "never", "keras"):
            _same_run(
                tmp_path / "a" / "runs" / v / f"seed-{seed}",
                tmp_path / "t" / "runs" / v / f"seed-{seed}",
            )
    write_report(tmp_path / "t")
    md = (tmp_path / "t" / "report.md").read_text()
    assert "| correct |" in md and "momentum twins (BN momenta 0.1, 0): trained here" in md
    assert "momentum twins (BN momenta 0.1, 0): network trained by its twin (time counted" in md


def test_a_twin_pair_s_time_is_counted_once_in_the_arm_that_trained():
    """Twins run in one process, so both record the pair's wall time (here 300 s, of which
    200 s training): the arms' totals must add up to 300 s per pair, not 300 + 100."""
    from types import SimpleNamespace

    from normlab.report.tables import _total_wall

    def run(trained: bool) -> SimpleNamespace:
        shared = {"bn_momenta": [0.1, 0.0], "trained": trained, "training_seconds": 200.0}
        return SimpleNamespace(summary={"wall_seconds": 300.0, "shared_training": shared})

    assert _total_wall([run(True), run(True)]) == 600.0
    assert _total_wall([run(False), run(False)]) == 0.0
    alone = SimpleNamespace(summary={"wall_seconds": 50.0})
    assert _total_wall([run(False), alone]) == 50.0
