"""The findings' re-judged tables are what their scripts compute now from the committed data.

docs/findings/rejudged.md and checks.md are generated from committed results.csv files by
docs/findings/rejudge.py and checks.py under the report's current rule. If the rule or the
statistics change, these tests fail until the tables are regenerated (and docs/findings.md
reread against them), so the page cannot silently rest on an older rule.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

FINDINGS = Path(__file__).resolve().parents[1] / "docs" / "findings"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"findings_{name}", FINDINGS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("script", "output"), [("rejudge", "rejudged.md"), ("checks", "checks.md")]
)
def test_committed_tables_match_their_script(script: str, output: str) -> None:
    committed = (FINDINGS / output).read_text(encoding="utf-8")
    assert _script(script).render() == committed, (
        f"docs/findings/{output} is stale: run `python docs/findings/{script}.py` and reread "
        "docs/findings.md against it"
    )


def test_depth_thirds_reproduce_the_report_table() -> None:
    """checks.py orders layers as the report does: its epoch-1 thirds are the report's."""
    checks = _script("checks")
    rows = [r for r in checks.read_rows("batch-size-mobilenetv2") if r["group"] == "bs128"]
    runs = checks.per_run(rows, checks.epoch(1))
    bn = [checks.layer_thirds(r, "bn/shift/var/") for (_, v, _), r in runs.items() if v == "bn"]
    first = sum(t[0] for t in bn) / len(bn)
    last = sum(t[1] for t in bn) / len(bn)
    # docs/findings/batch-size-mobilenetv2/report.md: 0.406 and 1.101 at epoch 1
    assert (round(first, 3), round(last, 3)) == (0.406, 1.101)


def test_the_ladder_specs_extend_the_findings_with_the_rungs_issue_15_asks_for() -> None:
    from normlab.study.spec import load_spec

    ladders = {
        p.stem: load_spec(p) for p in sorted((FINDINGS / "specs" / "ladders").glob("*.yaml"))
    }
    assert set(ladders) == {"batch-size", "placement", "l2", "train-mode"}
    for name, spec in ladders.items():
        assert spec.name == f"ladder-{name}" and len(spec.seeds) >= 6
        assert [b.name for b in spec.budgets][:2] == ["x1", "x4"]
        for g in spec.group_names:
            arm = spec.arm_config(g, spec.baseline)
            assert arm.data.limit_val == 10000
            # the same arithmetic on every session's machine (auto is bf16 where AMX is)
            assert arm.runtime.precision == "fp32"
    bs = ladders["batch-size"]
    assert [b.name for b in bs.budgets] == ["x1", "x4", "x16"]
    assert sorted({bs.arm_config(g, "gn").batch_size for g in bs.group_names}) == [8, 32, 128]
    assert bs.arm_config("bs8@x16", "gn").data.limit_train == 48000
    assert set(ladders["placement"].declared_groups) == {"resnet20", "mobilenetv2"}
    assert set(ladders["l2"].variant_names) == {"bn-only", "bn+l2"}
    assert ladders["l2"].arm_config("x4", "bn+l2").epochs == 32
    assert ladders["train-mode"].arm_config("x4", "keras-0.99").epochs == 16
    assert set(ladders["train-mode"].variant_names) == {
        "correct",
        "stats-never-updated",
        "keras-0.99",
        "keras-0.999",
    }
