"""``data.split_seed``: the default keeps the one split every run has always drawn (seed 0);
``"run"`` redraws the held-out images with each run's seed; a bad value is a named error."""

from __future__ import annotations

import pytest
import torch
from _helpers import tiny_config

from normlab.config import config_to_dict
from normlab.data import DataConfig, build_data
from normlab.engine.distributed import DistContext
from normlab.errors import ConfigError
from normlab.store import RunDir, config_differences
from normlab.train.setup import build_session


def _val(config, tmp_path):
    s = build_session(config, RunDir(tmp_path / "unused"), DistContext())
    assert not (tmp_path / "unused").exists()  # building a session writes nothing
    return s.data


def test_by_default_every_seed_holds_out_todays_images(tmp_path):
    today = build_data(tiny_config().data, seed=0)  # what build_session always did
    for seed in (0, 3):
        got = _val(tiny_config(seed=seed), tmp_path)
        assert torch.equal(got.val_images, today.val_images)
        assert torch.equal(got.val_labels, today.val_labels)
        assert got.val_id == today.val_id != ""


def test_split_seed_run_redraws_the_held_out_images_with_each_seed(tmp_path):
    by_seed = {s: _val(tiny_config(seed=s, **{"data.split_seed": "run"}), tmp_path) for s in (0, 1)}
    assert torch.equal(by_seed[0].val_images, build_data(tiny_config().data, 0).val_images)
    assert by_seed[0].val_id != by_seed[1].val_id
    assert not torch.equal(by_seed[0].val_images, by_seed[1].val_images)
    assert by_seed[1].val_id == build_data(tiny_config().data, seed=1).val_id
    # the same split size (stratified hold-out), so arms stay comparable
    assert by_seed[0].val_labels.numel() == by_seed[1].val_labels.numel()
    # a fixed other split: the same for every seed
    fixed = [_val(tiny_config(seed=s, **{"data.split_seed": 1}), tmp_path) for s in (0, 2)]
    assert fixed[0].val_id == fixed[1].val_id == by_seed[1].val_id


@pytest.mark.parametrize("value", [-1, "runs", True, 1.5, "3"])
def test_a_bad_split_seed_is_a_named_error(value):
    with pytest.raises(ConfigError, match=r"data.split_seed must be"):
        DataConfig(split_seed=value)


def test_split_seed_for():
    assert DataConfig().split_seed_for(7) == 0
    assert DataConfig(split_seed="run").split_seed_for(7) == 7
    assert DataConfig(split_seed=2).split_seed_for(7) == 2
    assert tiny_config(**{"data.split_seed": "run"}).data.split_seed == "run"


def test_an_old_config_without_split_seed_agrees_with_the_default():
    old = config_to_dict(tiny_config())
    del old["data"]["split_seed"]
    assert config_differences(old, config_to_dict(tiny_config())) == []
    assert config_differences(old, config_to_dict(tiny_config(**{"data.split_seed": "run"})))


def test_the_bn_toolbox_evaluates_a_run_on_its_own_split(tmp_path, capsys, monkeypatch):
    """``recalibrate RUN`` measures the run's final model on the images the run held out (a
    split redrawn with the run's seed would mix training images in): the split seed is the
    run's, and the accuracy before recalibrating is the run's final val/acc."""
    import json

    import normlab.data
    from normlab.cli import main
    from normlab.train import fit

    config = tiny_config(seed=1, epochs=1, **{"model.name": "mlp", "data.synthetic_samples": 192})
    result = fit(config, out=tmp_path / "r", verbose=False)
    seeds = []

    def spy(cfg, seed=0):
        seeds.append(seed)
        return build_data(cfg, seed)

    monkeypatch.setattr(normlab.data, "build_data", spy)
    assert main(["recalibrate", str(tmp_path / "r"), "--batches", "1", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert seeds == [0]  # the split the run drew (data.split_seed null), not seed 1's
    assert payload["val_before"]["acc"] == result.summary["final/val/acc"]
