"""Multi-process runs in studies: the ``devices`` key (validation, planning, study.yaml), a
tiny 2-process study end to end through the local executor, and the built-in ``sync-bn``."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from _helpers import tiny_base

from normlab.errors import ConfigError
from normlab.report import write_report
from normlab.store import RunDir
from normlab.study.executors import RUN_INFO, RunTask, devices_command
from normlab.study.plan import plan_study
from normlab.study.runner import run_study
from normlab.study.spec import load_spec, spec_from_dict, spec_to_dict, with_overrides

torch.set_num_threads(1)


def spec_dict(**top) -> dict:
    return {
        "name": "tiny-ddp",
        "seeds": 1,
        "base": tiny_base(model={"name": "mlp", "hidden": [16]}, epochs=1),
        "variants": {"local": {"sync_bn": False}, "sync": {"sync_bn": True}},
        **top,
    }


def test_devices_default_and_precedence():
    spec = spec_from_dict(
        {
            **spec_dict(devices=2),
            "groups": {"a": {"batch_size": 16}, "b": {"batch_size": 8, "devices": 4}},
            "variants": {"local": {}, "sync": {"sync_bn": True}, "one": {"devices": 1}},
        }
    )
    assert spec.devices == 2
    assert spec.arm_devices("a", "local") == 2
    assert spec.arm_devices("b", "local") == 4
    assert spec.arm_devices("b", "one") == 1  # the variant wins over the group
    assert spec_from_dict({**spec_dict(), "variants": {"v": {}}}).devices == 1
    # base.devices is the same setting as the top-level key
    data = spec_dict()
    data["base"]["devices"] = 2
    assert spec_from_dict(data).devices == 2
    # the round trip through study.yaml keeps every level's devices
    again = spec_from_dict(spec_to_dict(spec))
    assert again == spec


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"devices": 0}, "devices must be an integer >= 1"),
        ({"devices": "two"}, "devices must be an integer >= 1"),
        ({"devices": True}, "devices must be an integer >= 1"),
        ({"variants": {"v": {"devices": -1}}}, "variants.v.devices must be an integer >= 1"),
        ({"groups": {"g": {"set": {"devices": 1.5}}}}, "groups.g.devices must be an integer"),
        ({"devices": 3}, "batch_size 16 is the global batch and must be divisible by devices (3)"),
        ({"devices": 1}, "variants.sync: sync_bn: true needs devices >= 2"),
    ],
)
def test_bad_devices_name_the_key(change, message):
    with pytest.raises(ConfigError, match=r"^study\.yaml: ") as info:
        spec_from_dict({**spec_dict(devices=2), **change}, source="study.yaml")
    assert message in str(info.value)


def test_base_and_top_level_devices_must_agree():
    data = spec_dict(devices=2)
    data["base"]["devices"] = 4
    with pytest.raises(ConfigError, match=r"base.devices \(4\) and the top-level devices \(2\)"):
        spec_from_dict(data)


def test_command_line_devices_and_plan(tmp_path):
    spec = with_overrides(spec_from_dict(spec_dict(devices=2)), overrides={"devices": 4})
    assert spec.devices == 4
    plan = plan_study(spec, tmp_path)
    assert [(r.key, r.devices) for r in plan.runs] == [("local/seed-0", 4), ("sync/seed-0", 4)]
    assert spec_to_dict(plan.spec)["devices"] == 4
    with pytest.raises(ConfigError, match="--set devices must be an integer >= 1"):
        with_overrides(spec, overrides={"devices": 0})
    task = RunTask("local/seed-0", plan.runs[0].config, str(plan.runs[0].run_dir), devices=4)
    cmd = devices_command(task, tmp_path / "c.yaml", resume=True)
    assert cmd[-8:] == [
        "--config", str(tmp_path / "c.yaml"), "--devices", "4",
        "--out", str(plan.runs[0].run_dir), "--resume", "--quiet",
    ]  # fmt: skip


def test_builtin_sync_bn_loads_and_plans(tmp_path):
    spec = load_spec("sync-bn")
    assert spec.baseline == "local-bn"
    assert spec.devices == 2
    plan = plan_study(spec, tmp_path, runtime={"device": "cpu"})
    by_arm = {(r.group, r.variant): r for r in plan.runs if r.seed == 0}
    for per_device in (2, 4, 8, 16, 32):
        run = by_arm[(f"pd{per_device}", "sync-bn")]
        assert run.devices == 2
        assert run.config.batch_size == 2 * per_device
        assert run.config.sync_bn
        assert run.config.optim.lr == pytest.approx(0.1 * 2 * per_device / 128)
    local = by_arm[("pd2", "local-bn")].config
    assert not local.sync_bn and local.dist_bn == "reduce" and local.norm.name == "bn"
    gn = by_arm[("pd2", "gn")].config
    assert gn.norm.name == "gn" and gn.norm.gn_groups == 8 and not gn.sync_bn


@pytest.mark.slow
def test_two_process_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    result = run_study(spec_from_dict(spec_dict(devices=2)), out, jobs=2, stream=None)
    assert result.ok, {k: (r.status, r.reason) for k, r in result.runs.items()}
    saved = yaml.safe_load((out / "study.yaml").read_text())
    assert saved["devices"] == 2
    for run in result.plan.runs:
        rd = RunDir(run.run_dir)
        config = yaml.safe_load(rd.config_path.read_text())
        assert config["meta"]["world_size"] == 2
        assert config["sync_bn"] == (run.variant == "sync")
        assert len(rd.read_metrics()) == 1
        info = json.loads((run.run_dir / RUN_INFO).read_text())
        assert info["devices"] == 2 and info["n_val"] == 16 and info["variant"] == run.variant
    assert write_report(out)["html"].is_file()
    # a finished study is skipped, not trained again
    before = [RunDir(r.run_dir).read_metrics() for r in result.plan.runs]
    again = run_study(spec_from_dict(spec_dict(devices=2)), out, stream=None)
    assert again.ok
    assert [RunDir(r.run_dir).read_metrics() for r in result.plan.runs] == before
