"""Reports: report.html (self-contained, figures that render in a real browser), report.md,
results.csv (tidy), on a tiny study run in this process."""

from __future__ import annotations

import base64
import csv
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _helpers import tiny_base
from PIL import Image

from normlab.cli import main
from normlab.report import write_report
from normlab.report.data import load_study
from normlab.study.plan import available_probes
from normlab.study.runner import run_study
from normlab.study.spec import spec_from_dict

torch.set_num_threads(1)

SPEC = {
    "name": "tiny-report",
    "description": "two normalizations on a tiny synthetic task",
    "seeds": 2,
    "baseline": "bn",
    "base": tiny_base(),
    "variants": {"bn": {"norm.name": "bn"}, "gn": {"norm.name": "gn", "norm.gn_groups": 8}},
    "optional_probes": ["weights"],
}
PROBES = available_probes(["weights"])[0] == ["weights"]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "study"
    result = run_study(spec_from_dict(SPEC), out, executor="serial", stream=None)
    assert result.ok
    write_report(out)
    return out


def test_report_files_and_a_self_contained_html(study_dir):
    html = (study_dir / "report.html").read_text()
    # one file: no scripts, stylesheets, frames or remote resources
    for pattern in ("<script", "<link", "<iframe", 'src="http', "src='http", "url("):
        assert pattern not in html
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) >= 2  # per-seed accuracies and learning curves
    for data in images:
        png = Image.open(io.BytesIO(base64.b64decode(data)))
        assert png.format == "PNG" and png.width > 300
    for text in (
        "Study <code>tiny-report</code>",
        "Verdicts",
        "gn</b> vs <b>bn</b>",
        "Learning curves",
        "Wall time and throughput",
        "Mechanisms",
        "Methods",
        "git SHA",
        "torch",
        "scipy",
        "Reproduce or resume",
    ):
        assert text in html, text


def test_report_md_carries_the_same_content_with_figure_files(study_dir):
    md = (study_dir / "report.md").read_text()
    assert md.startswith("# Study `tiny-report`")
    verdicts = [line for line in md.splitlines() if line.startswith("- **gn** vs **bn**")]
    assert len(verdicts) == 1 and "no detectable difference with 2 seeds" in verdicts[0]
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (study_dir / link).is_file()
    assert "| bn (baseline) | 2/2 |" in md
    study = load_study(study_dir)
    assert study.meta.get("git_sha") is not None or "git SHA: ?" in md
    assert "```yaml" in md and "norm.name=gn, norm.gn_groups=8" in md
    assert "## Configuration" in md and "## Provenance" in md


def test_results_csv_is_tidy(study_dir):
    rows = list(csv.DictReader((study_dir / "results.csv").open()))
    assert len(rows) == 2 * 2 * 2  # variants x seeds x epochs
    assert {(r["variant"], r["seed"], r["epoch"]) for r in rows} == {
        (v, s, e) for v in ("bn", "gn") for s in ("0", "1") for e in ("1", "2")
    }
    columns = list(rows[0])
    assert columns[:7] == ["study", "group", "variant", "arm", "seed", "status", "epoch"]
    assert columns[7:12] == ["train/loss", "train/acc", "val/loss", "val/acc", "lr"]
    # the CSV carries exactly what metrics.jsonl holds
    first = yaml.safe_load((study_dir / "runs/bn/seed-0/metrics.jsonl").read_text().splitlines()[0])
    row = next(r for r in rows if (r["variant"], r["seed"], r["epoch"]) == ("bn", "0", "1"))
    assert float(row["val/acc"]) == first["val/acc"]
    if PROBES:
        probe_cols = [c for c in columns if c.startswith("weights/")]
        assert probe_cols and all(c in first for c in probe_cols if rows[0][c] != "")


def test_mechanisms_section_embeds_probe_figures_when_available(study_dir):
    html = (study_dir / "report.html").read_text()
    mechanisms = html.split("<h2>Mechanisms</h2>", 1)[1].split("<h2>", 1)[0]
    try:
        import normlab.probes.plots  # noqa: F401
    except ImportError:
        assert "not available in this installation" in mechanisms
        return
    if PROBES:
        assert "data:image/png;base64," in mechanisms
    else:
        assert "no run recorded probe metrics" in mechanisms


def test_an_unfinished_study_is_reported_as_such(study_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(study_dir, copy)
    shutil.rmtree(copy / "runs" / "gn" / "seed-1")
    paths = write_report(copy)
    md = paths["markdown"].read_text()
    assert "1 of 4 runs are unfinished" in md
    assert "| gn/seed-1 | pending |" in md
    assert "no detectable difference with 1 seed" in md  # only seed 0 is paired now
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["status"] for r in rows if r["variant"] == "gn" and r["seed"] == "1"] == ["pending"]


def test_report_command(study_dir, tmp_path, capsys):
    assert main(["report", str(study_dir)]) == 0
    out = capsys.readouterr().out
    assert "html: " in out and "report.html" in out
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a study directory" in capsys.readouterr().err


def _screenshot(html: Path, png: Path, profile: Path) -> None:
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            "--window-size=1200,2000",
            html.resolve().as_uri(),
        ],
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert png.is_file(), f"chromium wrote no screenshot {png}"


@pytest.mark.slow
def test_html_report_renders_its_figures_in_headless_chromium(study_dir, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    report = study_dir / "report.html"
    with_figures = tmp_path / "with.png"
    _screenshot(report, with_figures, tmp_path / "profile1")
    # the same page with the images removed: what text and tables alone look like
    stripped = tmp_path / "stripped.html"
    stripped.write_text(re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""', report.read_text()))
    without = tmp_path / "without.png"
    _screenshot(stripped, without, tmp_path / "profile2")

    shot = np.asarray(Image.open(with_figures).convert("RGB"))
    plain = np.asarray(Image.open(without).convert("RGB"))
    assert shot.shape == (2000, 1200, 3)

    def colour_set(img: np.ndarray) -> set[int]:
        packed = img.astype(np.int64) @ np.asarray([1 << 16, 1 << 8, 1])
        return set(np.unique(packed).tolist())

    colours = colour_set(shot)
    assert len(colours) > 100  # not blank
    assert len(colours - colour_set(plain)) > 50  # the figures add colours text does not have

    # the variants' line colours (matplotlib blue #1f77b4, red #d62728) are on screen
    def near(ref: tuple[int, int, int], tol: int = 40) -> int:
        return int((np.abs(shot.astype(np.int64) - np.asarray(ref)) <= tol).all(axis=2).sum())

    assert near((0x1F, 0x77, 0xB4)) > 100
    assert near((0xD6, 0x27, 0x28)) > 100


def test_mechanism_numbers_are_the_runs_own_probe_values(study_dir):
    """Oracle: the table's weight-norm row is the per-layer mean of weights/norm/* read straight
    from each run's metrics.jsonl (first and last epoch), and the markdown report carries it."""
    import json
    import statistics

    from normlab.report.mechanisms import mechanism_rows, mechanism_table

    if not PROBES:
        pytest.skip("the weights probe is not available in this installation")
    study = load_study(study_dir)
    rows = {(r.arm, r.quantity.label): r for r in mechanism_rows(study)}
    label = "weight norm ||w||, mean over conv/linear layers"
    for variant in ("bn", "gn"):
        expect_first, expect_final = [], []
        for seed in (0, 1):
            lines = (study_dir / "runs" / variant / f"seed-{seed}" / "metrics.jsonl").read_text()
            epochs = [json.loads(line) for line in lines.splitlines() if line.strip()]
            for row, out in ((epochs[0], expect_first), (epochs[-1], expect_final)):
                norms = [v for k, v in row.items() if k.startswith("weights/norm/")]
                assert norms
                out.append(sum(norms) / len(norms))
        got = rows[(variant, label)]
        assert got.first == pytest.approx(expect_first)
        assert got.final == pytest.approx(expect_final)
    # a BN-only quantity does not appear for the GroupNorm arm
    assert ("gn", "initial-value weight in running stats, mean over BN layers") not in rows
    _, table = mechanism_table(study)
    cell = next(r for r in table if r[0] == "bn" and r[1] == label)
    final = rows[("bn", label)].final
    mean = statistics.fmean(final)
    assert cell[3].startswith(f"{mean:.4g}" if mean >= 1 else f"{mean:.3f}")
    assert cell[4] == "2"
    assert label.replace("|", "\\|") in (study_dir / "report.md").read_text()  # escaped pipes
    assert "<h3>In numbers</h3>" in (study_dir / "report.html").read_text()


def test_extra_comparison_pairs_are_reported_and_agree_with_the_baseline_ones(study_dir):
    """A spec's ``comparisons: [[bn, gn]]`` is the baseline comparison turned round: the same
    paired differences with the opposite sign, the same p-value."""
    import dataclasses

    from normlab.report.analysis import analyze

    study = load_study(study_dir)
    turned = dataclasses.replace(
        study, spec=dataclasses.replace(study.spec, comparisons=(("bn", "gn"),))
    )
    comparisons = analyze(turned).comparisons
    by_pair = {
        (gc.comparison.baseline, gc.comparison.variant, gc.metric): gc.comparison
        for gc in comparisons
    }
    for metric in ("final", "best"):
        ours, base = by_pair["gn", "bn", metric], by_pair["bn", "gn", metric]
        assert ours.diff == pytest.approx(-base.diff)
        assert ours.p_value == pytest.approx(base.p_value)
        assert ours.t_ci == pytest.approx((-base.t_ci[1], -base.t_ci[0]))
    assert [(gc.comparison.baseline, gc.comparison.variant) for gc in comparisons] == [
        ("bn", "gn"), ("bn", "gn"), ("gn", "bn"), ("gn", "bn")
    ]  # fmt: skip


def test_the_report_names_extra_pairs_in_its_heading(study_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(study_dir, copy)
    saved = yaml.safe_load((copy / "study.yaml").read_text())
    saved["comparisons"] = [["bn", "gn"]]
    (copy / "study.yaml").write_text(yaml.safe_dump(saved))
    md = write_report(copy)["markdown"].read_text()
    assert "## Comparisons with the baseline and other pairs" in md
    assert "| group | variant − reference |" in md
    assert "| bn − gn | final |" in md


def test_runs_from_several_machines_are_named_and_their_wall_times_flagged(study_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(study_dir, copy)
    md = write_report(copy)["markdown"].read_text()
    assert "different machines" not in md  # one machine made them all
    cfg = yaml.safe_load((copy / "runs" / "gn" / "seed-1" / "config.yaml").read_text())
    assert cfg["meta"]["cpu"].endswith("cores)")  # every run records the CPU it ran on
    cfg["meta"]["cpu"] = "Other CPU (AVX2, 2 cores)"  # a run carried over from another machine
    (copy / "runs" / "gn" / "seed-1" / "config.yaml").write_text(yaml.safe_dump(cfg))
    md = write_report(copy)["markdown"].read_text()
    assert "runs were made on 2 different machines" in md
    assert "Other CPU (AVX2, 2 cores)" in md and "compare wall times within one machine" in md
