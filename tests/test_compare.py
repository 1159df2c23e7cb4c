"""``normlab compare`` and ``normlab.compare``: a long table from any framework judged by the
study report's rule. The oracle: a CSV of a real study's per-seed accuracies gives exactly the
report's comparisons. Then each bad input's one named error, the warnings, and the formats."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from _helpers import tiny_base

import normlab
from normlab.cli import main
from normlab.errors import ConfigError, DataError
from normlab.report.analysis import analyze
from normlab.report.compare import (
    MAX_VALUE,
    arms_table,
    compare_table,
    load_table,
    render_html,
    render_json,
    render_markdown,
    render_text,
)
from normlab.report.data import load_study
from normlab.report.tables import comparisons_table, markdown_table, verdict_table
from normlab.study.runner import run_study
from normlab.study.spec import spec_from_dict

torch.set_num_threads(1)

# three arms in two groups, and an extra pair: the family spans groups and references
SPEC = {
    "name": "tiny-compare",
    "description": "three normalizations at two learning rates, on a tiny synthetic task",
    "seeds": 3,
    "baseline": "bn",
    "base": tiny_base(model={"name": "mlp"}),
    "variants": {
        "bn": {"norm.name": "bn"},
        "gn": {"norm.name": "gn", "norm.gn_groups": 8},
        "none": {"norm.name": "none"},
    },
    "groups": {"lr05": {"optim.lr": 0.05}, "lr2": {"optim.lr": 0.2}},
    "comparisons": [["gn", "none"]],
}
METRICS = {"final": "final/val/acc", "best": "best/val/acc"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "study"
    assert run_study(spec_from_dict(SPEC), out, executor="serial", stream=None).ok
    data = load_study(out)
    return data, analyze(data)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)  # floats as repr: they read back exactly
    return path


def study_rows(data, metrics=("final",)) -> list[dict]:
    return [
        {
            "group": r.group,
            "arm": r.variant,
            "seed": r.seed,
            "metric": f"{m} val acc",
            "value": r.summary[METRICS[m]],
        }
        for m in metrics
        for r in data.runs
        if r.status == "completed"
    ]


def by_pair(comparisons, metric):
    return {
        (gc.group, gc.comparison.variant, gc.comparison.baseline): gc
        for gc in comparisons
        if gc.metric == metric
    }


# ---- the oracle --------------------------------------------------------------------------


def test_a_study_as_a_csv_gets_the_reports_comparisons_exactly(study, tmp_path, capsys):
    data, analysis = study
    columns = ["group", "arm", "seed", "metric", "value"]
    path = write_csv(tmp_path / "runs.csv", study_rows(data, ("final", "best")), columns)
    code = main(["compare", str(path), "--pair", "gn:none", "--json", str(tmp_path / "o.json")])
    assert code == 0
    shown = capsys.readouterr().out
    result = compare_table(path, pairs=["gn:none"])
    assert result.baseline == "bn" and not result.baseline_given  # the first arm in the file

    report = by_pair(analysis.comparisons, "final")
    ours = by_pair(result.comparisons, "final val acc")
    assert ours.keys() == report.keys() and len(ours) == 6
    for key, gc in report.items():
        c, mine = gc.comparison, ours[key].comparison
        assert mine.seeds == c.seeds
        assert mine.diff == c.diff and mine.sd_diff == c.sd_diff
        assert mine.t_ci == c.t_ci and mine.bootstrap_ci == c.bootstrap_ci
        assert mine.p_value == c.p_value
        assert mine.p_adjusted == c.p_adjusted and mine.family_size == c.family_size == 6
        assert mine.seeds_needed == c.seeds_needed and mine.detected == c.detected
        assert mine.verdict == c.verdict
        assert " ".join(mine.verdict.split()) in " ".join(shown.split())  # printed, wrapped
    assert any(c.comparison.p_adjusted != c.comparison.p_value for c in report.values())
    # the printed table is the report's table: the same cells, row for row (but the metric's
    # name: the report says "final")
    headers, study_rows_ = comparisons_table(analysis)
    assert verdict_table([ours[key] for key in report], pairs=True)[0] == headers
    mine = verdict_table([ours[key] for key in report], pairs=True)[1]
    final = [row for row in study_rows_ if row[2] == "final"]
    # every cell but the metric's name and the seeds x images interval, which needs the runs'
    # per-image predictions: the study has them, a table of per-seed values cannot
    images = headers.index("seeds × images 95% CI")

    def cells(row: list[str]) -> list[str]:
        return [x for i, x in enumerate(row) if i not in (2, images)]

    assert [cells(row) for row in final] == [cells(row) for row in mine]

    # the JSON written by the command holds the same numbers
    saved = json.loads((tmp_path / "o.json").read_text())
    row = next(
        x for x in saved["comparisons"] if (x["group"], x["variant"], x["metric"]) == (
            "lr2", "gn", "final val acc"
        ) and x["reference"] == "bn"
    )  # fmt: skip
    c = report["lr2", "gn", "bn"].comparison
    assert row["p_value"] == c.p_value and row["p_adjusted"] == c.p_adjusted
    assert row["t_ci"] == list(c.t_ci) and row["verdict"] == c.verdict

    # best-epoch accuracy: the same raw tests, but judged as its own family (the study
    # reports it as descriptive only)
    best_report = by_pair(analysis.comparisons, "best")
    best = by_pair(result.comparisons, "best val acc")
    for key, gc in best_report.items():
        assert best[key].comparison.p_value == gc.comparison.p_value
        assert best[key].comparison.family_size == 6 and not best[key].comparison.descriptive
    assert set(result.families) == {"final val acc", "best val acc"}
    assert "each metric is its own family" in " ".join(shown.split())


def test_each_metric_is_its_own_family(study, tmp_path):
    """The final-epoch verdicts do not change when another metric shares the file, nor when
    the table has no metric column at all."""
    data, _ = study
    both = compare_table(study_rows(data, ("final", "best")), pairs=[("gn", "none")])
    alone = study_rows(data)
    for row in alone:
        del row["metric"]
    plain = compare_table(alone, pairs=[("gn", "none")])
    assert plain.table.metrics == ("value",)
    ours = by_pair(both.comparisons, "final val acc")
    for key, gc in by_pair(plain.comparisons, "value").items():
        a, b = gc.comparison, ours[key].comparison
        assert (a.p_value, a.p_adjusted, a.t_ci, a.bootstrap_ci) == (
            b.p_value,
            b.p_adjusted,
            b.t_ci,
            b.bootstrap_ci,
        )


# ---- small tables ------------------------------------------------------------------------

# gn is clearly lower than bn on every one of 6 seeds; ln is noise around bn
GOOD = """arm,seed,value
bn,0,0.91
bn,1,0.92
bn,2,0.905
bn,3,0.915
bn,4,0.913
bn,5,0.918
gn,0,0.89
gn,1,0.90
gn,2,0.888
gn,3,0.899
gn,4,0.893
gn,5,0.90
ln,0,0.905
ln,1,0.925
ln,2,0.90
ln,3,0.915
ln,4,0.92
ln,5,0.91
"""


def table(tmp_path: Path, text: str, name: str = "runs.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_detected_difference_exits_0_and_says_which_baseline(tmp_path, capsys):
    path = table(tmp_path, GOOD)
    assert main(["compare", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "baseline: bn (the first arm in the table; choose another with --baseline or "
        "baseline=)" in out
    )
    result = compare_table(path)
    gn, ln = (gc.comparison for gc in result.comparisons)
    assert gn.detected and gn.verdict.startswith("gn is lower than bn by 1.9 points")
    assert not ln.detected and gn.family_size == ln.family_size == 2
    assert main(["compare", str(path), "--baseline", "gn"]) == 0
    out = capsys.readouterr().out
    assert "baseline: gn\n" in out and "bn − gn" in out


def test_python_rows_equal_the_csv(tmp_path):
    path = table(tmp_path, GOOD)
    rows = [
        {"Arm": r["arm"], "SEED": int(r["seed"]), "value": float(r["value"])}
        for r in csv.DictReader(GOOD.splitlines())
    ]
    a, b = normlab.compare(path, baseline="ln"), normlab.compare(rows, baseline="ln")
    assert a.source == str(path) and b.source == "rows"
    assert [gc.comparison for gc in a.comparisons] == [gc.comparison for gc in b.comparisons]


def test_what_the_reader_forgives(tmp_path):
    """Header case and spaces, a byte-order mark, extra columns, blank and empty rows, quoted
    cells, seeds written 3.0 (pandas), an empty group cell (no group)."""
    text = "\ufeff Arm ,Seed,notes,VALUE,group\n" + "".join(
        f'"{arm}",{seed}.0,"x, y",{value},\n\n,,,,\n'
        for arm, seed, value in [("a", 0, 1), ("a", 1, 2), ("a", 2, 3), ("b", 0, 2), ("b", 1, 2)]
    )
    path = tmp_path / "forgiving.csv"
    path.write_text(text, encoding="utf-8")
    t = load_table(path)
    assert t.arms == ("a", "b") and t.groups == (None,) and t.rows == 5
    assert t.values["value"][None, "a"] == {0: 1.0, 1: 2.0, 2: 3.0}


def test_a_pair_whose_arm_names_hold_colons(tmp_path):
    path = table(tmp_path, "arm,seed,value\nlr:0.1,0,1\nlr:0.1,1,2\nb,0,1\nb,1,3\nc,0,2\nc,1,2\n")
    result = compare_table(path, baseline="c", pairs=["lr:0.1:b"])
    assert result.pairs == (("lr:0.1", "b"),)
    assert [(gc.comparison.variant, gc.comparison.baseline) for gc in result.comparisons] == [
        ("lr:0.1", "c"),
        ("b", "c"),
        ("lr:0.1", "b"),
    ]


# ---- warnings ------------------------------------------------------------------------------


def test_seeds_only_one_arm_has_are_named_and_left_out(tmp_path, capsys):
    path = table(tmp_path, GOOD + "gn,6,0.9\ngn,7,0.9\nbn,9,0.9\n")
    assert main(["compare", str(path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "normlab compare: warning: gn vs bn: seeds 6, 7 only in gn and seed 9 only in bn; "
        "compared on the 6 common seeds",
        "normlab compare: warning: ln vs bn: seed 9 only in bn; compared on the 6 common seeds",
    ]
    gn = compare_table(path).comparisons[0].comparison
    assert gn.seeds == (0, 1, 2, 3, 4, 5)


def test_an_arm_missing_from_a_group_is_not_compared_there(tmp_path):
    text = "group,arm,seed,value\n" + "".join(
        f"{g},{a},{s},{0.5 + 0.01 * s + (a == 'b') * 0.1}\n"
        for g, arms in (("g1", "abc"), ("g2", "ab"))
        for a in arms
        for s in range(3)
    )
    result = compare_table(table(tmp_path, text))
    assert result.warnings == ["group 'g2': no rows for arm 'c', so c vs a not compared there"]
    assert [(gc.group, gc.comparison.variant) for gc in result.comparisons] == [
        ("g1", "b"),
        ("g1", "c"),
        ("g2", "b"),
    ]
    assert result.comparisons[0].comparison.family_size == 3  # one family over the groups


# ---- errors: one named error each ----------------------------------------------------------

FOUND = "(a long table has one row per run: arm, seed, value, optionally group, metric)"

BAD_TABLES = {
    "empty file": (
        "",
        "{p}: empty file; expected a header line (arm,seed,value, optionally group and metric) "
        "and one row per run",
    ),
    "header only": (
        "arm,seed,value\n\n",
        "{p}: no rows after the header (expected one row per run)",
    ),
    "missing columns": (
        "run,Seed,acc\nx,0,1\n",
        f"{{p}}: missing required columns arm, value; found 'run', 'Seed', 'acc' {FOUND}",
    ),
    "tab-separated": (
        "arm\tseed\tvalue\na\t0\t1\n",
        f"{{p}}: missing required columns arm, seed, value; found 'arm\\tseed\\tvalue' {FOUND}; "
        "the header looks tab-separated, and normlab reads comma-separated files",
    ),
    "column twice": ("arm,seed,value,Arm\n", "{p}: the header names column 'arm' twice"),
    "a field too many": (
        "arm,seed,value\na,0,0,93\n",
        "{p}, line 2: 4 fields, but the header (line 1) has 3 (a decimal comma, or a comma "
        "inside an unquoted name?)",
    ),
    "a field too few": (
        "arm,seed,value\na,0\n",
        "{p}, line 2: 2 fields, but the header (line 1) has 3",
    ),
    "non-numeric value": (
        "arm,seed,value\na,0,0.5\nb,0,0.4\n\nb,1,abc\n",
        "{p}, line 5: value 'abc' is not a number (arm 'b', seed 1)",
    ),
    "empty value": (
        "arm,seed,value\na,0,\n",
        "{p}, line 2: empty value (arm 'a', seed 0); leave out the row of a run that has no value",
    ),
    "non-finite value": (
        "arm,seed,value\na,0,nan\n",
        "{p}, line 2: value 'nan' is not a finite number (arm 'a', seed 0)",
    ),
    "huge value": (
        "arm,seed,value\na,0,-1e200\n",
        f"{{p}}, line 2: value '-1e200' is beyond +-{MAX_VALUE:g} (arm 'a', seed 0), where the "
        "statistics would overflow; rescale the metric",
    ),
    "non-integer seed": (
        "arm,seed,value\na,1.5,0.5\n",
        "{p}, line 2: seed '1.5' is not an integer",
    ),
    "seed that is a word": (
        "arm,seed,value\na,first,0.5\n",
        "{p}, line 2: seed 'first' is not an integer",
    ),
    "empty seed": ("arm,seed,value\na,,0.5\n", "{p}, line 2: empty seed"),
    "empty arm": ("arm,seed,value\n ,0,0.5\n", "{p}, line 2: empty arm"),
    "empty metric": (
        "arm,seed,value,metric\na,0,0.5,\n",
        "{p}, line 2: empty metric (every row must name its metric)",
    ),
    "duplicate (arm, seed)": (
        "arm,seed,value\na,0,0.5\nb,0,0.5\na,0,0.6\n",
        "{p}, line 4: a second row for arm 'a', seed 0 (the first is at line 2); each (arm, seed) "
        "must appear once",
    ),
    "duplicate (group, arm, seed, metric)": (
        "group,arm,seed,metric,value\ng,a,0,acc,0.5\ng,a,0,loss,0.5\ng,a,0,acc,0.6\n",
        "{p}, line 4: a second row for arm 'a', seed 0, group 'g', metric 'acc' (the first is at "
        "line 2); each (group, arm, seed, metric) must appear once",
    ),
    "one arm only": (
        "arm,seed,value\nbn,0,0.5\nbn,1,0.6\n",
        "{p}: only one arm ('bn'); a comparison needs at least two",
    ),
    "no common seed": (
        "arm,seed,value\na,0,0.5\na,1,0.6\nb,10,0.5\nb,11,0.6\n",
        "{p}: b and a share no seed (b: seeds 10, 11; a: seeds 0, 1); runs are paired by seed, "
        "so they cannot be compared",
    ),
    "nothing to compare": (
        "group,arm,seed,value\ng1,a,0,0.5\ng2,b,0,0.5\n",
        "{p}: nothing to compare: no group holds two of the arms that are compared",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TABLES), ids=list(BAD_TABLES))
def test_a_bad_table_is_one_named_error(case, tmp_path, capsys):
    text, expected = BAD_TABLES[case]
    path = table(tmp_path, text)
    message = expected.format(p=path)
    with pytest.raises(DataError) as info:
        compare_table(path)
    assert str(info.value) == message
    assert main(["compare", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"normlab compare: error: {message}\n" and not captured.out


def test_a_missing_file_a_directory_and_binary_data(tmp_path):
    cases = {
        tmp_path / "nope.csv": "{p}: no such file (expected a CSV table of arm, seed, value)",
        tmp_path: "{p}: is a directory, expected a CSV file",
    }
    (tmp_path / "binary.csv").write_bytes(b"arm,seed,value\n\xff\xfe\x00\x01")
    cases[tmp_path / "binary.csv"] = "{p}: not a CSV file: byte 15 is not UTF-8 text (binary data?)"
    (tmp_path / "nul.csv").write_bytes(b"arm,seed,value\na,0\x00,1\n")
    cases[tmp_path / "nul.csv"] = "{p}: not a CSV file: it holds NUL bytes (binary data?)"
    for path, expected in cases.items():
        with pytest.raises(DataError) as info:
            compare_table(path)
        assert str(info.value) == expected.format(p=path)


BAD_ARGUMENTS = {
    "unknown baseline": (
        {"baseline": "xbn"},
        "baseline 'xbn' is not an arm of {p}; its arms: bn, gn, ln",
    ),
    "unknown pair arm": (
        {"pairs": ["gn:xbn"]},
        "pair 'gn:xbn': 'xbn' is not an arm of {p}; its arms: bn, gn, ln",
    ),
    "pair without a colon": ({"pairs": ["gn"]}, "pair 'gn': expected VARIANT:REFERENCE"),
    "pair with itself": ({"pairs": ["gn:gn"]}, "pair 'gn:gn' compares 'gn' with itself"),
    "pair with the baseline": (
        {"pairs": ["gn:bn"]},
        "pair 'gn:bn': every arm is compared with the baseline 'bn' already",
    ),
    "pair twice": ({"pairs": ["gn:ln", "gn:ln"]}, "pair 'gn:ln' is given twice"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS), ids=list(BAD_ARGUMENTS))
def test_an_unknown_arm_names_the_known_ones(case, tmp_path, capsys):
    kwargs, expected = BAD_ARGUMENTS[case]
    path = table(tmp_path, GOOD)
    message = expected.format(p=path)
    with pytest.raises(ConfigError) as info:
        compare_table(path, **kwargs)
    assert str(info.value) == message
    argv = ["compare", str(path)]
    argv += ["--baseline", kwargs["baseline"]] if "baseline" in kwargs else []
    argv += [x for pair in kwargs.get("pairs", []) for x in ("--pair", pair)]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"normlab compare: error: {message}\n"


def test_output_paths_are_checked_before_anything_is_written(tmp_path, capsys):
    path = table(tmp_path, GOOD)
    cases = {
        ("--md", "-", "--json", "-"): "--md and --json both write to standard output (-); give "
        "all but one of them a file",
        ("--md", str(path)): f"--md {path} is the input table; write to another file",
        ("--md", str(tmp_path / "x"), "--html", str(tmp_path / "x")): (
            f"--md and --html both write {tmp_path / 'x'}"
        ),
        ("--json", str(tmp_path)): f"--json {tmp_path}: is a directory (expected the name of a "
        "file to write)",
    }
    for flags, message in cases.items():
        assert main(["compare", str(path), *flags]) == 2
        captured = capsys.readouterr()
        assert captured.err == f"normlab compare: error: {message}\n" and not captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv"]


# ---- the formats -----------------------------------------------------------------------------

GROUPED = "group,metric,arm,seed,value\n" + "".join(
    f"{g},{m},{a},{s},{base + (0.02 if a == 'gn' else 0.0) + 0.003 * ((s + 1) * (ord(a[0]) % 7 + 1) % 7)}\n"
    for g in ("cifar", "svhn")
    for m, base in (("acc", 0.8), ("loss", 0.6))
    for a in ("bn", "gn", "ln")
    for s in range(6)
)


def test_json_parses_and_holds_every_number(tmp_path, capsys):
    path = table(tmp_path, GROUPED)
    assert main(["compare", str(path), "--pair", "gn:ln", "--json", "-"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # nothing else on stdout
    result = compare_table(path, pairs=["gn:ln"])
    assert doc == json.loads(render_json(result))
    assert doc["baseline"] == "bn" and doc["baseline_chosen"] == "the first arm in the table"
    assert doc["metrics"] == ["acc", "loss"] and doc["groups"] == ["cifar", "svhn"]
    assert doc["families"]["acc"]["size"] == doc["families"]["loss"]["size"] == 6
    assert len(doc["comparisons"]) == len(result.comparisons) == 12
    for row, gc in zip(doc["comparisons"], result.comparisons, strict=True):
        c = gc.comparison
        assert (row["metric"], row["group"], row["variant"], row["reference"]) == (
            gc.metric,
            gc.group,
            c.variant,
            c.baseline,
        )
        assert row["seeds"] == list(c.seeds) and row["n"] == c.n
        for key, value in {
            "reference_mean": c.baseline_mean,
            "variant_mean": c.variant_mean,
            "diff": c.diff,
            "sd_diff": c.sd_diff,
            "p_value": c.p_value,
            "p_adjusted": c.p_adjusted,
            "p_min": c.p_min,
        }.items():
            assert row[key] == value, key  # exact: JSON keeps every float's digits
        assert row["t_ci"] == list(c.t_ci) and row["bootstrap_ci"] == list(c.bootstrap_ci)
        assert row["family_size"] == c.family_size == 6
        assert (row["wins"], row["losses"], row["seeds_needed"]) == (
            c.wins,
            c.losses,
            c.seeds_needed,
        )
        assert row["detected"] == c.detected and row["verdict"] == c.verdict
    arm = next(a for a in doc["per_arm"] if (a["metric"], a["group"], a["arm"]) == (
        "loss", "svhn", "gn"
    ))  # fmt: skip
    s = next(a for a in result.arms if (a.metric, a.group, a.arm) == ("loss", "svhn", "gn"))
    assert (arm["n"], arm["mean"], arm["sd"], arm["ci"]) == (
        6,
        s.summary.mean,
        s.summary.sd,
        [s.summary.ci_low, s.summary.ci_high],
    )
    assert all(a["sd"] > 0 for a in doc["per_arm"])  # every arm varies: every number is real


def test_json_has_no_nan(tmp_path):
    # one common seed: no interval, no p-value; JSON says null
    result = compare_table(table(tmp_path, "arm,seed,value\na,0,0.5\nb,0,0.6\nb,1,0.7\n"))
    row = json.loads(render_json(result))["comparisons"][0]
    assert row["p_value"] is None and row["t_ci"] == [None, None] and row["n"] == 1


def test_markdown_has_the_verdict_table(tmp_path, capsys):
    path = table(tmp_path, GROUPED)
    out = tmp_path / "out" / "compare.md"
    assert main(["compare", str(path), "--md", str(out)]) == 0
    assert f"md: {out}" in capsys.readouterr().out
    md = out.read_text()
    result = compare_table(path)
    assert md == render_markdown(result)
    # the study report's table, every row (groups and metrics both shown here), without the
    # seeds x images column: a table of per-seed values has no per-image predictions
    headers, rows = verdict_table(result.comparisons)
    images = headers.index("seeds × images 95% CI")
    kept = (
        [h for i, h in enumerate(headers) if i != images],
        [[x for i, x in enumerate(row) if i != images] for row in rows],
    )
    assert markdown_table(kept) in md
    assert "## Comparisons with the baseline\n" in md and "### acc\n" in md
    assert "Each of the 2 metrics is its own family" in md
    assert "Baseline: **bn** (the first arm in the table" in md
    for gc in result.comparisons:
        assert (
            f"**{gc.group}**: **{gc.comparison.variant}** vs **bn**: {gc.comparison.verdict}" in md
        )


def test_html_is_one_self_contained_file(tmp_path):
    path = table(tmp_path, GOOD + "gn,6,0.9\n", name="a<b>.csv")
    out = tmp_path / "compare.html"
    assert main(["compare", str(path), "--html", str(out)]) == 0
    html = out.read_text()
    assert html == render_html(compare_table(path))
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html
    assert not re.search(r"<script|<link|<img|\bsrc=|\bhref=|https?://", html)
    assert "a&lt;b&gt;.csv" in html and "a<b>" not in html  # escaped
    assert "Warning: gn vs bn: seed 6 only in gn" in html
    assert html.count("<tr>") == 1 + 2 + 1 + 3  # two comparisons, three arms, two headers
    assert "gn is lower than bn by 1.9 points" in html


def test_text_view_drops_the_columns_that_say_nothing(tmp_path):
    result = compare_table(table(tmp_path, GOOD))
    text = render_text(result)
    assert str(result) == text
    header = next(line for line in text.splitlines() if "seeds  diff" in line)
    assert header.split() == [
        "variant", "−", "baseline", "seeds", "diff", "(points)", "paired", "t", "95%", "CI",
        "bootstrap", "95%", "CI", "sign-flip", "p", "adjusted", "p",
    ]  # fmt: skip
    assert "value: one family of 2 comparisons" in text
    assert "all comparisons form one family" in " ".join(text.split())


def test_rows_from_python_are_checked_alike():
    with pytest.raises(DataError, match=r"^rows: no rows \(expected one mapping per run"):
        compare_table([])
    rows = [{"arm": "a", "seed": 0, "value": 1.0}, {"arm": "b", "seed": True, "value": 1.0}]
    with pytest.raises(DataError, match=r"^rows, row 2: seed True is not an integer$"):
        compare_table(rows)
    rows[1]["seed"] = 0
    rows[0]["value"] = float("inf")
    with pytest.raises(DataError, match=r"^rows, row 1: value inf is not a finite number"):
        compare_table(rows)
    rows[0]["value"] = 2.0
    assert compare_table(rows, pairs="a:b").pairs == (("a", "b"),)  # one pair, given alone


def test_an_arm_without_spread_gets_no_interval(tmp_path):
    result = compare_table(table(tmp_path, "arm,seed,value\na,0,1\na,1,1\nb,0,1\nb,1,2\n"))
    headers, rows = arms_table(result)
    assert headers[-1] == "95% CI"
    assert [row[-1] for row in rows] == ["none: all 2 seeds equal", "[-4.853, 7.853]"]


def test_differences_are_points_only_for_values_in_0_1():
    import normlab

    def rows(offset: float, scale: float) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for s in range(8):
            base = offset + scale * 0.01 * s
            out.append({"arm": "bn", "seed": s, "value": base})
            out.append({"arm": "gn", "seed": s, "value": base + scale * (0.02 + 0.001 * s)})
        return out

    acc = normlab.compare(rows(0.4, 1.0))
    assert acc.units["value"].name == "points"
    assert acc.comparisons[0].comparison.verdict.startswith("gn is higher than bn by 2.4 points")
    loss = normlab.compare(rows(2.0, 10.0))  # losses around 2: not fractions
    verdict = loss.comparisons[0].comparison.verdict
    assert loss.units["value"].name == "" and "points" not in verdict
    assert verdict.startswith("gn is higher than bn by 0.235 (8/8 seeds agree")
    assert "own unit" in str(loss)
