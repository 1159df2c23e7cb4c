"""fit_stacked: several seeds trained as one stacked module (issue 15, item 4).

Oracles: one step agrees with ``fit`` to float32 rounding (parameters, statistics, momentum);
a stacked group is deterministic across an interruption and resume (bit for bit); a copy's
NaN stays in its copy; each run directory is an ordinary run; refusals name their reason;
``study --stack-seeds`` trains what can be stacked and falls back for the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from normlab.config import TrainConfig, config_from_dict
from normlab.data import DataBundle, build_data
from normlab.errors import ConfigError
from normlab.store import RunDir
from normlab.train import Callback, fit
from normlab.train.fit import RunLoop
from normlab.train.stacked import _epoch, _Stack, fit_stacked, stackable

SIZE = 8


def _config(seed: int, **over: Any) -> TrainConfig:
    d: dict[str, Any] = {
        "model": {"name": "resnet20"},
        "data": {"name": "synthetic", "image_size": SIZE, "limit_train": 32, "limit_val": 16},
        "epochs": 2,
        "batch_size": 4,
        "seed": seed,
        "norm": {"name": "bn"},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        # fp32 pinned: the oracles are float32 rounding (auto is bf16 on a CPU with AMX)
        "runtime": {"threads": 1, "progress": "off", "precision": "fp32"},
    }
    for key, value in over.items():
        node = d
        *head, last = key.split(".")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return config_from_dict(d)


@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    return build_data(_config(0).data)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) / max(float(b.abs().max()), 1e-12)


def test_one_step_agrees_with_fit_to_float32_rounding(tmp_path: Path) -> None:
    # one batch of 4 images: exactly one step (rounding differences then grow step by step,
    # ~1e-5 after 4 steps and up to O(1) after 8 in this unstable tiny setting)
    configs = [_config(s, epochs=1, **{"data.limit_train": 4}) for s in (0, 1, 2)]
    bundle = build_data(configs[0].data)
    assert bundle.train_labels.numel() == 4
    singles = [fit(c, out=tmp_path / f"s{c.seed}", data=bundle, verbose=False) for c in configs]
    stacked = fit_stacked(configs, [tmp_path / f"k{c.seed}" for c in configs], data=bundle)
    for one, many in zip(singles, stacked, strict=True):
        a, b = one.model.state_dict(), many.model.state_dict()
        for name, t in a.items():
            if t.is_floating_point():
                assert _rel(b[name], t) < 1e-5, name
            else:
                assert torch.equal(b[name], t), name
        ka = RunDir(one.run_dir).load_checkpoint()["optimizer"]["state"]
        kb = RunDir(many.run_dir).load_checkpoint()["optimizer"]["state"]
        assert ka.keys() == kb.keys() and ka
        for index in ka:
            assert _rel(kb[index]["momentum_buffer"], ka[index]["momentum_buffer"]) < 1e-5
        assert one.metrics[0]["train/loss"] == pytest.approx(
            many.metrics[0]["train/loss"], rel=1e-5
        )
    # the copies are different models: the test compares something
    w = [r.model.state_dict()["conv1.weight"] for r in stacked]
    assert not torch.equal(w[0], w[1])


def test_each_run_is_an_ordinary_run(tmp_path: Path, bundle: DataBundle) -> None:
    configs = [_config(s) for s in (0, 1)]
    outs = [tmp_path / f"k{s}" for s in (0, 1)]
    results = fit_stacked(configs, outs, data=bundle)
    single = fit(_config(0), out=tmp_path / "single", data=bundle, verbose=False)
    for r, out in zip(results, outs, strict=True):
        assert r.status == "completed"
        assert r.summary["stacked"] == {"seeds": [0, 1]}
        assert [set(row) for row in r.metrics] == [set(row) for row in single.metrics]
        assert RunDir(out).read_summary()["status"] == "completed"
        again = fit(r.config, out=out, resume=True, verbose=False)  # finished: returned as is
        assert again.metrics == r.metrics
    # finished runs are returned as they are, nothing retrained
    assert [r.metrics for r in fit_stacked(configs, outs, data=bundle)] == [
        r.metrics for r in results
    ]


class _StopBefore(Callback):
    """Ctrl-C before epoch ``epoch`` trains."""

    observes_only = True  # it interrupts; it changes nothing

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, state: Any, epoch: int) -> None:
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_interrupted_and_resumed_group_is_bit_identical(tmp_path: Path, bundle: DataBundle) -> None:
    configs = [_config(s, epochs=3) for s in (0, 1)]
    whole = fit_stacked(configs, [tmp_path / f"a{s}" for s in (0, 1)], data=bundle)
    outs = [tmp_path / f"b{s}" for s in (0, 1)]
    with pytest.raises(KeyboardInterrupt):
        fit_stacked(configs, outs, callbacks=[[_StopBefore(2)], []], data=bundle)
    assert [RunDir(o).read_summary()["status"] for o in outs] == ["running", "running"]
    resumed = fit_stacked(configs, outs, data=bundle)
    for a, b in zip(whole, resumed, strict=True):
        strip = [
            {k: v for k, v in row.items() if k not in ("seconds", "images_per_s")}
            for row in a.metrics
        ]
        assert strip == [
            {k: v for k, v in row.items() if k not in ("seconds", "images_per_s")}
            for row in b.metrics
        ]
        for name, t in a.model.state_dict().items():
            assert torch.equal(t, b.model.state_dict()[name]), name


def test_a_nan_stays_in_its_copy(tmp_path: Path, bundle: DataBundle) -> None:
    configs = [_config(s, epochs=1) for s in (0, 1)]

    def stack(prefix: str) -> _Stack:
        loops = [
            RunLoop(
                c,
                out=tmp_path / f"{prefix}{c.seed}",
                resume=True,
                callbacks=[],
                data=bundle,
                verbose=False,
            )
            for c in configs
        ]
        return _Stack(loops)

    clean, poisoned = stack("c"), stack("p")
    with torch.no_grad():
        w = dict(poisoned.model.named_parameters())["conv1.weight"]
        w.view(2, -1)[1, 0] = float("nan")
    rows_c, div_c = _epoch(clean, [0, 1], 1)
    rows_p, div_p = _epoch(poisoned, [0, 1], 1)
    assert div_c == {} and div_p == {1: 0}
    assert set(rows_p) == {0}
    assert rows_p[0]["train/loss"] == rows_c[0]["train/loss"]
    wc = dict(clean.model.named_parameters())
    for name, p in poisoned.model.named_parameters():
        k0 = p.detach().view(2, -1)[0]
        assert torch.isfinite(k0).all(), name
        assert torch.equal(k0, wc[name].detach().view(2, -1)[0]), name


def test_a_diverged_copy_stops_alone(tmp_path: Path, bundle: DataBundle) -> None:
    configs = [_config(s, epochs=2) for s in (0, 1)]
    outs = [tmp_path / f"k{s}" for s in (0, 1)]

    class _Poison(Callback):
        def on_epoch_end(self, state: Any, epoch: int, row: Any) -> dict[str, Any]:
            return {}

    # poison copy 1 through the stacked module the loop builds
    import normlab.train.stacked as stacked_mod

    original = stacked_mod._Stack.__init__

    def init(self: Any, loops: Any) -> None:
        original(self, loops)
        with torch.no_grad():
            dict(self.model.named_parameters())["fc.weight"].view(2, -1)[1, 0] = float("inf")

    stacked_mod._Stack.__init__ = init  # type: ignore[method-assign]
    try:
        results = fit_stacked(configs, outs, callbacks=[[_Poison()], []], data=bundle)
    finally:
        stacked_mod._Stack.__init__ = original  # type: ignore[method-assign]
    assert [r.status for r in results] == ["completed", "diverged"]
    assert results[1].summary["diverged_at"] == {"epoch": 1, "step": 0}
    assert len(results[0].metrics) == 2 and results[1].metrics == []


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"optim.lr": 0.01}, "differ in more than the seed"),
        ({"optim.grad_clip": 1.0}, "gradient clipping"),
        ({"batch_size": 16, "data.limit_train": 64}, "batch_size 16 > 8"),
    ],
)
def test_configs_that_cannot_stack_say_why(over: dict[str, Any], reason: str) -> None:
    configs = [_config(0), _config(1, **over)]
    if "optim.lr" not in over:
        configs[0] = _config(0, **over)
    why = stackable(configs)
    assert why is not None and reason in why
    with pytest.raises(ConfigError, match=reason):
        fit_stacked(configs, ["/nonexistent/a", "/nonexistent/b"])


def test_models_and_callbacks_that_cannot_stack_are_refused_before_training(
    tmp_path: Path, bundle: DataBundle
) -> None:
    brn = [_config(s, **{"norm.name": "brn"}) for s in (0, 1)]
    with pytest.raises(ConfigError, match=r"bn1 \(BatchRenorm2d\)"):
        fit_stacked(brn, [tmp_path / "r0", tmp_path / "r1"], data=bundle)

    class _PerStep(Callback):
        def on_step_end(self, state: Any, epoch: int, step: int) -> None:
            pass

    with pytest.raises(ConfigError, match="_PerStep acts after every step"):
        fit_stacked(
            [_config(0), _config(1)],
            [tmp_path / "c0", tmp_path / "c1"],
            callbacks=[[], [_PerStep()]],
            data=bundle,
        )

    class _FreezeBN(Callback):  # a change the stacked model would never see
        def on_epoch_start(self, state: Any, epoch: int) -> None:
            for m in state.model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()

    with pytest.raises(ConfigError, match="_FreezeBN overrides on_epoch_start without"):
        fit_stacked(
            [_config(0), _config(1)],
            [tmp_path / "f0", tmp_path / "f1"],
            callbacks=[[_FreezeBN()], []],
            data=bundle,
        )
    # nothing trained: the runs can still train alone
    for d in ("r0", "r1", "c0", "c1", "f0", "f1"):
        assert RunDir(tmp_path / d).read_metrics() == []
    alone = fit(brn[0], out=tmp_path / "r0", resume=True, data=bundle, verbose=False)
    assert alone.status == "completed"


def test_study_stack_seeds_stacks_what_it_can(tmp_path: Path) -> None:
    from normlab.study.runner import run_study
    from normlab.study.spec import spec_from_dict

    spec = spec_from_dict(
        {
            "name": "stk",
            "baseline": "bn",
            "seeds": 2,
            "base": {
                "model": {"name": "resnet20"},
                "data": {
                    "name": "synthetic",
                    "image_size": SIZE,
                    "limit_train": 16,
                    "limit_val": 8,
                },
                "epochs": 1,
                "batch_size": 4,
                "optim": {"name": "sgd", "lr": 0.05},
            },
            "variants": {"bn": {"set": {"norm.name": "bn"}}, "brn": {"set": {"norm.name": "brn"}}},
        }
    )
    result = run_study(spec, tmp_path / "s", executor="serial", stream=None, stack_seeds=True)
    assert result.ok
    runs = tmp_path / "s" / "runs"
    for seed in (0, 1):
        assert RunDir(runs / "bn" / f"seed-{seed}").read_summary()["stacked"] == {"seeds": [0, 1]}
        summary = RunDir(runs / "brn" / f"seed-{seed}").read_summary()
        assert summary["status"] == "completed" and "stacked" not in summary
        assert (
            "not stacked (these runs cannot train stacked: bn1 (BatchRenorm2d)"
            in (runs / "brn" / f"seed-{seed}" / "train.log").read_text()
        )


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_on_augmented_batches_agree_in_float64_and_as_a_layout_change_in_float32(
    tmp_path: Path,
) -> None:
    """The stacked gradient is the same function: on real augmented batches (zero-padded crops,
    flips) float64 agrees to 1e-12; float32 differs no more than NCHW vs channels_last."""
    import copy

    import torch.nn.functional as F

    from normlab.models.stack import copy_view, stack_models

    configs = [_config(s, batch_size=8, **{"data.limit_train": 32}) for s in (0, 1)]
    loops = [
        RunLoop(c, out=tmp_path / f"r{c.seed}", resume=True, callbacks=[], data=None, verbose=False)
        for c in configs
    ]
    batches = [next(iter(lp.s.train_loader)) for lp in loops]
    worst: dict[Any, float] = {}
    for dtype in (torch.float64, torch.float32):
        models = [copy.deepcopy(lp.s.model).to(dtype).train() for lp in loops]
        wide = stack_models(models).to(memory_format=torch.contiguous_format)
        for m, (x, y) in zip(models, batches, strict=True):
            F.cross_entropy(m(x.to(dtype)), y).backward()
        x = torch.cat([b[0] for b in batches], 1).to(dtype).contiguous()
        y = torch.stack([b[1] for b in batches], 1)
        out = wide(x).view(8, 2, -1)
        F.cross_entropy(out.permute(0, 2, 1), y, reduction="none").mean(0).sum().backward()
        wide_grads = _grads(wide)
        worst[dtype] = max(
            _rel(copy_view(wide_grads[n], k, 2, g.shape), g)
            for k, m in enumerate(models)
            for n, g in _grads(m).items()
        )
    layout = 0.0
    for lp, (x, y) in zip(loops, batches, strict=True):
        a = copy.deepcopy(lp.s.model).float().train().to(memory_format=torch.channels_last)
        b = copy.deepcopy(lp.s.model).float().train().to(memory_format=torch.contiguous_format)
        F.cross_entropy(a(x.contiguous(memory_format=torch.channels_last)), y).backward()
        F.cross_entropy(b(x.contiguous()), y).backward()
        gb = _grads(b)
        layout = max(layout, max(_rel(g, gb[n]) for n, g in _grads(a).items()))
    assert worst[torch.float64] < 1e-12
    assert worst[torch.float32] <= max(10 * layout, 1e-4), (worst, layout)
