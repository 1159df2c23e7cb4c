"""Never a traceback on any file: a seeded fuzz of every TARGET kind the BN loaders read.

A corpus of real small files, one per kind ``load_target`` accepts (a torch zip state_dict, a
legacy raw-pickle file, a normlab checkpoint, ``.safetensors``, sharded safetensors and ``.bin``
indexes, Keras ``.keras`` and ``.h5``, ``.onnx``, a normlab run directory with per-rank
``bn_buffers`` files), is damaged in seeded ways: truncated at many offsets (every small
offset, header boundaries, random ones) and byte-flipped (1 to 8 bytes), one part of a
multi-file target at a time (a shard, the index, ``checkpoint.pt``, ``config.yaml``,
``summary.json``, a rank file). Fixed cases add empty files and random bytes under every
extension, each real file under every wrong extension, directories named like files, a symlink
loop, a dangling symlink and a FIFO.

Each case goes through the CLI in-process (``normlab.cli.main``): ``doctor TARGET --json`` and
``fold TARGET OUT --arch ...`` (tensor files get an architecture, so loading goes all the way
into a model). Asserted for every run: exit status 0, 1 or 2; no traceback and no "internal
error" on stderr; a failure (exit 2 without a doctor report) prints exactly one ``error:``
line; each run ends within :data:`SECONDS_PER_RUN` seconds (an alarm). Failures are collected
and reported together, naming the case.

Budget: :data:`CASES` cases in CI (``NORMLAB_FUZZ_CASES`` raises it, ``NORMLAB_FUZZ_SEED``
changes the draw; ``NORMLAB_FUZZ_TRACE=FILE`` appends each run's case before it starts), e.g.
``NORMLAB_FUZZ_CASES=3000 pytest tests/test_bn_fuzz.py -s``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from normlab.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CASES = int(os.environ.get("NORMLAB_FUZZ_CASES", "240"))
SEED = int(os.environ.get("NORMLAB_FUZZ_SEED", "0"))
TRACE = os.environ.get("NORMLAB_FUZZ_TRACE")
SECONDS_PER_RUN = 20
KERAS = Path(__file__).parent / "fixtures" / "keras"
ARCH = ["--arch", f"{__name__}:_net", "--input-shape", "3,8,8"]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    )


# ---- the corpus --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    """A real target: ``target`` (a file or folder under ``root``), the ``parts`` a mutation may
    damage, and whether fold gets ``--arch`` (tensor files)."""

    kind: str
    root: Path
    target: Path
    parts: tuple[Path, ...]
    arch: bool


def _onnx_file(path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(4, np.float32), "s"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "m"),
        numpy_helper.from_array(np.ones(4, np.float32) * 2, "v"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
        helper.make_node("Relu", ["n"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        inits,
    )
    onnx.save(helper.make_model(graph), str(path))


def _bases(root: Path) -> list[Base]:
    from safetensors.torch import save_file

    model = _net()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(10)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    bases: list[Base] = []

    def single(kind: str, name: str, write: Callable[[Path], None], arch: bool) -> None:
        folder = root / kind
        folder.mkdir()
        write(folder / name)
        bases.append(Base(kind, folder, folder / name, (folder / name,), arch))

    single("zip", "sd.pt", lambda p: torch.save(state, p), True)
    single(
        "legacy",
        "sd.pt",
        lambda p: torch.save(state, p, _use_new_zipfile_serialization=False),
        True,
    )
    single("ckpt", "ckpt.pt", lambda p: torch.save({"model": state, "epoch": 3}, p), True)
    single("safetensors", "m.safetensors", lambda p: save_file(state, p), True)
    single("keras", "m.keras", lambda p: shutil.copy(KERAS / "trained.keras", p), False)
    single("h5", "m.h5", lambda p: shutil.copy(KERAS / "trained.h5", p), False)
    single("onnx", "m.onnx", _onnx_file, False)
    keys = list(state)
    for fmt in ("safetensors", "bin"):
        folder = root / f"sharded-{fmt}"
        folder.mkdir()
        weight_map, shards = {}, []
        for part, names in (("a", keys[:4]), ("b", keys[4:])):
            shard = folder / f"model-{part}.{fmt}"
            tensors = {k: state[k] for k in names}
            save_file(tensors, shard) if fmt == "safetensors" else torch.save(tensors, shard)
            weight_map.update({k: shard.name for k in names})
            shards.append(shard)
        index = folder / f"model.{fmt}.index.json"
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        bases.append(Base(f"sharded-{fmt}", folder, index, (index, *shards), True))
    bases.append(_run_base(root))
    return bases


def _run_base(root: Path) -> Base:
    run = root / "run"
    code = main(
        [
            "train", "--model", "resnet20", "--data", "synthetic", "--epochs", "1",
            "--batch-size", "16", "--set", "data.synthetic_samples=32",
            "--set", "data.synthetic_image_size=8", "--set", "data.synthetic_classes=4",
            "--set", "data.val_split=0.25", "--set", "runtime.threads=1", "--quiet",
            "--out", str(run),
        ]
    )  # fmt: skip
    assert code == 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    buffers = {k: v for k, v in ckpt["model"].items() if "running_" in k or "num_batches" in k}
    torch.save(buffers, run / "bn_buffers.rank0.pt")
    torch.save({k: v * 1.5 for k, v in buffers.items()}, run / "bn_buffers.rank1.pt")
    parts = tuple(
        run / n
        for n in (
            "checkpoint.pt",
            "config.yaml",
            "summary.json",
            "bn_buffers.rank0.pt",
            "bn_buffers.rank1.pt",
        )
    )
    return Base("run", run, run, parts, False)


@dataclass(frozen=True)
class Case:
    name: str
    target: Path
    arch: bool


def _copy(base: Base, dest: Path) -> Path:
    """A copy of ``base``'s folder under ``dest``; the copied target's path."""
    shutil.copytree(base.root, dest)
    return dest / base.target.relative_to(base.root) if base.target != base.root else dest


def _offsets(size: int, rng: random.Random) -> list[int]:
    small = list(range(min(size, 24)))
    marks = [
        o for o in (64, 100, 128, 256, 512, 1024, size // 2, size - 22, size - 1) if 0 < o < size
    ]
    return sorted(set(small + marks + [rng.randrange(size) for _ in range(8)] if size else [0]))


def _mutations(
    base: Base, rng: random.Random, flips: int
) -> Iterator[tuple[str, Path, Callable[[bytes], bytes]]]:
    """(label, part, mutate) for truncations and ``flips`` byte-flip draws of every part of
    ``base``."""
    for part in base.parts:
        size = part.stat().st_size
        for offset in _offsets(size, rng):
            yield f"truncate {part.name}@{offset}", part, lambda b, o=offset: b[:o]
        for _ in range(flips):
            where = [
                (rng.randrange(max(size, 1)), rng.randrange(1, 256))
                for _ in range(rng.randint(1, 8))
            ]

            def flip(data: bytes, where: list[tuple[int, int]] = where) -> bytes:
                out = bytearray(data)
                for pos, mask in where:
                    if pos < len(out):
                        out[pos] ^= mask
                return bytes(out)

            yield f"flip {part.name}@{[p for p, _ in where]}", part, flip


def _mutated_cases(bases: list[Base], work: Path, rng: random.Random, budget: int) -> list[Case]:
    parts = sum(len(b.parts) for b in bases)
    flips = max(12, budget // parts)
    pool = [(base, *m) for base in bases for m in _mutations(base, rng, flips)]
    rng.shuffle(pool)
    # round-robin over the kinds, so every kind is damaged even in a small budget
    by_kind: dict[str, list] = {}
    for entry in pool:
        by_kind.setdefault(entry[0].kind, []).append(entry)
    ordered = [e for group in zip(*by_kind.values(), strict=False) for e in group]
    ordered += [e for e in pool if e not in ordered]
    cases = []
    for i, (base, label, part, mutate) in enumerate(ordered[:budget]):
        dest = work / f"m{i}"
        target = _copy(base, dest)
        copied = dest / part.relative_to(base.root)
        copied.write_bytes(mutate(copied.read_bytes()))
        cases.append(Case(f"{base.kind}: {label}", target, base.arch))
    return cases


EXTENSIONS = (".pt", ".pth", ".bin", ".safetensors", ".json", ".keras", ".h5", ".onnx", ".ckpt")


def _fixed_cases(bases: list[Base], work: Path, rng: random.Random) -> list[Case]:
    fixed = work / "fixed"
    fixed.mkdir()
    cases = []

    def add(name: str, path: Path, arch: bool = True) -> None:
        cases.append(Case(name, path, arch))

    for ext in EXTENSIONS:
        (fixed / f"empty{ext}").write_bytes(b"")
        add(f"empty {ext}", fixed / f"empty{ext}")
        (fixed / f"noise{ext}").write_bytes(bytes(rng.randrange(256) for _ in range(512)))
        add(f"random bytes {ext}", fixed / f"noise{ext}")
        (fixed / f"text{ext}").write_text("hello, not a model\n")
        add(f"text {ext}", fixed / f"text{ext}")
        (fixed / f"dir{ext}").mkdir()
        add(f"directory named {ext}", fixed / f"dir{ext}")
    for base in bases:
        if base.target.is_file():
            for ext in EXTENSIONS:
                if ext != base.target.suffix:
                    wrong = fixed / f"{base.kind}-as{ext}"
                    shutil.copy(base.target, wrong)
                    add(f"{base.kind} named {ext}", wrong, base.arch)
    (fixed / "loop-a.pt").symlink_to(fixed / "loop-b.pt")
    (fixed / "loop-b.pt").symlink_to(fixed / "loop-a.pt")
    add("symlink loop", fixed / "loop-a.pt")
    (fixed / "self.onnx").symlink_to(fixed / "self.onnx")
    add("symlink to itself .onnx", fixed / "self.onnx")
    (fixed / "dangling.keras").symlink_to(fixed / "nowhere.keras")
    add("dangling symlink", fixed / "dangling.keras")
    os.mkfifo(fixed / "fifo.pt")
    add("FIFO named .pt", fixed / "fifo.pt")
    index = fixed / "selfref" / "model.safetensors.index.json"
    index.parent.mkdir()
    index.write_text(json.dumps({"weight_map": {"a": index.name}}))
    add("index naming itself as a shard", index)
    run = fixed / "run-no-checkpoint"
    shutil.copytree(next(b for b in bases if b.kind == "run").root, run)
    (run / "checkpoint.pt").unlink()
    add("run without checkpoint", run, False)
    (run / "config.yaml").write_text("- not\n- a mapping\n")
    add("run with a list config", run, False)
    return cases


# ---- running a case ----------------------------------------------------------------------------


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: int) -> Iterator[None]:
    def fire(signum: int, frame: object) -> None:
        raise _Timeout

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _run(argv: list[str]) -> tuple[int | str, str, str, float]:
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    code: int | str
    try:
        with (
            _alarm(SECONDS_PER_RUN),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            code = main(argv)
    except _Timeout:
        code = "timeout"
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:
        code = f"raised {type(exc).__name__}: {exc}"
    return code, out.getvalue(), err.getvalue(), time.perf_counter() - start


def _problem(argv: list[str], code: int | str, out: str, err: str) -> str | None:
    if not isinstance(code, int):
        return str(code)
    if code not in (0, 1, 2):
        return f"exit {code}: {err.strip()[:400]}"
    if "Traceback" in err or "internal error" in err:
        return f"stderr: {err.strip()[:400]}"
    is_report = argv[0] == "doctor" and out.lstrip().startswith("{")
    errors = [line for line in err.splitlines() if line.startswith(f"normlab {argv[0]}: error:")]
    if code == 2 and not is_report and (len(errors) != 1 or len(err.strip().splitlines()) != 1):
        return f"exit 2 with {len(errors)} error line(s): {err.strip()[:300]}"
    return None


def test_no_file_ends_in_a_traceback(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from normlab.bn import keras_file

    # a damaged .h5 can loop libhdf5 forever (in C): the bounded read must end it in time
    monkeypatch.setattr(keras_file, "H5_SECONDS", SECONDS_PER_RUN / 2)
    rng = random.Random(SEED)
    root = tmp_path_factory.mktemp("fuzz-bases")
    bases = _bases(root)
    work = tmp_path_factory.mktemp("fuzz-cases")
    fixed = _fixed_cases(bases, work, rng)
    cases = fixed + _mutated_cases(bases, work, rng, max(CASES - len(fixed), len(bases)))
    out_file = str(work / "folded.pt")
    failures: list[str] = []
    outcomes: Counter[str] = Counter()
    slowest = 0.0
    for i, case in enumerate(cases):
        if i and i % 200 == 0:  # progress for long corpora (shown with -s)
            print(f"bn fuzz: {i} cases, {len(failures)} failing run(s)", flush=True)
        for argv in (
            ["doctor", str(case.target), "--json"],
            ["fold", str(case.target), out_file, "--no-timing", *(ARCH if case.arch else [])],
        ):
            if TRACE:  # the case about to run, for a corpus that hangs below Python
                with open(TRACE, "a") as fh:
                    fh.write(f"{case.name} | {' '.join(argv)}\n")
            code, out, err, seconds = _run(argv)
            slowest = max(slowest, seconds)
            outcomes[f"{argv[0]} exit {code}" if isinstance(code, int) else "problem"] += 1
            problem = _problem(argv, code, out, err)
            if problem:
                failures.append(f"{case.name} | {argv[0]}: {problem}")
    kinds = Counter(c.name.split(":")[0] for c in cases[len(fixed) :])
    print(
        f"\nbn fuzz: {len(cases)} cases ({len(fixed)} fixed, mutated per kind {dict(kinds)}), "
        f"{sum(outcomes.values())} runs, outcomes {dict(outcomes)}, slowest run {slowest:.2f} s"
    )
    assert not failures, f"{len(failures)} failing run(s):\n" + "\n".join(failures[:40])
    assert len(kinds) == len(bases)  # every kind was damaged
