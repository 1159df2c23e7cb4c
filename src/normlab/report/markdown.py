"""``report.md``: the same content as the HTML report, figures as PNG files in ``figures/``."""

from __future__ import annotations

from pathlib import Path

from normlab.report.budgets import ladder_table
from normlab.report.document import ReportDocument
from normlab.report.mechanisms import mechanism_table
from normlab.report.tables import (
    arms_table,
    comparisons_table,
    markdown_table,
    problems_table,
    timing_table,
)
from normlab.store import atomic_write_text

LADDER_INTRO = (
    "Each comparison at every budget rung, judged in the study's one family (the per-rung "
    "rows are in the comparisons table, group GROUP@RUNG). The trend reads the claims along "
    "the ladder; the change in size from the first to the last rung is descriptive "
    "(normlab.report.budgets)."
)


def render_markdown(doc: ReportDocument, figure_paths: dict[str, str]) -> str:
    """Markdown text; ``figure_paths`` maps a figure's name to its path relative to the file."""
    spec, meta = doc.study.spec, doc.study.meta
    counts = ", ".join(f"{n} {s}" for s, n in sorted(doc.analysis.counts.items()))
    out = [f"# Study `{spec.name}`", "", spec.description, ""]
    out += [
        f"{len(doc.study.runs)} runs: {counts}; seeds {', '.join(map(str, spec.seeds))}; "
        f"baseline **{spec.baseline}**.",
        "",
    ]
    if spec.notes:
        out += [spec.notes, ""]
    for w in doc.warnings:
        out += [f"> **Note:** {w}", ""]

    def figs(section: str) -> list[str]:
        lines = []
        for f in doc.figures:
            if f.section == section:
                lines += [f"![{f.title}]({figure_paths[f.name]})", ""]
        return lines

    out += ["## Verdicts", ""]
    finals = [gc for gc in doc.analysis.comparisons if gc.metric == "final"]
    for gc in finals:
        c = gc.comparison
        where = f"**{gc.group}**: " if gc.group else ""
        out.append(
            f"- {where}**{c.variant}** vs **{c.baseline}** (final-epoch val accuracy): {c.verdict}"
        )
    if not finals:
        out.append("No comparisons: the study has a single variant.")
    out += [""]
    if doc.ladders:
        out += ["## Along the budget ladder", "", LADDER_INTRO, ""]
        out += [f"- {lad.sentence()}" for lad in doc.ladders] + [""]
        out += [markdown_table(ladder_table(doc.ladders)), *figs("ladder")]
    out += figs("overview")
    title = "Comparisons with the baseline" + (" and other pairs" if spec.comparisons else "")
    out += [f"## {title}", "", markdown_table(comparisons_table(doc.analysis))]
    out += ["## Per arm", "", markdown_table(arms_table(doc.analysis))]

    out += figs("seeds")
    out += ["## Learning curves", ""] + (figs("curves") or ["No epochs recorded yet.", ""])
    out += ["## Wall time and throughput", "", markdown_table(timing_table(doc.analysis))]
    out += ["## Mechanisms", ""]
    mechanisms = mechanism_table(doc.study)
    if mechanisms[1]:
        out += [
            "Probe quantities per arm, mean ± sd over the completed seeds "
            "(definitions: `normlab.report.mechanisms`).",
            "",
            markdown_table(mechanisms),
        ]
    out += figs("mechanisms") or [doc.mechanisms_note or "No probe figures.", ""]
    problems = problems_table(doc.analysis)
    if problems[1]:
        out += ["## Failed, diverged and unfinished runs", "", markdown_table(problems)]
    out += ["## Methods", ""] + [f"- {m}" for m in doc.methods] + [""]
    out += [
        "## Configuration",
        "",
        f"Command: `{meta.get('command') or '?'}`  ",
        f"Reproduce or resume: `normlab study {doc.study.out / 'study.yaml'}`",
        "",
        "Overrides per arm:",
        "",
    ]
    for arm, o in doc.arm_overrides:
        body = ", ".join(f"{k}={v}" for k, v in o.items())
        out.append(f"- `{arm}`: `{body}`")
    out += ["", "Base configuration (baseline arm, resolved):", "", "```yaml"]
    out += [doc.base_config_yaml.rstrip(), "```", "", "Study specification (study.yaml):", ""]
    out += ["```yaml", doc.spec_yaml.rstrip(), "```", "", "## Provenance", ""]
    out.append(f"- git SHA: {', '.join(doc.git_shas) or meta.get('git_sha') or '?'}")
    out.append(
        f"- host: {meta.get('host') or '?'} ({meta.get('cpu') or meta.get('machine') or '?'})"
    )
    out.append(f"- executor: {meta.get('executor') or '?'}")
    for name, version in doc.versions.items():
        out.append(f"- {name} {version}")
    return "\n".join(out) + "\n"


def write_markdown(doc: ReportDocument, path: str | Path, figures_dir: str = "figures") -> Path:
    """Write ``report.md`` and its figures (``figures/<name>.png``, atomically)."""
    from normlab.store import atomic_write_bytes

    path = Path(path)
    paths = {}
    for f in doc.figures:
        rel = f"{figures_dir}/{f.name}.png"
        atomic_write_bytes(path.parent / rel, f.png)
        paths[f.name] = rel
    atomic_write_text(path, render_markdown(doc, paths))
    return path
