"""Horizontal flips by default only for data known to be flip-invariant; the choice resolved,
saved and printed; studies keep the flip decision they were made with (older studies: on)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from _helpers import TINY_DATA, stable, tiny_base

from normlab.config import apply_overrides, config_from_dict, load_config, parse_override
from normlab.data import SOURCES, DataConfig, Source, describe_flip
from normlab.report.data import load_study
from normlab.study.plan import plan_study
from normlab.study.runner import prepare, run_study, write_study_file
from normlab.study.spec import load_spec, spec_from_dict, spec_to_dict, with_overrides
from normlab.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy"
CPU = {"device": "cpu", "precision": "fp32", "memory_format": "contiguous"}


def test_each_source_declares_its_default_and_a_reason():
    assert DataConfig("cifar10").flip is True  # natural photographs
    assert DataConfig("digits").flip is False
    assert DataConfig("synthetic").flip is False
    assert DataConfig("imagefolder", path="/some/where").flip is False
    for name in SOURCES.names():
        assert SOURCES.get(name).flip_reason


def test_a_source_that_says_nothing_is_not_flipped(monkeypatch):
    monkeypatch.setitem(SOURCES._items, "mine", Source(lambda cfg: None))  # type: ignore[arg-type]
    assert DataConfig("mine").flip is False


@pytest.mark.parametrize(
    ("name", "setting", "flip"),
    [
        ("digits", True, True),
        ("synthetic", True, True),
        ("cifar10", False, False),
        ("cifar10", None, True),  # null: the source's default
        ("digits", None, False),
    ],
)
def test_data_flip_overrides_the_default_both_ways(name, setting, flip):
    assert DataConfig(name, flip=setting).flip is flip
    cfg = config_from_dict({"data": {"name": name, "flip": setting}})
    assert cfg.data.flip is flip
    key, value = parse_override(f"data.flip={'null' if setting is None else str(setting).lower()}")
    assert (
        config_from_dict(apply_overrides({"data": {"name": name}}, {key: value})).data.flip is flip
    )


def test_the_first_line_names_the_choice():
    assert describe_flip(DataConfig("digits")) == (
        "flip=off (digits: handwritten digits: a mirrored digit is another shape)"
    )
    assert describe_flip(DataConfig("cifar10")) == (
        "flip=on (cifar10: natural photographs: a mirror image shows the same object)"
    )
    assert describe_flip(DataConfig("digits", flip=True)) == (
        "flip=on (data.flip; the digits default is off)"
    )
    assert describe_flip(DataConfig("cifar10", augment=False)) == "flip=off (data.augment is off)"


def test_a_run_saves_the_resolved_flip_prints_it_and_trains_as_the_explicit_setting(
    tmp_path, capsys
):
    base = tiny_base(epochs=1)
    default = fit(config_from_dict(base), out=tmp_path / "default", verbose=True)
    first = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("normlab:")
    )
    assert "data=synthetic (48 train / 16 val) flip=off (synthetic: random class patterns" in first
    saved = yaml.safe_load((tmp_path / "default" / "config.yaml").read_text())
    assert saved["data"]["flip"] is False  # a real bool, not null
    # the default is exactly the explicit setting; flips on is another run
    off = fit(config_from_dict(apply_overrides(base, {"data.flip": False})), out=tmp_path / "off")
    on = fit(config_from_dict(apply_overrides(base, {"data.flip": True})), out=tmp_path / "on")
    capsys.readouterr()
    assert stable(default.metrics) == stable(off.metrics)
    assert stable(on.metrics) != stable(off.metrics)
    assert yaml.safe_load((tmp_path / "on" / "config.yaml").read_text())["data"]["flip"] is True
    assert load_config(tmp_path / "on" / "config.yaml").data.flip is True


def _digits_spec(**extra):
    return spec_from_dict(
        {
            "name": "d",
            "seeds": [0],
            "base": {
                "model": {"name": "mlp", "hidden": [16]},
                "data": {"name": "digits", "limit_train": 64, "limit_val": 32},
                "epochs": 1,
                "batch_size": 16,
                "runtime": {"threads": 1, "progress": "off", **CPU},
            },
            "variants": {"bn": {"norm.name": "bn"}, "none": {"norm.name": "none"}},
            **extra,
        }
    )


def test_a_new_digits_study_records_flip_off_and_keeps_its_record(tmp_path):
    out = tmp_path / "study"
    plan = prepare(_digits_spec(), out)
    assert plan.spec.flip_defaults == {"digits": False}
    assert all(r.config.data.flip is False for r in plan.runs)
    out.mkdir()
    write_study_file(plan, {})
    saved = yaml.safe_load((out / "study.yaml").read_text())
    assert saved["flip_defaults"] == {"digits": False} and "flip" not in saved["base"]["data"]
    # the record, not the current default, decides when the study is planned again
    saved["flip_defaults"] = {"digits": True}
    (out / "study.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    again = prepare(_digits_spec(seeds=[0, 1]), out)
    assert again.spec.seeds == (0, 1) and all(r.config.data.flip is True for r in again.runs)
    # a variant that sets data.flip keeps its own value
    own = _digits_spec(variants={"bn": {"norm.name": "bn"}, "flip": {"data.flip": True}})
    plan = plan_study(own, tmp_path / "other")
    assert [r.config.data.flip for r in plan.runs] == [False, True]


def test_flip_decisions_are_per_source_and_do_not_follow_data_to_another_source(tmp_path):
    spec = _digits_spec(groups={"digits": {}, "cifar": {"data.name": "cifar10"}})
    plan = plan_study(spec, tmp_path / "mixed", runtime=CPU)
    assert plan.spec.flip_defaults == {"digits": False, "cifar10": True}
    assert {(r.group, r.config.data.flip) for r in plan.runs} == {
        ("digits", False),
        ("cifar", True),
    }
    # the frozen spec of a digits study, switched to CIFAR-10 with --data: CIFAR-10's default
    frozen = plan_study(_digits_spec(), tmp_path / "d", runtime=CPU).spec
    moved = with_overrides(spec_from_dict(spec_to_dict(frozen)), data="cifar10")
    assert all(r.config.data.flip is True for r in plan_study(moved, tmp_path / "c").runs)


@pytest.fixture
def legacy_study(tmp_path: Path) -> Path:
    dest = tmp_path / "legacy"
    shutil.copytree(LEGACY / "study", dest)
    return dest


def test_an_old_study_without_a_flip_record_resumes_and_grows_with_flips_on(legacy_study):
    assert "flip_defaults" not in (legacy_study / "study.yaml").read_text()
    # its report plans the old runs as they were made
    assert all(r.config.data.flip is True for r in load_study(legacy_study).plan.runs)
    spec = with_overrides(load_spec(legacy_study), seeds=[0, 1, 2])
    result = run_study(spec, legacy_study, executor="serial", stream=None)
    assert result.ok and result.count("completed") == 6
    for seed in (1, 2):  # the run that was missing, and a new seed
        saved = yaml.safe_load(
            (legacy_study / "runs" / "none" / f"seed-{seed}" / "config.yaml").read_text()
        )
        assert saved["data"]["flip"] is True
    # from now on the study records the decision it was made with
    assert yaml.safe_load((legacy_study / "study.yaml").read_text())["flip_defaults"] == {
        "digits": True
    }


def test_tiny_data_helper_leaves_flip_to_the_source():
    """The shared test data set does not set flip: tests train with synthetic's default (off)."""
    assert "flip" not in TINY_DATA and config_from_dict(tiny_base()).data.flip is False
