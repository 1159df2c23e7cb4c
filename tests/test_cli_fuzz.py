"""Property: no command line, however hostile, makes ``normlab`` print a traceback.

The command lines are generated from the parser itself (``normlab.cli.make_parser()``): every
subcommand, every positional and every option it declares, so an option added later is fuzzed
without touching this file. Each argument gets values by what it is, read from the parser:

* by ``type``: integers (``-1``, ``0``, ``10**30``, ``2**63``, ``abc``, ``1.5``, ...) or numbers
  (``nan``, ``inf``, ``-1``, ``1e30``, ...); by ``choices``: each choice and a bogus one;
  ``nargs=0`` flags: present or not;
* by ``metavar`` (what the help calls it): input files and targets (``TARGET``, ``IN``, ``FILE``,
  ...) get missing paths, directories, empty files, a text file named ``.pt``, random bytes
  named ``.pt``/``.onnx``/``.keras``/``.h5``/``.safetensors``, YAML that is empty, a list, a
  scalar, broken or binary, unknown and unbuildable ``module:callable`` names (``torch.nn:Linear``,
  ``os:system``, ...), a corrupt run directory, and a few tiny valid targets (a run directory,
  a state_dict, a pickled module, ``normlab:resnet20``); long tables (``FILE.csv``) get empty,
  binary, headless, malformed and contradictory CSVs and a few valid ones, with arm names and
  ``VARIANT:REFERENCE`` pairs known and unknown; outputs (``DIR``, ``OUT``, ``PATH``)
  get existing files where a directory is needed and vice versa, paths under a file, and
  ``/proc`` paths nothing can create; ``--data``, ``--set``, ``--probe``, ``--input-shape``,
  ``--seeds`` get malformed and unknown values; any other string gets unknown names, empty and
  overlong strings.

Bounded work: a command that writes (its parser has an output argument, or is ``report``)
always gets an output it cannot write, so it must fail; every command checks all of its inputs
before that output check and checks the output before any real work (training, a study,
folding, timing, export, recalibration), so each example stops in milliseconds to a second.
``doctor`` writes nothing: its targets are tiny, its data sources small (``cifar10`` is only
ever given a bad path, so nothing downloads). A per-example alarm turns a command that runs
too long into a failure naming it. Commands run in-process through ``main(argv)``.

Asserted for each example: the exit status is one the CLI documents (0, 1, 2; 2 for every
command that was given an unwritable output), stderr holds no traceback and no internal-error
line, and a failure prints exactly one ``error:`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import signal
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normlab.cli import main, make_parser

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

EXAMPLES = 500
SECONDS_PER_EXAMPLE = 30
HUGE = str(10**30)

# ---- the files the values point at ---------------------------------------------------------------


def _make_files(root: Path) -> dict[str, str]:
    """Hostile and tiny valid files under ``root``; name -> absolute path."""
    from normlab.models import build_model

    rng = torch.Generator().manual_seed(0)

    def noise(n: int) -> bytes:
        return bytes(torch.randint(0, 256, (n,), generator=rng, dtype=torch.uint8).tolist())

    files: dict[str, bytes | str | None] = {
        "text.pt": "hello\n",
        "noise.pt": noise(300),
        "empty.pt": b"",
        "zipjunk.pt": b"PK\x03\x04 not really a zip",
        "text.ckpt": "model: resnet20\n",
        "noise.onnx": noise(300),
        "text.onnx": "ir_version: 7\n",
        "noise.keras": noise(300),
        "noise.h5": noise(300),
        "empty.h5": b"",
        "noise.safetensors": noise(64),
        "empty.yaml": "",
        "list.yaml": "- a\n- b\n",
        "scalar.yaml": "hello\n",
        "broken.yaml": "a: [\n",
        "binary.yaml": noise(100),
        "unknown-key.yaml": "epochs: 1\nbogus: 2\n",
        "somefile": "just a file\n",
        "adir": None,
        "adir.pt": None,
    }
    out: dict[str, str] = {}
    for name, content in files.items():
        path = root / name
        if content is None:
            path.mkdir()
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
        out[name] = str(path)
    # Keras files whose container is right and whose content is not
    with zipfile.ZipFile(root / "junk.keras", "w") as zf:
        zf.writestr("config.json", '{"config": {"layers": [1, "x"]}}')
        zf.writestr("model.weights.h5", b"not hdf5")
    out["junk.keras"] = str(root / "junk.keras")
    try:
        import h5py
    except ImportError:  # the bn extra is not installed: .h5 files are refused before h5py
        pass
    else:
        with h5py.File(root / "list-config.h5", "w") as h5:
            h5.attrs["model_config"] = "[1, 2]"
        out["list-config.h5"] = str(root / "list-config.h5")
    model = build_model("resnet20", 4, input_size=8)
    torch.save(model.state_dict(), root / "sd.pt")
    torch.save(model, root / "module.pt")
    torch.save([1, 2, 3], root / "list.pt")
    torch.save({"a": 1}, root / "dict.pt")
    for name in ("sd.pt", "module.pt", "list.pt", "dict.pt"):
        out[name] = str(root / name)
    # a tiny real run directory, and a copy whose checkpoint and config are damaged
    run = root / "run"
    code = main(
        [
            "train", "--model", "resnet20", "--data", "synthetic", "--epochs", "1",
            "--batch-size", "16", "--set", "data.synthetic_samples=64",
            "--set", "data.synthetic_image_size=8", "--set", "data.synthetic_classes=4",
            "--set", "data.val_split=0.25", "--set", "runtime.threads=1", "--quiet",
            "--out", str(run),
        ]
    )  # fmt: skip
    assert code == 0
    broken = root / "broken-run"
    broken.mkdir()
    for child in run.iterdir():
        (broken / child.name).write_bytes(child.read_bytes())
    (broken / "checkpoint.pt").write_text("not a checkpoint\n")
    bad_config = root / "bad-config-run"
    bad_config.mkdir()
    for child in run.iterdir():
        (bad_config / child.name).write_bytes(child.read_bytes())
    (bad_config / "config.yaml").write_bytes(noise(80))
    # long tables for `compare`: the valid ones have arms bn, gn, ln and seeds 0-3
    runs = "arm,seed,value\n" + "".join(
        f"{a},{s},{0.9 + 0.01 * i + 0.003 * ((s * 5 + i) % 4)}\n"
        for i, a in enumerate(("bn", "gn", "ln"))
        for s in range(4)
    )
    tables = {
        "runs.csv": runs,
        "grouped.csv": "group,metric,arm,seed,value\n"
        + "".join(f"g{g},m{m},{row}\n" for g in (1, 2) for m in (1, 2) for row in runs.split()[1:]),
        "missing-seed.csv": runs + "gn,7,0.5\n",
        "empty.csv": "",
        "header-only.csv": "arm,seed,value\n",
        "wrong-columns.csv": "run,acc\nx,1\n",
        "tabs.csv": "arm\tseed\tvalue\nbn\t0\t1\n",
        "one-arm.csv": "arm,seed,value\nbn,0,1\nbn,1,2\n",
        "bad-value.csv": runs + "bn,9,abc\n",
        "bad-seed.csv": runs + "bn,1.5,0.9\n",
        "duplicate.csv": runs + "bn,0,0.9\n",
        "disjoint.csv": "arm,seed,value\nbn,0,1\nbn,1,2\ngn,5,1\ngn,6,2\n",
        "extreme.csv": "arm,seed,value\nbn,0,1e99\nbn,1,-1e99\ngn,0,-1e99\ngn,1,1e99\n",
        "ragged.csv": 'arm,seed,value\nbn,0,0,9\n"gn,1\n',
    }
    for name, text in tables.items():
        (root / name).write_text(text)
        out[name] = str(root / name)
    (root / "noise.csv").write_bytes(noise(120))
    out["noise.csv"] = str(root / "noise.csv")
    study = root / "bad-study"
    study.mkdir()
    (study / "study.yaml").write_bytes(noise(80))
    out.update(run=str(run), broken_run=str(broken), bad_config_run=str(bad_config))
    out["bad_study"] = str(study)
    return out


@dataclass(frozen=True)
class Pools:
    """Values by kind of argument (see the module docstring)."""

    hostile: dict[str, list[str]]
    """Values a command should refuse, or that are unusual (0, huge, empty)."""
    benign: dict[str, list[str]]
    """Ordinary values, so that a command line gets past its first argument more often."""
    unwritable: dict[str, list[str]]
    """For output kinds: values the command must refuse (an output it cannot write)."""


def _pools(f: dict[str, str], root: Path) -> Pools:
    missing = str(root / "no-such" / "thing.pt")
    overlong = str(root / ("x" * 300 + ".pt"))  # longer than a file name may be
    under_file = f"{f['somefile']}/child"
    proc = Path("/proc/self").is_dir()
    nowhere = "/proc/normlab-fuzz/x" if proc else f"{f['somefile']}/deeper/x"
    inputs = [
        missing,
        overlong,
        f["adir"],
        f["adir.pt"],
        f["somefile"],
        f["text.pt"],
        f["noise.pt"],
        f["empty.pt"],
        f["zipjunk.pt"],
        f["text.ckpt"],
        f["noise.onnx"],
        f["text.onnx"],
        f["noise.keras"],
        f["noise.h5"],
        f["empty.h5"],
        f["noise.safetensors"],
        f["junk.keras"],
        *([f["list-config.h5"]] if "list-config.h5" in f else []),
        f["list.yaml"],
        f["broken_run"],
        f["bad_config_run"],
        f["list.pt"],
        f["dict.pt"],
        f["module.pt"],  # refused without --unsafe-load
    ]
    callables = [
        "torch.nn:Linear",
        "os:system",
        "os:getcwd",
        "builtins:exit",
        "torch:nn",
        "torch.nn:NoSuch",
        "no.such.module:thing",
        "normlab:nosuch",
        "normlab:resnet20,bogus=1",
        "normlab:resnet20,num_classes=0",
        f"normlab:resnet20,num_classes={HUGE}",
        "normlab:resnet20,placement",
        "torch.nn:Identity",
    ]
    valid_targets = [
        f["run"],
        f["sd.pt"],
        f["module.pt"],
        "normlab:resnet20",
        "torch.nn:BatchNorm2d,num_features=3",
    ]
    yaml_files = [
        f["list.yaml"],
        f["scalar.yaml"],
        f["broken.yaml"],
        f["binary.yaml"],
        f["unknown-key.yaml"],
        f["adir"],
        f["text.pt"],
        missing,
        overlong,
    ]
    names = ["bogus", "", "NONE", "x" * 300, "nan", "1e-3", "../../etc/passwd", "a:b", "=", ","]
    names += ["torchvision:bogus", "timm:bogus", "torchvision:", "timm:resnet18:x"]
    bad_tables = [
        "noise.csv", "empty.csv", "header-only.csv", "wrong-columns.csv", "tabs.csv",
        "one-arm.csv", "bad-value.csv", "bad-seed.csv", "duplicate.csv", "disjoint.csv",
        "extreme.csv", "ragged.csv",
    ]  # fmt: skip
    hostile = {
        "target": inputs + callables,
        "torch_file": inputs,
        "yaml_file": yaml_files,
        "study": [*yaml_files, f["empty.yaml"], f["bad_study"], "bogus", f["run"]],
        "study_dir": [missing, overlong, f["somefile"], f["adir"], f["bad_study"], f["run"]],
        "out_dir": [f["somefile"], under_file, nowhere, overlong],
        "out_file": [f["adir"], under_file, nowhere, overlong],
        "data": [
            "bogus",
            "",
            ":",
            "digits:/x",
            "imagefolder",
            f"imagefolder:{missing}",
            f"imagefolder:{f['somefile']}",
            f"imagefolder:{f['adir']}",
            f"cifar10:{missing}",  # cifar10 only ever with a path: nothing downloads
            f"cifar10:{f['text.pt']}",
            f"cifar10:{overlong}",
        ],
        "override": [
            "bogus",
            "=1",
            "epochs=",
            "optim.lr=abc",
            "optim.lr=-1",
            "optim.lr=nan",
            "epochs=0",
            f"epochs={HUGE}",
            "seed=-1",
            f"seed={HUGE}",
            "model=null",
            "data=[1]",
            "norm.name=bogus",
            f"data.synthetic_samples={HUGE}",
            f"data.synthetic_image_size={HUGE}",
            "runtime.threads=0",
            f"runtime.threads={HUGE}",
            "probes=[bogus]",
            "devices=0",
            "no.such.key=1",
            "data.val_split=2",
            "model.placement=sideways",
        ],
        "callable": callables,
        "shape": ["1,8,8", "0", "-1", "3,0,8", "abc", f"3,{HUGE},2", "", "1,2,3", "3,1,1"],
        "probes": ["bogus", "shift:batches=abc", ",,", "shift:nosuch=1"],
        "loggers": [
            "bogus",
            "",
            ",",
            "tensorboard:x",
            "tensorboard,tensorboard",
            f"mlflow:{f['somefile']}",
            f"mlflow:{nowhere}",
            f"mlflow:{overlong}",
        ],
        "count": ["0", "-1", HUGE, "a", ",", "1,1", f"0,{HUGE}", "-1,2"],
        "name": names,
        "csv_file": [missing, overlong, f["adir"], f["somefile"], f["text.pt"]]
        + [f[name] for name in bad_tables],
        "arm": [*names, "BN", "bn "],
        "pair": [*names, "bn:bn", "gn:bn", "gn:bogus", "gn", ":", "gn:ln:bn", "::"],
        "int": ["-1", "0", HUGE, str(2**63), f"-{HUGE}", "abc", "1.5", "", "nan"],
        "float": ["-1", "1e30", HUGE, "nan", "inf", "-inf", "abc", ""],
    }
    benign = {
        "target": valid_targets,
        "torch_file": [f["sd.pt"]],
        "yaml_file": [f["empty.yaml"]],
        "study": ["placement", "batch-size"],
        "out_dir": [str(root / "fresh" / "run")],
        "out_file": [str(root / "fresh" / "out.pt")],
        "data": ["digits", "synthetic", "run"],
        "override": ["epochs=1", "optim.lr=0.05", "data.val_split=0.25"],
        "callable": ["normlab:resnet20", "torch.nn:BatchNorm2d,num_features=3"],
        "shape": ["3,8,8", "3x8x8", "3,16,16"],
        "probes": ["weights", "bn", "shift:batches=2"],
        "loggers": ["tensorboard", "mlflow", "tensorboard,mlflow"],
        "count": ["1", "3", "0,1"],
        "csv_file": [f["runs.csv"], f["grouped.csv"], f["missing-seed.csv"]],
        "arm": ["bn", "gn", "ln"],
        "pair": ["gn:ln", "ln:gn", "bn:gn"],
        "int": ["1", "2", "3", "8"],
        "float": ["0", "0.001", "0.5"],
    }
    unwritable = {
        "out_dir": [f["somefile"], under_file, nowhere, overlong],
        "out_file": [f["adir"], under_file, nowhere, overlong],
        "study_dir": hostile["study_dir"],
    }
    return Pools(hostile, benign, unwritable)


# ---- reading the parser ------------------------------------------------------------------------

KIND_BY_METAVAR = {
    "TARGET": "target",
    "IN": "target",
    "CHECKPOINT": "target",
    "FILE": "torch_file",
    "FILE.yaml": "yaml_file",
    "NAME|FILE|DIR": "study",
    "FILE.csv": "csv_file",
    "ARM": "arm",
    "VARIANT:REFERENCE": "pair",
    "STUDY_DIR": "study_dir",
    "DIR": "out_dir",
    "OUT": "out_file",
    "PATH": "out_file",
    "SOURCE[:PATH]": "data",
    "KEY=VALUE": "override",
    "MODULE:CALLABLE": "callable",
    "C,H,W": "shape",
    "NAMES": "probes",
    "LOGGERS": "loggers",
    "N": "count",
    "NAME": "name",
    "ADDR": "name",
}
OUTPUT_KINDS = ("out_dir", "out_file", "study_dir")


def _kind(action: argparse.Action) -> str:
    if action.choices is not None:
        return "choice"
    if action.type is not None:
        value = action.type("1")  # type: ignore[operator]
        return "int" if isinstance(value, int) else "float"
    return KIND_BY_METAVAR.get(str(action.metavar), "name")


@dataclass(frozen=True)
class Command:
    name: str
    positionals: list[argparse.Action]
    options: list[argparse.Action]

    @property
    def outputs(self) -> list[argparse.Action]:
        return [a for a in self.positionals + self.options if _kind(a) in OUTPUT_KINDS]


def _commands() -> list[Command]:
    parser, _ = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = []
    for name, p in sorted(sub.choices.items()):
        actions = [a for a in p._actions if not isinstance(a, argparse._HelpAction)]
        commands.append(
            Command(
                name,
                [a for a in actions if not a.option_strings],
                [a for a in actions if a.option_strings],
            )
        )
    return commands


COMMANDS = _commands()


# ---- the strategy ------------------------------------------------------------------------------


def _values(pools: Pools, action: argparse.Action, *, unwritable: bool) -> st.SearchStrategy[str]:
    kind = _kind(action)
    if kind == "choice":
        assert action.choices is not None
        choices = st.sampled_from(list(map(str, action.choices)))
        return st.one_of(choices, choices, st.just("bogus"))
    if unwritable:
        return st.sampled_from(pools.unwritable[kind])
    hostile = st.sampled_from(pools.hostile[kind])
    if kind not in pools.benign:
        return hostile
    benign = st.sampled_from(pools.benign[kind])
    return st.one_of(benign, benign, hostile)  # two in three ordinary: reach deeper


def _option(flag: str, value: str) -> list[str]:
    # "--x=-1" keeps argparse from reading a value that starts with "-" as an option
    return [f"{flag}={value}"] if value.startswith("-") or not value else [flag, value]


@st.composite
def command_lines(draw: st.DrawFn, pools: Pools) -> tuple[list[str], bool]:
    """(argv, must_fail): must_fail when the command was given an output it cannot write."""
    command = draw(st.sampled_from(COMMANDS))
    forced = draw(st.sampled_from(command.outputs)) if command.outputs else None
    argv = [command.name]
    for action in command.positionals:
        count = draw(st.integers(1, 3)) if action.nargs in ("+", "*") else 1
        for _ in range(count):
            argv.append(draw(_values(pools, action, unwritable=action is forced)))
    chosen = [a for a in command.options if draw(st.booleans())]
    if forced is not None and forced.option_strings and forced not in chosen:
        chosen.append(forced)
    for action in command.options:
        if action.required and action not in chosen:
            chosen.append(action)
    for action in draw(st.permutations(chosen)):
        flag = draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:
            argv.append(flag)
            continue
        if action.nargs == "?" and action is not forced and draw(st.booleans()):
            argv.append(flag)  # the option's const
            continue
        repeats = draw(st.integers(1, 2)) if isinstance(action, argparse._AppendAction) else 1
        for _ in range(repeats):
            argv += _option(flag, draw(_values(pools, action, unwritable=action is forced)))
    return argv, forced is not None


# ---- running one command -----------------------------------------------------------------------


class TooSlow(BaseException):
    """A generated command ran past SECONDS_PER_EXAMPLE (a BaseException: nothing catches it)."""


@contextlib.contextmanager
def _deadline(seconds: float, argv: list[str]) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise TooSlow(f"normlab {' '.join(argv)} ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run(argv: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(out),
        _deadline(SECONDS_PER_EXAMPLE, argv),
    ):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return code, err.getvalue()


ERROR_LINE = re.compile(r"^normlab(?: [\w-]+)?: (?:internal )?error: ")


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    root = tmp_path_factory.mktemp("fuzz")
    files = _make_files(root)
    work = root / "cwd"  # relative paths (a default run directory) land here, if anywhere
    work.mkdir()
    before = Path.cwd()
    debug = os.environ.pop("NORMLAB_DEBUG", None)
    os.chdir(work)
    try:
        yield _pools(files, root)
    finally:
        os.chdir(before)
        if debug is not None:
            os.environ["NORMLAB_DEBUG"] = debug


def test_parser_kinds_are_known() -> None:
    """Every string argument of every command has a value pool chosen by its metavar: a new
    metavar fails here until it is given one (it would get only the generic 'name' pool), and
    the commands that write are the ones the strategy hands an unwritable output."""
    for command in COMMANDS:
        for action in command.positionals + command.options:
            if action.nargs != 0 and action.choices is None and action.type is None:
                assert action.metavar in KIND_BY_METAVAR or action.metavar is None, (
                    command.name,
                    action.option_strings,
                    action.metavar,
                )
    writers = {c.name for c in COMMANDS if c.outputs}
    assert writers == {
        "compare", "convert", "export", "fold", "recalibrate", "report", "study", "train"
    }  # fmt: skip


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_command_line_ends_in_a_traceback(pools: Pools, data: st.DataObject) -> None:
    argv, must_fail = data.draw(command_lines(pools), label="argv")
    code, err = run(argv)
    shown = f"normlab {' '.join(argv)} -> {code}\n{err}"
    assert "Traceback" not in err, shown
    errors = [line for line in err.splitlines() if ERROR_LINE.match(line)]
    assert not any(": internal error: " in line for line in errors), shown
    if must_fail:
        assert code == 2, shown
    assert code in (0, 1, 2), shown
    if code == 2 and not (argv[0] == "doctor" and not errors):  # doctor's 2: errors found
        assert len(errors) == 1, shown
        assert errors[0].split(" error: ", 1)[1].strip(), shown
    else:
        assert not errors, shown
