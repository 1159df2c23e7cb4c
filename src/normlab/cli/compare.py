"""``normlab compare FILE.csv``: judge runs from any framework (registered by normlab.cli).

``normlab compare FILE.csv [--baseline ARM] [--pair VARIANT:REFERENCE ...] [--md PATH]
[--json PATH] [--html PATH]`` reads a long table (one row per run: ``arm, seed, value``,
optionally ``group``, ``metric``; :mod:`normlab.report.compare` documents it) and prints the
verdict table a study report gives, under the same rule. ``--md``/``--json``/``--html`` also
write that format to PATH; ``-`` writes it to standard output instead of the terminal view (one
format at most). Warnings (seeds only one arm has, an arm missing from a group) go to stderr as
``normlab compare: warning: ...`` lines. Exit status 0 when the comparison ran, whatever the
verdicts; 2 for a bad table, arm name or output path.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from normlab.cli.args import output_file
from normlab.errors import ConfigError

Handler = Callable[[argparse.Namespace], int]

FORMATS = {"md": "Markdown", "json": "JSON", "html": "HTML (one self-contained file)"}
STDOUT = "-"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, Handler]:
    """Add ``compare`` to ``sub``; return its handler."""
    p = sub.add_parser(
        "compare",
        help="judge runs from any framework: a CSV of arm, seed, value -> the study verdicts",
        description=(
            "Compare arms from a long table (one row per run; columns arm, seed, value, "
            "optionally group and metric) with the rule of a normlab study report: paired by "
            "seed, intervals, the sign-flip test, family-wise adjusted p-values (each metric "
            "its own family) and a plain verdict."
        ),
    )
    p.add_argument("table", metavar="FILE.csv", help="the long table (comma-separated, UTF-8)")
    p.add_argument(
        "--baseline",
        metavar="ARM",
        help="the arm every other arm is compared with (default: the first arm in the file)",
    )
    p.add_argument(
        "--pair",
        dest="pairs",
        action="append",
        default=[],
        metavar="VARIANT:REFERENCE",
        help="also compare VARIANT with REFERENCE (repeatable; in the same family)",
    )
    for name, what in FORMATS.items():
        p.add_argument(
            f"--{name}",
            metavar="PATH",
            help=f"also write the result as {what} to PATH ({STDOUT}: to standard output, "
            "instead of the terminal view)",
        )
    return {"compare": cmd_compare}


def _outputs(args: argparse.Namespace) -> dict[str, str]:
    """Format -> path of the outputs asked for, checked: at most one to stdout, no two to one
    file, none over the input table, each writable."""
    outputs = {f: getattr(args, f) for f in FORMATS if getattr(args, f) is not None}
    to_stdout = [f"--{f}" for f, path in outputs.items() if path == STDOUT]
    if len(to_stdout) > 1:
        raise ConfigError(
            f"{' and '.join(to_stdout)} both write to standard output ({STDOUT}); give all but "
            "one of them a file"
        )
    seen: dict[str, str] = {}
    table = os.path.abspath(args.table)
    for fmt, path in outputs.items():
        if path == STDOUT:
            continue
        output_file(path, f"--{fmt}")
        where = os.path.abspath(path)
        if where == table:
            raise ConfigError(f"--{fmt} {path} is the input table; write to another file")
        if where in seen:
            raise ConfigError(f"--{seen[where]} and --{fmt} both write {path}")
        seen[where] = fmt
    return outputs


def cmd_compare(args: argparse.Namespace) -> int:
    from normlab.report.compare import RENDERERS, compare_table, load_table, render_text

    table = load_table(args.table)  # the input first: a bad table is named before any output
    outputs = _outputs(args)
    result = compare_table(table, baseline=args.baseline, pairs=args.pairs)
    written = []
    for fmt, path in outputs.items():
        text = RENDERERS[fmt](result)
        if path == STDOUT:
            sys.stdout.write(text)
        else:
            from normlab.store import atomic_write_text

            atomic_write_text(path, text)
            written.append(f"{fmt}: {Path(path)}")
    if STDOUT not in outputs.values():
        sys.stdout.write(render_text(result, warnings=False))
        for line in written:
            print(line)
    sys.stdout.flush()  # the warnings come last, where a reader of the terminal ends
    for warning in result.warnings:
        print(f"normlab compare: warning: {warning}", file=sys.stderr)
    return 0
