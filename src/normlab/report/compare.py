"""``normlab compare``: judge anyone's runs by the rule of a normlab study report.

The input is a *long table*, one row per run, from any framework: a CSV file, or rows (mappings)
from Python.

==========  ========  ===========================================================================
column      required  meaning
==========  ========  ===========================================================================
``arm``     yes       the variant the run belongs to (any text)
``seed``    yes       an integer; runs of two arms with the same seed are *paired* (normlab's own
                      seeds fix the initialisation, batch order and augmentation; in another
                      framework the pairing is only as close as its seeds make it)
``value``   yes       a finite number in the metric's own unit (e.g. final accuracy, 0.9123)
``group``   no        comparisons stay within a group (a model, a data set); empty: no group
``metric``  no        several metrics in one table; each is judged on its own (its own family)
==========  ========  ===========================================================================

Reading: column names match case-insensitively, around any spaces; other columns are ignored;
cells are stripped; blank lines and rows whose cells are all empty are skipped; a CSV is UTF-8
(a byte-order mark is fine), comma-separated, with ``.`` decimals; values are finite and at
most :data:`MAX_VALUE` in magnitude. A seed may be written
``3`` or ``3.0`` (as pandas writes a column that once held NaN), never ``1.5``. Each (group,
arm, seed, metric) appears once. Anything else is a :class:`~normlab.errors.DataError` naming
the file, the line (or row) and the cell, raised before anything is computed.

The rule is the study report's, computed by the same functions (nothing is re-implemented
here): in each metric and group, every arm is compared with the baseline, then each extra
``pairs`` entry (variant against its reference), by :func:`normlab.report.stats.compare` on the
seeds both arms have; all comparisons of one metric form one family, judged together by
:func:`normlab.report.analysis.judge_family` (family-wise adjusted p-values, Westfall & Young's
step-down minP over within-seed permutations). A difference is claimed only when its adjusted
p < 0.05 and both 95% intervals exclude 0. Several metrics are separate families: the chance of
a false claim is at most 0.05 *per metric*, not over all of them together.

Seeds that one arm has and the other lacks are left out of that comparison and named in a
warning (:attr:`CompareResult.warnings`); an arm with no rows in a group (or metric) is not
compared there, also with a warning; two arms present together that share no seed at all are a
DataError.

Units: numbers stay in the table's unit (the JSON holds them as given). The verdicts and the
comparisons table are the study report's, which print differences as *points*, 100 x the
value: right for accuracies given as fractions in [0, 1]; for any other metric read a point as
1/100 of its unit.

Outputs: :func:`render_text` (the terminal), :func:`render_markdown`, :func:`render_json`,
:func:`render_html` (one self-contained file: inline CSS, no scripts, nothing external).
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from normlab.errors import ConfigError, DataError
from normlab.report.analysis import GroupComparison, judge_family
from normlab.report.family import N_RESAMPLES as FAMILY_RESAMPLES
from normlab.report.family import FamilyResult
from normlab.report.stats import (
    ALPHA,
    CONFIDENCE,
    N_RESAMPLES,
    POINTS,
    Summary,
    Unit,
    compare,
    min_seeds_for,
    summarize,
)
from normlab.report.tables import Table, html_table, markdown_table, verdict_table

REQUIRED = ("arm", "seed", "value")
OPTIONAL = ("group", "metric")
DEFAULT_METRIC = "value"
"""The metric's name when the table has no ``metric`` column."""


def unit_for(values: Iterable[float]) -> Unit:
    """How a metric's differences are written: in points (100 x the value) when every value
    lies in [0, 1], read as fractions such as accuracies; otherwise in the values' own unit."""
    return POINTS if all(0.0 <= v <= 1.0 for v in values) else Unit("")


def units_text(r: CompareResult) -> str:
    """The unit of each metric's differences, and why (one sentence)."""
    parts = []
    for metric, unit in r.units.items():
        where = f"{metric}: " if len(r.units) > 1 else ""
        if unit is POINTS:
            parts.append(
                f"{where}every value lies in [0, 1], so they are read as fractions (such as "
                "accuracies) and differences are printed in points, 100 x the value"
            )
        else:
            parts.append(f"{where}differences are printed in the values' own unit")
    return "; ".join(parts)


MAX_VALUE = 1e100
"""The largest magnitude a value may have: squares of differences must stay finite."""
_SHOWN_SEEDS = 10  # a warning lists at most this many seeds

Group = str | None
Cells = dict[tuple[Group, str], dict[int, float]]
"""(group, arm) -> seed -> value: one metric's numbers."""


# ---- the table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LongTable:
    """A long table, read and checked: every value is a finite number, every seed an integer,
    every (group, arm, seed, metric) once. Names keep the order they first appear in."""

    source: str  # the file's path as given, or "rows"
    arms: tuple[str, ...]
    groups: tuple[Group, ...]
    metrics: tuple[str, ...]
    values: dict[str, Cells]  # metric -> (group, arm) -> seed -> value
    has_group: bool  # the table has a group column
    has_metric: bool  # the table has a metric column

    @property
    def rows(self) -> int:
        return sum(len(s) for cells in self.values.values() for s in cells.values())


Source = str | os.PathLike[str] | Iterable[Mapping[str, Any]]
"""A CSV file's path, or rows: mappings of column -> value (strings or numbers)."""


def load_table(source: Source | LongTable) -> LongTable:
    """Read a long table from a CSV file (a path) or from rows (mappings of column -> value);
    DataError naming the file, line (or row) and cell at fault (module docstring)."""
    if isinstance(source, LongTable):
        return source
    if isinstance(source, str | os.PathLike):
        name = os.fspath(source)
        header, records = _csv_records(name)
    else:
        name = "rows"
        header, records = _mapping_records(source)
    return _table(name, header, records)


def _csv_records(path: str) -> tuple[list[str], list[tuple[str, list[Any]]]]:
    """The header and the (line, fields) of each non-blank row of the CSV file ``path``."""
    p = Path(path)
    try:
        if not p.exists():
            raise DataError(f"{path}: no such file (expected a CSV table of arm, seed, value)")
        if p.is_dir():
            raise DataError(f"{path}: is a directory, expected a CSV file")
        data = p.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not a CSV file: byte {exc.start} is not UTF-8 text (binary data?)"
        ) from None
    if "\x00" in text:
        raise DataError(f"{path}: not a CSV file: it holds NUL bytes (binary data?)")
    header: list[str] | None = None
    header_line = 0
    records: list[tuple[str, list[Any]]] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue
            if header is None:
                header, header_line = fields, reader.line_num
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{path}, line {reader.line_num}: {len(fields)} fields, but the header "
                    f"(line {header_line}) has {len(header)}"
                    + (
                        " (a decimal comma, or a comma inside an unquoted name?)"
                        if len(fields) > len(header)
                        else ""
                    )
                )
            records.append((f"line {reader.line_num}", fields))
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({exc})") from None
    if header is None:
        raise DataError(
            f"{path}: empty file; expected a header line (arm,seed,value, optionally group and "
            "metric) and one row per run"
        )
    return header, records


def _mapping_records(
    rows: Iterable[Mapping[str, Any]],
) -> tuple[list[str], list[tuple[str, list[Any]]]]:
    """Rows from Python as a header (the first row's keys) and (row, fields) records."""
    try:
        items = list(rows)
    except TypeError:
        raise DataError(
            f"expected a CSV path or an iterable of rows (mappings), got {type(rows).__name__}"
        ) from None
    if not items:
        raise DataError("rows: no rows (expected one mapping per run: arm, seed, value)")
    header: list[str] = []
    records: list[tuple[str, list[Any]]] = []
    for i, row in enumerate(items, 1):
        if not isinstance(row, Mapping):
            raise DataError(f"rows, row {i}: expected a mapping of column -> value, got {row!r}")
        if i == 1:
            header = [str(k) for k in row]
        keyed = {str(k).strip().lower(): v for k, v in row.items()}
        records.append((f"row {i}", [keyed.get(h.strip().lower()) for h in header]))
    return header, records


def _table(source: str, header: list[str], records: list[tuple[str, list[Any]]]) -> LongTable:
    index: dict[str, int] = {}
    for i, name in enumerate(header):
        key = str(name).strip().lower()
        if key in (*REQUIRED, *OPTIONAL):
            if key in index:
                raise DataError(f"{source}: the header names column {key!r} twice")
            index[key] = i
    missing = [c for c in REQUIRED if c not in index]
    if missing:
        hint = ""
        if len(header) == 1 and ("\t" in header[0] or ";" in header[0]):
            sep = "tab" if "\t" in header[0] else "semicolon"
            hint = f"; the header looks {sep}-separated, and normlab reads comma-separated files"
        raise DataError(
            f"{source}: missing required column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)}; found {', '.join(repr(str(h)) for h in header) or 'none'} "
            f"(a long table has one row per run: arm, seed, value, optionally group, metric)" + hint
        )
    if not records:
        raise DataError(f"{source}: no rows after the header (expected one row per run)")
    has_group, has_metric = "group" in index, "metric" in index
    arms: dict[str, None] = {}
    groups: dict[Group, None] = {}
    values: dict[str, Cells] = {}
    first: dict[tuple[Group, str, int, str], str] = {}
    for where, fields in records:
        at = f"{source}, {where}"
        arm = _text(fields[index["arm"]])
        if not arm:
            raise DataError(f"{at}: empty arm")
        seed = _seed(fields[index["seed"]], at)
        value = _value(fields[index["value"]], at, arm, seed)
        group = (_text(fields[index["group"]]) or None) if has_group else None
        metric = DEFAULT_METRIC
        if has_metric:
            metric = _text(fields[index["metric"]])
            if not metric:
                raise DataError(f"{at}: empty metric (every row must name its metric)")
        run_key = (group, arm, seed, metric)
        if run_key in first:
            what = f"arm {arm!r}, seed {seed}"
            what += f", group {group!r}" if group is not None else ""
            what += f", metric {metric!r}" if has_metric else ""
            unique = ", ".join(["group"] * has_group + ["arm", "seed"] + ["metric"] * has_metric)
            raise DataError(
                f"{at}: a second row for {what} (the first is at {first[run_key]}); each "
                f"({unique}) must appear once"
            )
        first[run_key] = where
        arms[arm] = None
        groups[group] = None
        values.setdefault(metric, {}).setdefault((group, arm), {})[seed] = value
    if len(arms) < 2:
        raise DataError(
            f"{source}: only one arm ({next(iter(arms))!r}); a comparison needs at least two"
        )
    return LongTable(
        source, tuple(arms), tuple(groups), tuple(values), values, has_group, has_metric
    )


def _text(raw: Any) -> str:
    return "" if raw is None else str(raw).strip()


def _seed(raw: Any, at: str) -> int:
    if isinstance(raw, numbers.Integral) and not isinstance(raw, bool):
        return int(raw)
    text = _text(raw)
    if not text:
        raise DataError(f"{at}: empty seed")
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if isinstance(raw, bool) or not (math.isfinite(number) and number.is_integer()):
        raise DataError(f"{at}: seed {raw!r} is not an integer")
    return int(number)


def _value(raw: Any, at: str, arm: str, seed: int) -> float:
    run = f"arm {arm!r}, seed {seed}"
    if isinstance(raw, numbers.Real) and not isinstance(raw, bool):
        number = float(raw)
    else:
        text = _text(raw)
        if not text:
            raise DataError(
                f"{at}: empty value ({run}); leave out the row of a run that has no value"
            )
        try:
            number = float(text)
        except ValueError:
            raise DataError(f"{at}: value {raw!r} is not a number ({run})") from None
    if not math.isfinite(number):
        raise DataError(f"{at}: value {raw!r} is not a finite number ({run})")
    if abs(number) > MAX_VALUE:
        raise DataError(
            f"{at}: value {raw!r} is beyond +-{MAX_VALUE:g} ({run}), where the statistics "
            "would overflow; rescale the metric"
        )
    return number


# ---- the comparisons -------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmSummary:
    """One arm's values over seeds, within a metric and group."""

    metric: str
    group: Group
    arm: str
    summary: Summary


@dataclass
class CompareResult:
    """The comparisons of a long table, judged by the study report's rule (module docstring)."""

    table: LongTable
    baseline: str
    baseline_given: bool  # False: the first arm of the table
    pairs: tuple[tuple[str, str], ...]  # extra (variant, reference) comparisons
    comparisons: list[GroupComparison]  # metric by metric, group by group, as in the table
    families: dict[str, FamilyResult]  # metric -> its family's adjustment
    arms: list[ArmSummary]
    warnings: list[str] = field(default_factory=list)
    units: dict[str, Unit] = field(default_factory=dict)  # metric -> how differences read

    @property
    def source(self) -> str:
        return self.table.source

    def family_size(self, metric: str) -> int:
        """The comparisons of ``metric`` judged as a family (those with >= 2 common seeds)."""
        family = self.families.get(metric)
        return 0 if family is None else family.size

    def __str__(self) -> str:
        return render_text(self)


def compare_table(
    source: Source | LongTable,
    *,
    baseline: str | None = None,
    pairs: Iterable[str | Sequence[str]] = (),
    seed: int = 0,
) -> CompareResult:
    """Judge every arm of a long table against ``baseline`` (and each extra pair).

    ``source``: a CSV path, rows (mappings with ``arm``, ``seed``, ``value`` and optionally
    ``group``, ``metric``), or a :class:`LongTable`. ``baseline``: the arm the others are
    compared with; default the first arm in the table (the output says so). ``pairs``: extra
    comparisons, each ``(variant, reference)`` or ``"VARIANT:REFERENCE"``. ``seed``: the
    random streams of the bootstrap and the permutations (the study report's default, 0).

    DataError for a bad table, ConfigError for an unknown ``baseline`` or pair arm (both name
    what is wrong and what there is).
    """
    table = load_table(source)
    arms = table.arms
    if isinstance(pairs, str):  # one pair, not its characters
        pairs = [pairs]
    if baseline is None:
        chosen, given = arms[0], False
    else:
        if baseline not in arms:
            raise ConfigError(
                f"baseline {baseline!r} is not an arm of {table.source}; its arms: "
                f"{', '.join(arms)}"
            )
        chosen, given = baseline, True
    extra = _pairs(pairs, table, chosen)
    warnings: list[str] = []
    comparisons: list[GroupComparison] = []
    families: dict[str, FamilyResult] = {}
    wanted = [(a, chosen) for a in arms if a != chosen] + list(extra)
    units: dict[str, Unit] = {}
    for metric in table.metrics:
        cells = table.values[metric]
        unit = units[metric] = unit_for(v for s in cells.values() for v in s.values())
        family: list[GroupComparison] = []
        for group in table.groups:
            present = {arm for (g, arm) in cells if g == group}
            if not present:
                continue
            where = _where(table, group, metric)
            absent = [a for a in arms if a not in present and any(a in p for p in wanted)]
            skipped = [p for p in wanted if p[0] not in present or p[1] not in present]
            if skipped:
                warnings.append(
                    f"{where}no rows for {_names(absent)}, so "
                    f"{', '.join(f'{v} vs {r}' for v, r in skipped)} not compared"
                    + (" there" if where else "")
                )
            for variant, reference in wanted:
                if (variant, reference) in skipped:
                    continue
                ref, var = cells[(group, reference)], cells[(group, variant)]
                _check_seeds(table, where, variant, var, reference, ref, warnings)
                c = compare(
                    ref, var, metric=metric, names=(reference, variant), seed=seed, unit=unit
                )
                family.append(GroupComparison(group, metric, c))
        if family:
            families[metric] = judge_family(cells, family, seed=seed)
        comparisons += family
    if not comparisons:
        raise DataError(
            f"{table.source}: nothing to compare: no group"
            + (" and metric" if table.has_metric else "")
            + " holds two of the arms that are compared"
        )
    summaries = [
        ArmSummary(metric, g, a, summarize(list(s.values())))
        for metric in table.metrics
        for (g, a), s in table.values[metric].items()
    ]
    order = {(g, a): i for i, (g, a) in enumerate((g, a) for g in table.groups for a in arms)}
    summaries.sort(key=lambda s: (table.metrics.index(s.metric), order[s.group, s.arm]))
    return CompareResult(
        table, chosen, given, extra, comparisons, families, summaries, warnings, units
    )


def _pairs(
    items: Iterable[str | Sequence[str]], table: LongTable, baseline: str
) -> tuple[tuple[str, str], ...]:
    arms = table.arms
    out: list[tuple[str, str]] = []
    for item in items:
        shown = item if isinstance(item, str) else ":".join(map(str, item))
        if isinstance(item, str):
            splits = [(item[:i], item[i + 1 :]) for i, ch in enumerate(item) if ch == ":"]
            known = [s for s in splits if s[0] in arms and s[1] in arms]
            if not splits:
                raise ConfigError(f"pair {item!r}: expected VARIANT:REFERENCE")
            pair = known[0] if len(known) == 1 else splits[0]
            if len(known) > 1:
                raise ConfigError(
                    f"pair {item!r} splits into arms in {len(known)} ways: "
                    + "; ".join(f"{v} vs {r}" for v, r in known)
                )
        else:
            parts = tuple(str(x) for x in item)
            if len(parts) != 2:
                raise ConfigError(f"pair {item!r}: expected (variant, reference)")
            pair = (parts[0], parts[1])
        for name in pair:
            if name not in arms:
                raise ConfigError(
                    f"pair {shown!r}: {name!r} is not an arm of {table.source}; its arms: "
                    f"{', '.join(arms)}"
                )
        variant, reference = pair
        if variant == reference:
            raise ConfigError(f"pair {shown!r} compares {variant!r} with itself")
        if reference == baseline:
            raise ConfigError(
                f"pair {shown!r}: every arm is compared with the baseline {baseline!r} already"
            )
        if pair in out:
            raise ConfigError(f"pair {shown!r} is given twice")
        out.append(pair)
    return tuple(out)


def _where(table: LongTable, group: Group, metric: str) -> str:
    parts = ([f"group {group!r}"] if group is not None else []) + (
        [f"metric {metric!r}"] if table.has_metric else []
    )
    return ", ".join(parts) + ": " if parts else ""


def _names(names: Sequence[str]) -> str:
    return ("arm " if len(names) == 1 else "arms ") + ", ".join(repr(n) for n in names)


def _seed_list(seeds: Sequence[int]) -> str:
    shown = ", ".join(map(str, seeds[:_SHOWN_SEEDS]))
    more = f", ... ({len(seeds)} in all)" if len(seeds) > _SHOWN_SEEDS else ""
    return ("seed " if len(seeds) == 1 else "seeds ") + shown + more


def _check_seeds(
    table: LongTable,
    where: str,
    variant: str,
    var: Mapping[int, float],
    reference: str,
    ref: Mapping[int, float],
    warnings: list[str],
) -> None:
    """Warn about seeds only one arm has; DataError when the two share none."""
    common = sorted(set(var) & set(ref))
    only_v, only_r = sorted(set(var) - set(ref)), sorted(set(ref) - set(var))
    if not common:
        raise DataError(
            f"{table.source}: {where}{variant} and {reference} share no seed ({variant}: "
            f"{_seed_list(sorted(var))}; {reference}: {_seed_list(sorted(ref))}); runs are "
            "paired by seed, so they cannot be compared"
        )
    if only_v or only_r:
        parts = [
            f"{_seed_list(s)} only in {a}" for s, a in ((only_v, variant), (only_r, reference)) if s
        ]
        warnings.append(
            f"{where}{variant} vs {reference}: {' and '.join(parts)}; compared on the "
            f"{len(common)} common seed{'s' if len(common) != 1 else ''}"
        )


# ---- outputs ---------------------------------------------------------------------------------


def _baseline_note(r: CompareResult) -> str:
    if r.baseline_given:
        return ""
    return " (the first arm in the table; choose another with --baseline or baseline=)"


def _overview(r: CompareResult) -> str:
    t = r.table
    seeds = sorted({s for cells in t.values.values() for runs in cells.values() for s in runs})
    groups = [g for g in t.groups if g is not None]
    parts = [f"{t.rows} runs", f"{len(t.arms)} arms ({', '.join(t.arms)})"]
    if groups:
        parts.append(f"{len(groups)} groups ({', '.join(groups)})")
    parts.append(_seed_list(seeds))
    parts.append(
        f"{len(t.metrics)} metrics ({', '.join(t.metrics)})"
        if len(t.metrics) > 1
        else f"metric {t.metrics[0]}"
    )
    return "; ".join(parts)


def _family_text(r: CompareResult, metric: str) -> str:
    k = r.family_size(metric)
    if k == 0:
        return "no comparison with 2 or more common seeds: nothing can be claimed"
    if k == 1:
        return "one comparison, tested on its own"
    return (
        f"one family of {k} comparisons: the chance of any false claim about {metric} is at "
        f"most {ALPHA:g}"
    )


def methods(r: CompareResult) -> list[str]:
    """The rule, in sentences (the Methods of the Markdown and HTML outputs)."""
    several = len(r.table.metrics) > 1
    lines = [
        "Runs are paired by seed: each comparison uses the seeds both arms have (others are "
        "named in a warning and left out).",
        f"Per comparison (variant minus reference): the mean paired difference; a paired "
        f"t-interval ({CONFIDENCE:.0%}); a paired BCa bootstrap interval ({N_RESAMPLES} "
        "resamples; too narrow with under ~10 seeds, so never used alone); the two-sided "
        "sign-flip permutation test (exact over all 2^n sign flips for small n). With n seeds "
        f"its smallest possible p is 2/2^n: at least {min_seeds_for(ALPHA)} seeds are needed to "
        f"ever reach p < {ALPHA:g}.",
        "Family-wise error control: all comparisons of one metric (in every group) form one "
        "family; the p-values are adjusted by Westfall and Young's step-down minP procedure "
        "over within-seed permutations of the arm labels (exact when the permutations are few, "
        f"else {FAMILY_RESAMPLES} random ones): where no arm truly differs, the chance of "
        f"claiming any difference on that metric is at most {ALPHA:g}."
        + (
            f" Each of the {len(r.table.metrics)} metrics is its own family, so the chance of "
            f"a false claim is at most {ALPHA:g} per metric, not over all of them together."
            if several
            else ""
        ),
        f"A difference is claimed only when the adjusted p < {ALPHA:g} and both intervals "
        "exclude 0. Otherwise the verdict is 'no detectable difference', which is not evidence "
        "of equality: it says the seeds run cannot tell.",
        f"Units: {units_text(r)}.",
        "The same functions judge a normlab study report (normlab.report.stats.compare, "
        "normlab.report.analysis.judge_family).",
    ]
    return lines


def arms_table(r: CompareResult) -> Table:
    """Per metric, group and arm: seeds, mean ± sd and the t-interval, in the table's unit."""
    headers = ["metric", "group", "arm", "seeds", "mean ± sd", f"{CONFIDENCE:.0%} CI"]
    rows = []
    for a in r.arms:
        s = a.summary
        rows.append(
            [
                a.metric,
                a.group or "",
                a.arm + (" (baseline)" if a.arm == r.baseline else ""),
                str(s.n),
                _num(s.mean) + ("" if s.n < 2 else f" ± {_num(s.sd)}"),
                _interval(s),
            ]
        )
    return headers, rows


def comparisons_table(r: CompareResult) -> Table:
    """The study report's comparisons table (:func:`normlab.report.tables.verdict_table`)."""
    return verdict_table(r.comparisons, pairs=bool(r.pairs))


def _interval(s: Summary) -> str:
    if s.n < 2:
        return "–"
    if s.sd == 0:  # no spread: an interval of width 0 would claim a precision seeds cannot give
        return f"none: all {s.n} seeds equal"
    return f"[{_num(s.ci_low)}, {_num(s.ci_high)}]"


def _num(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:.4g}"


def _drop(t: Table, names: Sequence[str]) -> Table:
    headers, rows = t
    keep = [i for i, h in enumerate(headers) if h not in names]
    return [headers[i] for i in keep], [[row[i] for i in keep] for row in rows]


def _redundant(r: CompareResult) -> list[str]:
    """Columns that say nothing here: group without groups, metric with one metric, and the
    seeds x images interval (it needs per-image predictions; a table of values has none)."""
    out = [] if r.table.has_group and any(r.table.groups) else ["group"]
    out += [] if len(r.table.metrics) > 1 else ["metric"]
    return [*out, "seeds × images 95% CI"]


def _text_table(t: Table, indent: str = "  ") -> str:
    headers, rows = t
    widths = [max(len(x) for x in col) for col in zip(headers, *rows, strict=True)]
    lines = [
        indent + "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in (headers, *rows)
    ]
    return "\n".join(lines)


def _label(gc: GroupComparison) -> str:
    c = gc.comparison
    return (f"[{gc.group}] " if gc.group is not None else "") + f"{c.variant} vs {c.baseline}"


def render_text(r: CompareResult, *, warnings: bool = True, width: int = 100) -> str:
    """The terminal's view: overview, baseline, and per metric its family, the numbers and
    the verdicts; the per-arm numbers; the rule in two lines."""
    out = [f"normlab compare {r.source}: {_overview(r)}"]
    out.append(f"baseline: {r.baseline}{_baseline_note(r)}")
    if warnings:
        out += [f"warning: {w}" for w in r.warnings]
    drop = [*_redundant(r), "metric", "verdict"]
    for metric in r.table.metrics:
        mine = [gc for gc in r.comparisons if gc.metric == metric]
        if not mine:
            continue
        out += ["", f"{metric}: {_family_text(r, metric)}"]
        out.append(_text_table(_drop(verdict_table(mine, pairs=bool(r.pairs)), drop)))
        out.append("")
        for gc in mine:
            out.append(
                textwrap.fill(
                    gc.comparison.verdict,
                    width,
                    initial_indent=f"  {_label(gc)}: ",
                    subsequent_indent="    ",
                    break_on_hyphens=False,
                )
            )
    out += ["", "per arm:", _text_table(_drop(arms_table(r), _redundant(r)))]
    rule = (
        f"rule: a difference is claimed only when its family-wise adjusted p < {ALPHA:g} and "
        f"both {CONFIDENCE:.0%} intervals exclude 0; "
        + (
            "each metric is its own family. "
            if len(r.table.metrics) > 1
            else "all comparisons form one family. "
        )
        + f"Units: {units_text(r)}."
    )
    out += ["", textwrap.fill(rule, width, break_on_hyphens=False)]
    return "\n".join(out) + "\n"


def render_markdown(r: CompareResult) -> str:
    """The verdicts, the comparisons table, the per-arm table and the method, as Markdown."""
    out = [f"# normlab compare: `{r.source}`", "", _overview(r) + ".", ""]
    out += [f"Baseline: **{r.baseline}**{_baseline_note(r)}.", ""]
    for w in r.warnings:
        out += [f"> **Warning:** {w}", ""]
    out += ["## Verdicts", ""]
    for metric in r.table.metrics:
        mine = [gc for gc in r.comparisons if gc.metric == metric]
        if not mine:
            continue
        out += [f"### {metric}", "", f"{_family_text(r, metric).capitalize()}.", ""]
        for gc in mine:
            c = gc.comparison
            where = f"**{gc.group}**: " if gc.group is not None else ""
            out.append(f"- {where}**{c.variant}** vs **{c.baseline}**: {c.verdict}")
        out.append("")
    title = "Comparisons with the baseline" + (" and other pairs" if r.pairs else "")
    out += [f"## {title}", "", markdown_table(_drop(comparisons_table(r), _redundant(r)))]
    out += ["## Per arm", "", markdown_table(_drop(arms_table(r), _redundant(r)))]
    out += ["## Methods", ""] + [f"- {m}" for m in methods(r)]
    return "\n".join(out) + "\n"


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, tuple | list):
        return [_finite(v) for v in x]
    return x


def as_dict(r: CompareResult) -> dict[str, Any]:
    """Every number of the result, JSON-ready (NaN as null), in the table's own unit."""
    from normlab import __version__

    comparisons = []
    for gc in r.comparisons:
        c = gc.comparison
        comparisons.append(
            {
                "metric": gc.metric,
                "group": gc.group,
                "variant": c.variant,
                "reference": c.baseline,
                "seeds": list(c.seeds),
                "n": c.n,
                "reference_mean": _finite(c.baseline_mean),
                "variant_mean": _finite(c.variant_mean),
                "diff": _finite(c.diff),
                "sd_diff": _finite(c.sd_diff),
                "t_ci": _finite(c.t_ci),
                "bootstrap_ci": _finite(c.bootstrap_ci),
                "p_value": _finite(c.p_value),
                "p_adjusted": _finite(c.p_adjusted),
                "p_min": _finite(c.p_min),
                "family_size": c.family_size,
                "wins": c.wins,
                "losses": c.losses,
                "seeds_needed": c.seeds_needed,
                "detected": c.detected,
                "verdict": c.verdict,
            }
        )
    return {
        "normlab": __version__,
        "source": r.source,
        "baseline": r.baseline,
        "baseline_chosen": "given" if r.baseline_given else "the first arm in the table",
        "pairs": [list(p) for p in r.pairs],
        "arms": list(r.table.arms),
        "groups": list(r.table.groups),
        "metrics": list(r.table.metrics),
        "rule": {
            "alpha": ALPHA,
            "confidence": CONFIDENCE,
            "family": "each metric: every comparison of that metric, in every group",
            "procedure": "Westfall-Young step-down minP over within-seed permutations",
            "claim": "adjusted p < alpha and both intervals exclude 0",
            "units": units_text(r),
        },
        "families": {
            metric: {
                "size": r.family_size(metric),
                "permutations": f.permutations,
                "exact": f.exact,
            }
            for metric, f in r.families.items()
        },
        "warnings": list(r.warnings),
        "comparisons": comparisons,
        "per_arm": [
            {
                "metric": a.metric,
                "group": a.group,
                "arm": a.arm,
                "n": a.summary.n,
                "mean": _finite(a.summary.mean),
                "sd": _finite(a.summary.sd),
                "ci": _finite((a.summary.ci_low, a.summary.ci_high)),
            }
            for a in r.arms
        ],
    }


def render_json(r: CompareResult) -> str:
    """:func:`as_dict` as JSON text (standard JSON: no NaN)."""
    return json.dumps(as_dict(r), indent=2, allow_nan=False) + "\n"


_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>normlab compare {{ r.source }}</title>
<style>
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1150px; padding: 0 1em; color: #222; line-height: 1.45; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.55em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.warn { background: #fff4e5; border-left: 4px solid #f0a030; padding: 0.5em 1em; }
.detected { color: #0a6b24; font-weight: 600; }
.muted { color: #666; }
</style>
</head>
<body>
<h1>normlab compare <code>{{ r.source }}</code></h1>
<p class="muted">{{ overview }}</p>
<p>Baseline <b>{{ r.baseline }}</b>{{ baseline_note }}.</p>
{% for w in r.warnings %}<p class="warn">Warning: {{ w }}</p>{% endfor %}
<h2>Verdicts</h2>
{% for metric, family, items in verdicts %}
<h3>{{ metric }}</h3>
<p class="muted">{{ family }}.</p>
{% for gc in items %}<p class="verdict{% if gc.comparison.detected %} detected{% endif %}">
{% if gc.group is not none %}<b>{{ gc.group }}</b>: {% endif %}<b>{{ gc.comparison.variant }}</b> vs <b>{{ gc.comparison.baseline }}</b>: {{ gc.comparison.verdict }}</p>
{% endfor %}{% endfor %}
<h2>Comparisons with the baseline{% if r.pairs %} and other pairs{% endif %}</h2>
{{ table(comparisons) }}
<h2>Per arm</h2>
{{ table(arms) }}
<h2>Methods</h2>
<ul>{% for m in methods %}<li>{{ m }}</li>{% endfor %}</ul>
<p class="muted">Written by normlab compare.</p>
</body>
</html>
"""


def render_html(r: CompareResult) -> str:
    """One self-contained HTML file (inline CSS; no scripts or external resources)."""
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.globals["table"] = html_table
    drop = _redundant(r)
    verdicts = [
        (m, _family_text(r, m).capitalize(), [gc for gc in r.comparisons if gc.metric == m])
        for m in r.table.metrics
        if any(gc.metric == m for gc in r.comparisons)
    ]
    return env.from_string(_HTML).render(
        r=r,
        overview=_overview(r),
        baseline_note=_baseline_note(r),
        verdicts=verdicts,
        comparisons=_drop(comparisons_table(r), drop),
        arms=_drop(arms_table(r), drop),
        methods=methods(r),
    )


RENDERERS = {"md": render_markdown, "json": render_json, "html": render_html}
"""Format name (the CLI flag) -> renderer."""
