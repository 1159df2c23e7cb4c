"""Budget ladders (issue 15, item 1): the spec's ``budgets`` axis and the report's reading of it."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import yaml
from _helpers import tiny_base

from normlab.errors import ConfigError
from normlab.report import write_report
from normlab.report.analysis import analyze
from normlab.report.budgets import Ladder, Rung, _trend, ladders
from normlab.report.data import load_study
from normlab.report.stats import compare
from normlab.study.runner import run_study
from normlab.study.spec import Budget, spec_from_dict, spec_to_dict


def _spec(**top):
    base = tiny_base()
    base["data"] = {**base["data"], "limit_train": 24}
    doc = {
        "name": "ladder",
        "seeds": 2,
        "base": base,
        "variants": {"bn": {}, "gn": {"norm.name": "gn"}},
        "budgets": {"x1": {}, "x4": {"epochs": 2, "train": 2}},
    }
    doc.update(top)
    return doc


def test_rungs_cross_the_groups_and_scale_every_arm_on_top_of_its_settings():
    spec = spec_from_dict(
        _spec(
            groups={"b8": {"batch_size": 8}, "b16": {"epochs": 3}},
            variants={"bn": {}, "long": {"epochs": 5}},
        )
    )
    assert spec.group_names == ["b8@x1", "b8@x4", "b16@x1", "b16@x4"]
    got = {
        (g, v): (c.epochs, c.data.limit_train, c.batch_size)
        for g in spec.group_names
        for v in spec.variant_names
        for c in [spec.arm_config(g, v)]
    }
    assert got[("b8@x1", "bn")] == (2, 24, 8)
    assert got[("b8@x4", "bn")] == (4, 48, 8)
    assert got[("b16@x4", "bn")] == (6, 48, 16)  # the group's 3 epochs, doubled
    assert got[("b16@x4", "long")] == (10, 48, 16)  # the variant's 5 epochs win, then doubled
    assert spec.split_group("b16@x4") == ("b16", Budget("x4", 2.0, 2.0))
    assert spec_from_dict(spec_to_dict(spec)) == spec  # study.yaml round trip


def test_without_groups_the_rungs_are_the_groups():
    spec = spec_from_dict(_spec())
    assert spec.group_names == ["x1", "x4"]
    assert spec.group("x4") is None and spec.split_group("x4")[1] == Budget("x4", 2.0, 2.0)


@pytest.mark.parametrize(
    ("budgets", "base_data", "message"),
    [
        ({"x4": {"train": 4}}, {"limit_train": None}, "data.limit_train, which is not set"),
        ({"x": {"epochs": 1.25}}, {}, "is not a whole number"),
        ({"x1": {}, "y": {"epochs": 1}}, {}, "budgets.y is the same budget as budgets.x1"),
        (
            {"x": {"steps": 2}},
            {},
            "unknown key 'budgets.x.steps'; known keys: epochs, train, eval_every",
        ),
        ({"x": {"epochs": 0}}, {}, "budgets.x.epochs must be a number > 0"),
        ({"a b": {}}, {}, "budgets name must be a name"),
        ([1, 4], {}, "budgets must be a mapping of rung name"),
    ],
)
def test_bad_budgets_are_named(budgets, base_data, message):
    doc = _spec(budgets=budgets)
    doc["base"]["data"].update(base_data)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec_from_dict(doc)


def _rung(name: str, diff: float, detected: bool) -> Rung:
    c = compare({0: 0.5, 1: 0.5}, {0: 0.5 + diff, 1: 0.5 + diff + 0.01})
    return Rung(Budget(name), replace(c, diff=diff, detected=detected))


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ([(+1, True), (+2, True), (+3, True)], "holds: claimed higher at every rung"),
        ([(-1, True), (-2, True)], "holds: claimed lower at every rung"),
        ([(+1, True), (-1, True)], "reverses (claimed higher at r0, lower at r1)"),
        (
            [(+1, False), (+2, True), (+3, True)],
            "appears as the budget grows: claimed higher from r1 on",
        ),
        (
            [(-3, True), (-1, False), (0.1, False)],
            "fades as the budget grows: claimed lower up to r0 only",
        ),
        ([(+1, True), (+1, False), (+1, True)], "claimed higher at r0, r2 only"),
        ([(+1, False), (-1, False)], "not detected at any rung"),
    ],
)
def test_the_trend_reads_only_the_claims(pattern, expected):
    rungs = tuple(_rung(f"r{i}", d / 100, claimed) for i, (d, claimed) in enumerate(pattern))
    assert _trend(rungs) == expected


def test_a_rung_says_what_it_multiplies():
    assert Budget("x1").multipliers() == "the base budget"
    assert Budget("x4", epochs=4).multipliers() == "4x epochs"
    assert Budget("x16", train=16).multipliers() == "16x training images"
    assert Budget("x4", 2, 2).multipliers(" / ") == "2x epochs / 2x training images"


def test_the_ladder_figure_labels_each_rung_with_what_it_multiplies():
    """An epochs ladder's x4 is not 4x the training images (the figure once said so)."""
    from normlab.report.figures import ladder_figures

    rungs = (
        Rung(Budget("x1"), _rung("x1", 0.01, True).comparison),
        Rung(Budget("x4", epochs=4), _rung("x4", 0.02, True).comparison),
        Rung(Budget("x16", train=16), _rung("x16", 0.03, True).comparison),
    )
    ((_, fig),) = ladder_figures([Ladder(None, "gn", "bn", rungs, "holds", None)])
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["x1\nthe base budget", "x4\n4x epochs", "x16\n16x training images"]


@pytest.mark.slow
def test_a_ladder_study_runs_to_a_report_with_every_rung_in_one_family(tmp_path):
    out = tmp_path / "study"
    # the top rung validates only at epochs 3 and 4 (eval_every): the report reads it as usual
    doc = _spec(budgets={"x1": {}, "x4": {"epochs": 2, "train": 2, "eval_every": 3}})
    result = run_study(spec_from_dict(doc), out, jobs=2, stream=None)
    assert result.ok and result.count("completed") == 8
    cfg = yaml.safe_load((out / "runs" / "x4" / "gn" / "seed-1" / "config.yaml").read_text())
    assert (cfg["epochs"], cfg["data"]["limit_train"], cfg["eval_every"]) == (4, 48, 3)
    write_report(out)
    analysis = analyze(load_study(out))
    finals = [gc for gc in analysis.comparisons if gc.metric == "final"]
    assert sorted(gc.group for gc in finals) == ["x1", "x4"]
    assert {gc.comparison.family_size for gc in finals} == {2}  # both rungs, one family
    (lad,) = ladders(analysis)
    assert isinstance(lad, Ladder) and [r.budget.name for r in lad.rungs] == ["x1", "x4"]
    # the change in size is the per-seed difference of the two rungs' paired effects
    x1 = {
        s: analysis.arm("x1", "gn").values["final"][s] - analysis.arm("x1", "bn").values["final"][s]
        for s in (0, 1)
    }
    x4 = {
        s: analysis.arm("x4", "gn").values["final"][s] - analysis.arm("x4", "bn").values["final"][s]
        for s in (0, 1)
    }
    assert lad.change is not None
    assert lad.change.diff == pytest.approx(sum(x4[s] - x1[s] for s in (0, 1)) / 2)
    md = (out / "report.md").read_text()
    assert "## Along the budget ladder" in md and "gn − bn" in md
    assert "the effect changes by" in md and "from x1 to x4" in md
    assert "Budget ladder (x1: epochs x1, training images x1; x4: epochs x2" in md
    assert "validated every 3 epochs" in md
    assert "no finite validation accuracy" not in md
    assert "Along the budget ladder" in (out / "report.html").read_text()
    assert any(p.name.startswith("ladder-") for p in (out / "figures").iterdir())


def test_a_rung_can_run_some_groups_only():
    doc = _spec(
        groups={"b8": {"batch_size": 8}, "b16": {}},
        budgets={"x1": {}, "x4": {"epochs": 2, "groups": ["b8"]}},
    )
    spec = spec_from_dict(doc)
    assert spec.group_names == ["b8@x1", "b8@x4", "b16@x1"]
    assert spec_from_dict(spec_to_dict(spec)) == spec
    assert spec_to_dict(spec)["budgets"]["x4"]["groups"] == ["b8"]
    assert "groups" not in spec_to_dict(spec)["budgets"]["x1"]


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        (["b9"], "budgets.x4.groups: no group 'b9'; groups: b8, b16"),
        ([], "budgets.x4.groups must be a list of distinct group names"),
        (["b8", "b8"], "budgets.x4.groups must be a list of distinct group names"),
        ("b8", "budgets.x4.groups must be a list of distinct group names"),
    ],
)
def test_bad_rung_groups_are_named(groups, message):
    doc = _spec(
        groups={"b8": {"batch_size": 8}, "b16": {}},
        budgets={"x1": {}, "x4": {"groups": groups, "epochs": 2}},
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        spec_from_dict(doc)


def test_a_rung_of_a_study_without_groups_cannot_name_groups():
    with pytest.raises(ConfigError, match=re.escape("no group 'a'; groups: (none")):
        spec_from_dict(_spec(budgets={"x1": {}, "x4": {"epochs": 2, "groups": ["a"]}}))


@pytest.mark.slow
def test_a_group_run_at_one_rung_only_is_reported_without_a_ladder(tmp_path):
    out = tmp_path / "study"
    doc = _spec(
        seeds=2,
        groups={"b8": {"batch_size": 8}, "b16": {}},
        budgets={"x1": {}, "x4": {"epochs": 2, "groups": ["b8"]}},
    )
    result = run_study(spec_from_dict(doc), out, jobs=2, stream=None)
    assert result.ok and result.count("completed") == 12  # 3 run groups x 2 arms x 2 seeds
    assert not (out / "runs" / "b16@x4").exists()
    write_report(out)
    analysis = analyze(load_study(out))
    finals = sorted(gc.group for gc in analysis.comparisons if gc.metric == "final")
    assert finals == ["b16@x1", "b8@x1", "b8@x4"]
    assert [(lad.group, [r.budget.name for r in lad.rungs]) for lad in ladders(analysis)] == [
        ("b8", ["x1", "x4"])
    ]
    md = (out / "report.md").read_text()
    assert "groups b8 only" in md and "runs are unfinished" not in md
