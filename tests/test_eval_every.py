"""``eval_every`` (issue 15, compute plan): validating every N-th epoch changes nothing trained.

The oracle is the same run with ``eval_every: 1``: the final weights, the last epoch's metrics
and predictions, and every training metric must be bit-identical; only the skipped epochs'
``val/*`` and the validating probe's keys are missing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _helpers import InterruptAt, stable, tiny_base, tiny_config

from normlab.config import config_from_dict
from normlab.errors import ConfigError
from normlab.store import RunDir
from normlab.study.spec import Budget, spec_from_dict, spec_to_dict
from normlab.train import fit
from normlab.train.fit import _last_validated

PROBES = ["shift:batches=2:val_samples=0", "weights", "bn"]


def _cfg(**dotted):
    return tiny_config(
        **{"epochs": 4, "data.augment": True, "probes": PROBES, "model.options": {}, **dotted}
    )


def _without_val(row):
    return {k: v for k, v in row.items() if not k.startswith(("val/", "shift/", "bn/shift/"))}


@pytest.fixture(scope="module")
def every_epoch(tmp_path_factory):
    return fit(_cfg(), out=tmp_path_factory.mktemp("r") / "every", verbose=False)


def test_evaluates_every_nth_and_the_last_epoch():
    cfg = tiny_config(epochs=7, eval_every=3)
    assert [e for e in range(1, 8) if cfg.evaluates(e)] == [3, 6, 7]
    assert all(tiny_config(epochs=3).evaluates(e) for e in (1, 2, 3))
    assert [_last_validated(cfg, e) for e in range(8)] == [0, 0, 0, 3, 3, 3, 6, 7]
    with pytest.raises(ConfigError, match="eval_every"):
        tiny_config(eval_every=0)


def test_skipping_validation_trains_the_same_model(tmp_path, every_epoch):
    sparse = fit(_cfg(eval_every=3), out=tmp_path / "sparse", verbose=False)
    full_rows, rows = stable(every_epoch.metrics), stable(sparse.metrics)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    # validated epochs (3 and the last) are identical, probes included
    assert rows[2] == full_rows[2] and rows[3] == full_rows[3]
    # the others have no val/* and no shift probe, and the same everything else
    for r, f in zip(rows[:2], full_rows[:2], strict=True):
        assert not any(k.startswith(("val/", "shift/", "bn/shift/")) for k in r)
        assert any(k.startswith("weights/") for k in r)  # the other probes measure every epoch
        assert r == _without_val(f)
    for key, value in every_epoch.model.state_dict().items():
        assert torch.equal(value, sparse.model.state_dict()[key]), key
    s, f = sparse.summary, every_epoch.summary
    assert s["final/val/acc"] == f["final/val/acc"] and s["final/val/loss"] == f["final/val/loss"]
    # the best epoch is the best of the validated ones
    validated = {r["epoch"]: r["val/acc"] for r in full_rows if r["epoch"] in (3, 4)}
    assert s["best/epoch"] == max(validated, key=lambda e: (validated[e], -e))
    p_full = np.load(every_epoch.run_dir / "predictions.npz")
    p = np.load(sparse.run_dir / "predictions.npz")
    assert np.array_equal(p["final"], p_full["final"]) and int(p["final_epoch"]) == 4


def test_resume_after_an_epoch_that_did_not_validate(tmp_path, every_epoch):
    cfg = _cfg(eval_every=3)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, out=tmp_path / "cut", callbacks=[InterruptAt(epoch=2, step=1)], verbose=False)
    run = RunDir(tmp_path / "cut")
    assert json.loads(run.summary_path.read_text())["final/val/acc"] is None  # none validated
    with pytest.raises(KeyboardInterrupt):  # again, from the checkpoint of epoch 3 (validated)
        fit(None, out=tmp_path / "cut", resume=True, callbacks=[InterruptAt(4, 1)], verbose=False)
    assert int(np.load(run.path / "predictions.npz")["final_epoch"]) == 3
    resumed = fit(None, out=tmp_path / "cut", resume=True, verbose=False)
    uncut = fit(cfg, out=tmp_path / "uncut", verbose=False)
    assert resumed.status == "completed"
    assert stable(resumed.metrics) == stable(uncut.metrics)
    for key, value in every_epoch.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def _ladder(**rung):
    base = tiny_base()
    base["data"] = {**base["data"], "limit_train": 24}
    return {
        "name": "ladder",
        "seeds": 2,
        "base": base,
        "variants": {"bn": {}, "gn": {"norm.name": "gn"}},
        "budgets": {"x1": {}, "x4": {"epochs": 4, **rung}},
    }


def test_a_rung_sets_eval_every_and_nothing_else():
    spec = spec_from_dict(_ladder(eval_every=4))
    x1, x4 = (spec.arm_config(g, "gn") for g in ("x1", "x4"))
    assert (x1.epochs, x1.eval_every) == (2, 1)
    assert (x4.epochs, x4.eval_every) == (8, 4)
    assert spec.split_group("x4")[1] == Budget("x4", 4.0, 1.0, eval_every=4)
    assert spec_from_dict(spec_to_dict(spec)) == spec  # study.yaml round trip
    # a rung without it keeps the arm's own, and the saved document does not grow the key
    plain = spec_from_dict(_ladder())
    assert plain.arm_config("x4", "bn").eval_every == 1
    assert "eval_every" not in spec_to_dict(plain)["budgets"]["x4"]
    assert config_from_dict(spec_to_dict(spec)["base"]).eval_every == 1


@pytest.mark.parametrize("value", [0, 1.5, "4", True])
def test_a_bad_rung_eval_every_is_named(value):
    with pytest.raises(ConfigError, match=r"budgets\.x4\.eval_every must be a whole number >= 1"):
        spec_from_dict(_ladder(eval_every=value))
