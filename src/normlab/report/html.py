"""``report.html``: one self-contained file (inline CSS, figures as base64 PNG, no scripts, no
external resources), rendered with a Jinja2 template (autoescaped)."""

from __future__ import annotations

import base64
from pathlib import Path

import jinja2

from normlab.report.budgets import ladder_table
from normlab.report.document import ReportDocument
from normlab.report.markdown import LADDER_INTRO
from normlab.report.mechanisms import mechanism_table
from normlab.report.tables import (
    arms_table,
    comparisons_table,
    html_table,
    problems_table,
    timing_table,
)
from normlab.store import atomic_write_text

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>normlab study {{ spec.name }}</title>
<style>
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1150px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.55em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.warn { background: #fff4e5; border-left: 4px solid #f0a030; padding: 0.5em 1em; }
.verdict { margin: 0.3em 0; }
.detected { color: #0a6b24; font-weight: 600; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.muted { color: #666; }
</style>
</head>
<body>
<h1>Study <code>{{ spec.name }}</code></h1>
<p>{{ spec.description }}</p>
<p class="muted">{{ counts_text }} &middot; seeds {{ spec.seeds|join(", ") }} &middot; baseline <b>{{ spec.baseline }}</b>
{% if meta.created %}&middot; last run {{ meta.created }}{% endif %}</p>
{% if spec.notes %}<p>{{ spec.notes }}</p>{% endif %}
{% for w in doc.warnings %}<p class="warn">{{ w }}</p>{% endfor %}

<h2>Verdicts</h2>
{% for gc in final_comparisons %}
<p class="verdict{% if gc.comparison.detected %} detected{% endif %}">
{% if gc.group %}<b>{{ gc.group }}</b>: {% endif %}<b>{{ gc.comparison.variant }}</b> vs <b>{{ gc.comparison.baseline }}</b>
(final-epoch val accuracy): {{ gc.comparison.verdict }}</p>
{% else %}<p>No comparisons: the study has a single variant.</p>{% endfor %}

{% if doc.ladders %}<h2>Along the budget ladder</h2>
<p>{{ ladder_intro }}</p>
<ul>{% for lad in doc.ladders %}<li>{{ lad.sentence() }}</li>{% endfor %}</ul>
{{ table(ladder) }}
{% for f in figures if f.section == "ladder" %}
<figure><img alt="{{ f.title }}" src="data:image/png;base64,{{ f.b64 }}"><figcaption>{{ f.title }}</figcaption></figure>
{% endfor %}{% endif %}

{% for f in figures if f.section == "overview" %}
<figure><img alt="{{ f.title }}" src="data:image/png;base64,{{ f.b64 }}"><figcaption>{{ f.title }}</figcaption></figure>
{% endfor %}

<h2>Comparisons with the baseline{% if spec.comparisons %} and other pairs{% endif %}</h2>
{{ table(comparisons) }}

<h2>Per arm</h2>
{{ table(arms) }}
{% for f in figures if f.section == "seeds" %}
<figure><img alt="{{ f.title }}" src="data:image/png;base64,{{ f.b64 }}"><figcaption>{{ f.title }}: each dot one seed, grey lines join the same seed across variants, black tick = mean.</figcaption></figure>
{% endfor %}

<h2>Learning curves</h2>
{% for f in figures if f.section == "curves" %}
<figure><img alt="{{ f.title }}" src="data:image/png;base64,{{ f.b64 }}"><figcaption>{{ f.title }}</figcaption></figure>
{% else %}<p>No epochs recorded yet.</p>{% endfor %}

<h2>Wall time and throughput</h2>
{{ table(timing) }}

<h2>Mechanisms</h2>
{% if mechanisms[1] %}<h3>In numbers</h3>
{{ table(mechanisms) }}{% endif %}
{% for f in figures if f.section == "mechanisms" %}
<figure><img alt="{{ f.title }}" src="data:image/png;base64,{{ f.b64 }}"><figcaption>{{ f.title }}</figcaption></figure>
{% else %}<p class="muted">{{ doc.mechanisms_note or "No probe figures." }}</p>{% endfor %}

{% if problems[1] %}<h2>Failed, diverged and unfinished runs</h2>
{{ table(problems) }}{% endif %}

<h2>Methods</h2>
<ul>{% for m in doc.methods %}<li>{{ m }}</li>{% endfor %}</ul>

<h2>Configuration</h2>
<p>Command: <code>{{ meta.command or "?" }}</code><br>
Reproduce or resume: <code>normlab study {{ study_file }}</code></p>
<h3>Overrides per arm</h3>
<table><tr><th>arm</th><th>overrides of the base</th></tr>
{% for arm, o in doc.arm_overrides %}<tr><td>{{ arm }}</td><td><code>{% for k, v in o.items() %}{{ k }}={{ v }}{% if not loop.last %}, {% endif %}{% endfor %}</code></td></tr>
{% endfor %}</table>
<h3>Base configuration (baseline arm, resolved)</h3>
<pre>{{ doc.base_config_yaml }}</pre>
<h3>Study specification (study.yaml)</h3>
<pre>{{ doc.spec_yaml }}</pre>

<h2>Provenance</h2>
<table>
<tr><th>git SHA</th><td>{{ doc.git_shas|join(", ") or meta.git_sha or "?" }}</td></tr>
<tr><th>host</th><td>{{ meta.host or "?" }} ({{ meta.cpu or meta.machine or "?" }})</td></tr>
<tr><th>executor</th><td>{{ meta.executor or "?" }}</td></tr>
{% for name, version in doc.versions.items() %}<tr><th>{{ name }}</th><td>{{ version }}</td></tr>
{% endfor %}</table>
<p class="muted">Written by normlab report.</p>
</body>
</html>
"""


def render_html(doc: ReportDocument) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.globals["table"] = html_table
    template = env.from_string(_TEMPLATE)
    counts = doc.analysis.counts
    counts_text = f"{len(doc.study.runs)} runs: " + ", ".join(
        f"{n} {s}" for s, n in sorted(counts.items())
    )
    figures = [
        {"title": f.title, "section": f.section, "b64": base64.b64encode(f.png).decode("ascii")}
        for f in doc.figures
    ]
    meta = {
        k: doc.study.meta.get(k)
        for k in ("command", "created", "git_sha", "host", "machine", "cpu", "executor")
    }
    return template.render(
        doc=doc,
        spec=doc.study.spec,
        meta=meta,
        counts_text=counts_text,
        final_comparisons=[gc for gc in doc.analysis.comparisons if gc.metric == "final"],
        comparisons=comparisons_table(doc.analysis),
        arms=arms_table(doc.analysis),
        timing=timing_table(doc.analysis),
        problems=problems_table(doc.analysis),
        mechanisms=mechanism_table(doc.study),
        figures=figures,
        study_file=str(doc.study.out / "study.yaml"),
        ladder=ladder_table(doc.ladders),
        ladder_intro=LADDER_INTRO,
    )


def write_html(doc: ReportDocument, path: str | Path) -> Path:
    path = Path(path)
    atomic_write_text(path, render_html(doc))
    return path
