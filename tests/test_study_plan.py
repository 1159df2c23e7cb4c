"""Planning: groups x variants x seeds, overrides applied, one arithmetic for the whole study,
optional probes, and consistency with what a study directory already holds."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from normlab.config import config_to_dict
from normlab.engine.runtime import cpu_supports_bf16
from normlab.errors import ConfigError
from normlab.study.plan import freeze, plan_study, resolve_study_runtime
from normlab.study.runner import config_differences, prepare
from normlab.study.spec import load_spec, spec_from_dict, spec_to_dict


def spec_dict() -> dict:
    return {
        "name": "grid",
        "seeds": [0, 5],
        "baseline": "pre",
        "base": {
            "model": {"name": "resnet20"},
            "data": {"name": "synthetic", "synthetic_samples": 64},
            "epochs": 2,
            "batch_size": 16,
            "optim": {"lr": 0.1},
        },
        "groups": {
            "r20": {"model.name": "resnet20", "optim.lr": 0.05},
            "mlp": {"model.name": "mlp", "batch_size": 8},
        },
        "variants": {
            "pre": {"model.placement": "pre"},
            "post": {"model.placement": "post", "optim.lr": 0.01},
        },
    }


def test_runs_are_groups_x_variants_x_seeds_with_overrides(tmp_path):
    plan = plan_study(spec_from_dict(spec_dict()), tmp_path)
    assert [r.key for r in plan.runs] == [
        "r20/pre/seed-0",
        "r20/pre/seed-5",
        "r20/post/seed-0",
        "r20/post/seed-5",
        "mlp/pre/seed-0",
        "mlp/pre/seed-5",
        "mlp/post/seed-0",
        "mlp/post/seed-5",
    ]
    assert len({r.run_dir for r in plan.runs}) == 8
    run = plan.run("mlp/post/seed-5")
    assert run.run_dir == tmp_path / "runs" / "mlp" / "post" / "seed-5"
    c = run.config
    # base < group < variant
    assert c.model.name == "mlp" and c.batch_size == 8 and c.model.placement == "post"
    assert c.optim.lr == 0.01 and c.seed == 5 and c.epochs == 2
    assert plan.run("r20/pre/seed-0").config.optim.lr == 0.05
    assert plan.arms == [("r20", "pre"), ("r20", "post"), ("mlp", "pre"), ("mlp", "post")]


def test_a_study_without_groups_has_flat_run_directories(tmp_path):
    data = spec_dict()
    del data["groups"]
    plan = plan_study(spec_from_dict(data), tmp_path)
    assert [r.key for r in plan.runs][:2] == ["pre/seed-0", "pre/seed-5"]
    assert plan.runs[0].run_dir == tmp_path / "runs" / "pre" / "seed-0"


def test_arithmetic_is_resolved_once_for_the_whole_study(tmp_path):
    # resnet20 alone would train in bf16 on a bf16 CPU; mobilenetv2 picks fp32; the study
    # uses one precision for every run, the most precise.
    data = spec_dict()
    data["groups"]["mnv2"] = {"model.name": "mobilenetv2", "model.alpha": 0.25}
    plan = plan_study(spec_from_dict(data), tmp_path)
    precisions = {r.config.runtime.precision for r in plan.runs}
    formats = {r.config.runtime.memory_format for r in plan.runs}
    assert precisions == {"fp32"} and formats == {"channels_last"}
    assert {r.config.runtime.device for r in plan.runs} == {"cpu"}
    assert plan.runtime == {"device": "cpu", "precision": "fp32", "memory_format": "channels_last"}
    # without mobilenetv2 the choice is what resnet20 would make on this machine
    only = plan_study(spec_from_dict(spec_dict()), tmp_path)
    expected = "bf16" if cpu_supports_bf16() else "fp32"
    assert {r.config.runtime.precision for r in only.runs} == {expected}
    # an explicit setting in the base is kept; one in a variant is what is compared
    data = spec_dict()
    data["base"]["runtime"] = {"precision": "fp32"}
    data["variants"]["post"]["runtime.precision"] = "bf16"
    plan = plan_study(spec_from_dict(data), tmp_path)
    assert plan.run("r20/pre/seed-0").config.runtime.precision == "fp32"
    assert plan.run("r20/post/seed-0").config.runtime.precision == "bf16"


def test_a_network_that_cannot_be_built_is_named(tmp_path):
    data = spec_dict()
    data["variants"]["post"]["model.width"] = 3
    with pytest.raises(ConfigError, match=r"study 'grid', variant 'post' in group 'r20'"):
        resolve_study_runtime(spec_from_dict(data))


def test_freezing_writes_decisions_into_the_spec_and_is_idempotent(tmp_path):
    data = spec_dict()
    # a misspelt optional probe is an error (issue 11), not a probe silently left out
    data["optional_probes"] = ["weights", "no-such-probe"]
    with pytest.raises(ConfigError, match=r"optional_probes: .*unknown probe 'no-such-probe'"):
        freeze(spec_from_dict(data))
    data["optional_probes"] = ["weights"]
    spec = spec_from_dict(data)
    frozen, runtime, dropped = freeze(spec)
    assert dropped == []
    assert frozen.optional_probes == ()
    assert list(frozen.base["probes"]) == ["weights"]
    assert frozen.base["runtime"]["precision"] == runtime["precision"]
    again, runtime2, dropped2 = freeze(frozen)
    assert again == frozen and runtime2 == {} and dropped2 == []
    # the saved frozen spec plans to exactly the same configs
    reloaded = spec_from_dict(yaml.safe_load(yaml.safe_dump(spec_to_dict(frozen), sort_keys=False)))
    a = plan_study(spec, tmp_path)
    b = plan_study(reloaded, tmp_path)
    assert [r.config for r in a.runs] == [r.config for r in b.runs]
    assert all(r.config.probes == ("weights",) for r in a.runs)


def test_builtins_plan(tmp_path):
    for name in ("placement", "l2", "train-mode", "xbn", "batch-size"):
        spec = load_spec(name)
        plan = plan_study(
            spec,
            tmp_path / name,
            runtime={"device": "cpu", "precision": "fp32", "memory_format": "channels_last"},
        )
        groups = max(len(spec.groups), 1)
        assert len(plan.runs) == groups * len(spec.variants) * len(spec.seeds)
        assert len({r.run_dir for r in plan.runs}) == len(plan.runs)


def test_prepare_keeps_saved_decisions_adds_seeds_and_refuses_other_settings(tmp_path):
    spec = spec_from_dict(spec_dict())
    out = tmp_path / "study"
    first = prepare(spec, out)
    out.mkdir()
    (out / "study.yaml").write_text(yaml.safe_dump(spec_to_dict(first.spec), sort_keys=False))
    # a run directory made by the first plan
    run = first.runs[0]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(run.config)))
    # more seeds: the saved ones are kept, new ones appended
    more = prepare(dataclasses.replace(spec, seeds=(0, 9)), out)
    assert more.spec.seeds == (0, 5, 9)
    # different settings for an existing run: refused, naming the run and the key
    changed = spec_from_dict({**spec_dict(), "base": {**spec_dict()["base"], "epochs": 3}})
    with pytest.raises(ConfigError, match=r"r20/pre/seed-0 \(epochs: run has 2, study gives 3\)"):
        prepare(changed, out)
    other = spec_from_dict({**spec_dict(), "name": "other"})
    with pytest.raises(ConfigError, match="holds study 'grid', not 'other'"):
        prepare(other, out)


def test_config_differences_ignore_threads_and_progress():
    a = {"epochs": 2, "runtime": {"threads": 1, "progress": "off"}, "probes": ["w"]}
    b = {"epochs": 2, "runtime": {"threads": 4, "progress": "auto"}, "probes": ("w",)}
    assert config_differences(a, b) == []
    assert config_differences(a, {**b, "epochs": 3}) == ["epochs: run has 2, study gives 3"]


def test_a_setting_newer_than_the_run_counts_only_when_it_leaves_its_default():
    """A run made before normlab had model.init resumes under a study that leaves it at its
    default; asking for something else is a real difference."""
    from normlab.config import TrainConfig, config_to_dict

    planned = config_to_dict(TrainConfig())
    older = {**planned, "model": {k: v for k, v in planned["model"].items() if "init" not in k}}
    assert config_differences(older, planned) == []
    lsuv = {**planned, "model": {**planned["model"], "init": "lsuv"}}
    assert config_differences(older, lsuv) == ["model.init: run has None, study gives 'lsuv'"]
    # a key the run has but the study does not is always a difference
    assert config_differences(planned, older) != []
