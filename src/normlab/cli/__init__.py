"""The ``normlab`` command line.

Every subcommand is a thin shell over a Python function. A failure is one line on stderr,
``normlab CMD: error: MESSAGE``, naming the file, field or flag at fault and what was expected;
no command prints a traceback for anything a user can type or point it at.

Exit status:

====  ==========================================================================================
0     success (``doctor``: no findings above notes)
1     ``train``/``study``: finished, but a run diverged or failed; ``doctor``: warnings found
2     a user error (bad flag, value, name, file or path; one ``error:`` line, argparse's usage
      errors included); ``doctor``: errors found (a report, not an ``error:`` line)
3     an internal error: a bug in normlab. One line names the exception; ``normlab --debug CMD
      ...`` or ``NORMLAB_DEBUG=1`` shows its traceback (and the traceback of any other error)
130   interrupted (Ctrl-C); ``train --resume`` / the same ``study`` command continues
====  ==========================================================================================

Precedence of training settings: built-in defaults < ``--config FILE.yaml`` < named flags
(``--lr``) < ``--set key=value`` (any config field, dotted: ``optim.warmup_epochs=1``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from normlab.cli.args import (
    DATA_SOURCES_HELP,
    add_data_argument,
    add_set_argument,
    output_dir,
    parse_sets,
)
from normlab.errors import NormlabError

# flag dest -> dotted config key
_TRAIN_FLAGS: dict[str, str] = {
    "model": "model.name",
    "norm": "norm.name",
    "placement": "model.placement",
    "init": "model.init",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "optim.lr",
    "optimizer": "optim.name",
    "weight_decay": "optim.weight_decay",
    "l2": "optim.l2",
    "seed": "seed",
}


def _add_train_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train",
        help="train one model into a run directory",
        description="Train one model with one normalization variant; writes a resumable run directory.",
    )
    p.add_argument(
        "--config", metavar="FILE.yaml", help="a TrainConfig YAML file (a run's config.yaml works)"
    )
    p.add_argument("--model", help="model name (see `normlab models`); default resnet20")
    p.add_argument(
        "--norm", help="bn | gn | ln | in | none | frozen_bn | brn | ghost_bn; default bn"
    )
    p.add_argument(
        "--placement", choices=["pre", "post"], help="pre: layer->norm->act; post: layer->act->norm"
    )
    p.add_argument(
        "--init",
        choices=["default", "lsuv"],
        help="weight init: default (torchvision-style) | lsuv (data-dependent unit variance, "
        "for --norm none)",
    )
    add_data_argument(p, f"{DATA_SOURCES_HELP}; default digits (bundled)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--weight-decay", type=float, help="weight decay applied by the optimizer")
    p.add_argument("--l2", type=float, help="Keras-style L2 penalty c*sum(w^2) added to the loss")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--out",
        metavar="DIR",
        help="run directory (default runs/<time>-<model>-<norm>-<placement>)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="DIR",
        help="continue the interrupted run in --out (or in DIR)",
    )
    add_set_argument(
        p, "set any config field, e.g. --set optim.schedule=step --set model.alpha=0.5"
    )
    p.add_argument(
        "--probe",
        metavar="NAMES",
        help="comma-separated probes recorded every epoch: weights,bn,shift,acts,gap "
        "(options after colons, e.g. shift:batches=16:val_samples=0)",
    )
    p.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="train with DDP in N processes (launches torchrun; GPUs on CUDA, CPU cores otherwise)",
    )
    p.add_argument(
        "--log",
        metavar="LOGGERS",
        help="also log every epoch's metrics to: tensorboard (<run>/tensorboard) and/or mlflow "
        "(an MLflow file store: <run>/mlruns, or mlflow:DIR), comma-separated; "
        "metrics.jsonl stays the record",
    )
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines or progress bar")


def build_train_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> Any:
    """The TrainConfig described by parsed ``normlab train`` arguments over ``base``."""
    from normlab.config import apply_overrides, config_from_dict, load_yaml
    from normlab.data import split_data_spec

    data: dict[str, Any] = dict(base or {})
    source = None
    if args.config:
        data = load_yaml(args.config)
        source = args.config
    overrides: dict[str, Any] = {}
    for dest, key in _TRAIN_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            overrides[key] = value
    if args.data is not None:
        overrides["data.name"], overrides["data.path"] = split_data_spec(args.data)
    if args.probe:
        overrides["probes"] = [name.strip() for name in args.probe.split(",") if name.strip()]
    overrides.update(parse_sets(args.overrides))
    merged = apply_overrides(data, overrides)
    return config_from_dict(merged, source=source), bool(overrides) or bool(args.config)


def _without_devices(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
        elif item == "--devices":
            skip = True
        elif not item.startswith("--devices="):
            out.append(item)
    return out


def _launch_devices(args: argparse.Namespace) -> int:
    """``normlab train --devices N``: rerun this command under torchrun in N processes."""
    from normlab.engine.distributed import launch
    from normlab.train.setup import default_run_dir

    if os.environ.get("WORLD_SIZE") not in (None, "1"):
        raise NormlabError("--devices inside a torchrun job: drop --devices (torchrun sets it)")
    config, _ = build_train_config(args)
    argv = _without_devices(args.raw_argv)
    if not args.out and args.resume in (False, True):
        argv += ["--out", str(default_run_dir(config))]  # one directory for every rank
    device = config.runtime.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    code = launch(args.devices, argv, device_type=device.split(":")[0])
    if code != 0:
        print(
            f"normlab train: error: the {args.devices}-process job failed (exit status {code}); "
            "a rank that stops ends the others. Resume with --resume once the cause is fixed.",
            file=sys.stderr,
        )
    return code


def cmd_train(args: argparse.Namespace) -> int:
    from normlab.engine.loggers import make_loggers, parse_loggers
    from normlab.store import RunDir
    from normlab.train import fit
    from normlab.train.setup import default_run_dir

    loggers = parse_loggers(args.log)  # a missing extra fails here, before anything runs
    resume = args.resume is not False
    out = args.out
    if isinstance(args.resume, str):
        if out and Path(out) != Path(args.resume):
            raise NormlabError(f"--resume {args.resume} and --out {out} name different runs")
        out = args.resume
    if resume and not out:
        raise NormlabError("--resume needs the run directory: --resume DIR or --out DIR --resume")
    config = None
    if resume and RunDir(out).exists():
        saved = RunDir(out).read_config_dict()
        config, explicit = build_train_config(args, base=saved)
        if not explicit:
            config = None
    else:
        config, _ = build_train_config(args)
    if resume and not RunDir(out).exists():
        raise NormlabError(f"--resume: {out} holds no run to continue (no config.yaml)")
    if os.environ.get("RANK", "0") == "0":  # only rank 0 writes; other ranks' probes would race
        if out:
            output_dir(out, "--resume" if isinstance(args.resume, str) else "--out")
        elif config is not None:
            output_dir(default_run_dir(config), "--out (default)")
    if args.devices is not None and args.devices != 1:
        return _launch_devices(args)  # after every check: the ranks would each fail alike
    callbacks = make_loggers(loggers)
    result = fit(config, out=out, resume=resume, callbacks=callbacks, verbose=not args.quiet)
    s = result.summary
    if not args.quiet and os.environ.get("RANK", "0") == "0":
        best = s.get("best/val/acc")
        print(
            f"{result.status}: {result.run_dir}  final val acc {s.get('final/val/acc')}"
            f"  best {best} (epoch {s.get('best/epoch')})  {s.get('wall_seconds')} s"
        )
    return 0 if result.status == "completed" else 1


def cmd_models(args: argparse.Namespace) -> int:
    from normlab.models import list_models

    for entry in list_models():
        print(f"{entry.name}: {entry.description}")
        for opt, (default, text) in entry.options.items():
            print(f"    {opt} = {default!r}  {text}")
    print(
        "third-party models: torchvision:NAME (torchvision.models.list_models()), timm:NAME "
        "(timm.list_models()) or module:callable, built untrained, placement pre; options: xbn, "
        "xbn_groups, kwargs (see normlab.models.external)"
    )
    return 0


Handler = Callable[[argparse.Namespace], int]


def _plugins(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, Handler]:
    """The study, compare and BN-toolbox subcommands: each module defines ``register(sub) ->
    dict[str, Handler]`` adding its parsers to ``sub`` (they import their features only when
    run)."""
    from normlab.cli import bn, compare, study

    handlers: dict[str, Handler] = {}
    for module in (study, compare, bn):
        handlers.update(module.register(sub))
    return handlers


def make_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    """The ``normlab`` parser and the handler of each subcommand."""
    import normlab

    parser = argparse.ArgumentParser(
        prog="normlab",
        description="Normalization studies for CNNs, and a BatchNorm toolbox.",
    )
    parser.add_argument("--version", action="version", version=f"normlab {normlab.__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the Python traceback of an error (also: {DEBUG_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(sub)
    sub.add_parser("models", help="list models and their options")
    handlers: dict[str, Handler] = {"train": cmd_train, "models": cmd_models}
    handlers.update(_plugins(sub))
    return parser, handlers


EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3
DEBUG_ENV = "NORMLAB_DEBUG"


def _debugging(args: argparse.Namespace) -> bool:
    return bool(args.debug) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def _one_line(text: str) -> str:
    """A message as one line: a library's multi-line text (YAML's parser errors) joined."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``normlab ARGV``; return the exit status (see the module docstring)."""
    parser, handlers = make_parser()
    args = parser.parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0
    command = args.command
    try:
        return handlers[command](args)
    except KeyboardInterrupt:
        print(f"normlab {command}: interrupted; resume with --resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return reader_gone()
    except NormlabError as exc:
        if _debugging(args):
            raise
        print(f"normlab {command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        # The environment refused a read or write that the checks before it could not foresee
        # (the disk filled up, a file vanished, permissions changed): name the file.
        if _debugging(args):
            raise
        if exc.filename is None:
            return _internal_error(command, exc)
        print(
            f"normlab {command}: error: {exc.filename}: {exc.strerror or type(exc).__name__}",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    except Exception as exc:
        if _debugging(args):
            raise
        return _internal_error(command, exc)


def reader_gone() -> int:
    """The reader of stdout went away (``normlab ... | head``): stop quietly, as a command
    killed by SIGPIPE would (exit status 141), without a second error when Python flushes
    stdout at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor behind stdout
        pass
    return 141


def _internal_error(command: str, exc: BaseException) -> int:
    detail = _one_line(str(exc))[:300]
    print(
        f"normlab {command}: internal error: {type(exc).__name__}"
        + (f": {detail}" if detail else "")
        + f" (a bug in normlab; run `normlab --debug {command} ...` or set {DEBUG_ENV}=1 to "
        "see the traceback, and please report it)",
        file=sys.stderr,
    )
    return EXIT_INTERNAL_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
