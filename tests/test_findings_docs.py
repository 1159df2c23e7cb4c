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
