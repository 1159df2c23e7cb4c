"""``normlab study``, ``normlab studies`` and ``normlab report`` (registered by normlab.cli).

``normlab study NAME|FILE|DIR [--out DIR] [--seeds N] [--epochs E] [--data D] [--set k=v ...]
[--jobs J] [--executor local|ray] [--ray-address ADDR]`` runs a study and writes its report;
the same command again resumes it. Command-line settings change the study's base config (a key
that a group or variant sets keeps the group's or variant's value; the command says so).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from normlab.cli.args import (
    DATA_SOURCES_HELP,
    add_data_argument,
    add_set_argument,
    output_dir,
    parse_sets,
)
from normlab.errors import ConfigError

Handler = Callable[[argparse.Namespace], int]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, Handler]:
    """Add the study subcommands to ``sub``; return their handlers."""
    p = sub.add_parser(
        "study",
        help="run a study (variants x seeds) and write its report; rerun to resume",
        description=(
            "Run every variant of a study over several seeds, in parallel, resumably (rerun "
            "the same command after an interruption), and write report.html/.md and "
            "results.csv into the study directory."
        ),
    )
    p.add_argument(
        "study",
        metavar="NAME|FILE|DIR",
        help="a built-in study (see `normlab studies`), a study YAML file, or a study directory",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="study directory (default: studies/<name>; the study DIR itself when given one)",
    )
    p.add_argument(
        "--seeds",
        metavar="N",
        help="number of seeds (0..N-1) or a comma-separated list of seeds",
    )
    p.add_argument("--epochs", type=int, help="epochs of every run")
    add_data_argument(p, f"data source for every run ({DATA_SOURCES_HELP})")
    add_set_argument(p, "set a field of the base config, e.g. --set optim.lr=0.05 (repeatable)")
    p.add_argument("--jobs", type=int, help="runs in parallel (default: one per CPU core)")
    p.add_argument(
        "--executor",
        default="local",
        help="local (worker processes, default) | serial (in this process, one at a time) | "
        "ray (a Ray cluster; pip install 'normlab[ray]')",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="Ray cluster to use (host:port or auto); default: start a local Ray instance",
    )
    p.add_argument(
        "--stack-seeds",
        action="store_true",
        help="train each arm's seeds together as one stacked model (CPU, batch <= 8: about "
        "2.5x the training images/s at batch 2 and 1.5x at 8 with 6 seeds; not bit-identical "
        "to separate runs, it differs as a memory-layout change does; local and serial "
        "executors; anything it cannot stack trains separately)",
    )
    p.add_argument(
        "--momentum-twins",
        action="store_true",
        help="train the arms that differ only in BN momentum once per seed, each keeping its "
        "own running statistics (they do not feed back into training): bit-identical to "
        "separate runs; local and serial executors; anything else trains separately",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the runs and their state; run nothing"
    )
    p.add_argument(
        "--log",
        metavar="LOGGERS",
        help="log every run to tensorboard (<run>/tensorboard) and/or mlflow (<study>/mlruns, "
        "or mlflow:DIR), comma-separated; replaces the study's log: list",
    )
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--quiet", action="store_true", help="no progress display")

    s = sub.add_parser("studies", help="list the built-in studies")
    s.add_argument(
        "--show", metavar="NAME", help="print a built-in study's YAML (to copy and edit)"
    )

    r = sub.add_parser(
        "report",
        help="write a study's report (report.html, report.md, results.csv)",
        description="(Re)write the report of a study directory from its run directories.",
    )
    r.add_argument("study_dir", metavar="STUDY_DIR")
    return {"study": cmd_study, "studies": cmd_studies, "report": cmd_report}


def _parse_seeds(text: str | None) -> int | list[int] | None:
    if text is None:
        return None
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        return int(text)
    except ValueError:
        raise ConfigError(
            f"--seeds must be a count (5) or a comma-separated list (0,1,7), got {text!r}"
        ) from None


def _command() -> str:
    return " ".join(["normlab", *sys.argv[1:]]) if sys.argv else "normlab"


def cmd_study(args: argparse.Namespace) -> int:
    import dataclasses

    from normlab.engine.loggers import parse_loggers
    from normlab.study.spec import STUDY_FILE, load_spec, shadowed_keys, validate, with_overrides

    spec = load_spec(args.study)
    if args.log is not None:
        spec = dataclasses.replace(spec, log=tuple(map(str, parse_loggers(args.log))))
        validate(spec)
    overrides = parse_sets(args.overrides)
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
    spec = with_overrides(
        spec,
        seeds=_parse_seeds(args.seeds),
        epochs=args.epochs,
        data=args.data,
        overrides=overrides,
    )
    given = Path(args.study)
    if args.out:
        out = Path(args.out)
    elif given.is_dir():
        out = given
    elif given.name == STUDY_FILE and given.is_file():
        out = given.parent
    else:
        out = Path("studies") / spec.name
    output_dir(out, "--out")
    keys = list(overrides) + (["epochs"] if args.epochs is not None else [])
    keys += ["data.name", "data.path"] if args.data else []
    stream = None if args.quiet else sys.stderr
    for note in shadowed_keys(spec, keys):
        print(
            f"note: {note} sets its own value; the command-line one does not reach it",
            file=sys.stderr,
        )

    from normlab.study.executors import make_executor

    # the executor's name and --jobs are checked before anything runs, with --dry-run too
    executor = make_executor(args.executor, jobs=args.jobs, address=args.ray_address)
    if args.stack_seeds and args.momentum_twins:
        raise ConfigError("choose one of --stack-seeds and --momentum-twins")
    if args.dry_run:
        from normlab.study.runner import plan_only

        for run, state in plan_only(spec, out):
            print(
                f"{run.key:40s} {state.status:10s} {state.epochs_done}/{run.config.epochs}  {run.run_dir}"
            )
        return 0

    from normlab.study.runner import run_study

    try:
        result = run_study(
            spec,
            out,
            executor=executor,
            stream=stream,
            command=_command(),
            stack_seeds=args.stack_seeds,
            momentum_twins=args.momentum_twins,
        )
    except KeyboardInterrupt:
        print(
            f"normlab study: interrupted; run the same command (or `normlab study {out}`) "
            "to resume",
            file=sys.stderr,
        )
        return 130
    if not args.no_report:
        from normlab.report import write_report

        paths = write_report(out)
        if stream is not None:
            print(f"report: {paths['html']}", file=stream)
    return 0 if result.ok else 1


def cmd_studies(args: argparse.Namespace) -> int:
    from normlab.study.spec import builtin_names, builtin_text, load_spec

    if args.show:
        print(builtin_text(args.show), end="")
        return 0
    for name in builtin_names():
        spec = load_spec(name)
        groups = f"; groups: {', '.join(g.name for g in spec.groups)}" if spec.groups else ""
        print(f"{name}: {spec.description}")
        print(
            f"    variants: {', '.join(spec.variant_names)} (baseline {spec.baseline}){groups};"
            f" {len(spec.seeds)} seeds"
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from normlab.report import write_report

    output_dir(args.study_dir, "STUDY_DIR")
    paths = write_report(args.study_dir)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
