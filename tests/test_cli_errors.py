"""Every failure of the command line is one named ``error:`` line with exit status 2; an internal
bug is one line with exit status 3, and its traceback appears with ``--debug``/NORMLAB_DEBUG=1.

The exact-message tests pin the failures that used to end in a Python traceback (issue 11).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import normlab.cli
from normlab.cli import main
from normlab.cli.args import output_dir, output_file
from normlab.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

# A valid, tiny training command: if the check under test did not refuse it, it would train
# for a second, not for minutes.
FAST = [
    "--data", "synthetic",
    "--set", "data.synthetic_samples=64",
    "--set", "data.synthetic_image_size=8",
    "--set", "data.val_split=0.25",
    "--batch-size", "16",
    "--epochs", "1",
    "--set", "runtime.threads=1",
    "--quiet",
]  # fmt: skip

PROC = Path("/proc")
needs_proc = pytest.mark.skipif(not (PROC / "self").is_dir(), reason="needs Linux's /proc")


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 2) -> str:
    """Run ``normlab ARGV``; check the exit status and that stderr is exactly one line."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err.rstrip("\n")


@pytest.fixture
def text_pt(tmp_path: Path) -> Path:
    path = tmp_path / "x.pt"
    path.write_text("hello\n")
    return path


# ---- the failures issue 11 found ---------------------------------------------------------------


def test_train_out_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    somefile = tmp_path / "somefile"
    somefile.write_text("x")
    assert error_line(capsys, ["train", *FAST, "--out", f"{somefile}/run"]) == (
        f"normlab train: error: --out {somefile}/run: {somefile} is a file, not a directory"
    )


def test_train_out_is_an_existing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    somefile = tmp_path / "somefile"
    somefile.write_text("x")
    assert error_line(capsys, ["train", *FAST, "--out", str(somefile)]) == (
        f"normlab train: error: --out {somefile}: exists and is not a directory (expected a "
        "directory to write into)"
    )


@needs_proc
def test_train_out_where_no_directory_can_be_made(capsys: pytest.CaptureFixture[str]) -> None:
    assert error_line(capsys, ["train", *FAST, "--out", "/proc/normlab-x/run"]) == (
        "normlab train: error: --out /proc/normlab-x/run: cannot create directory "
        "/proc/normlab-x (No such file or directory)"
    )


@pytest.mark.parametrize("command", ["doctor", "recalibrate"])
def test_text_file_named_pt(
    command: str, text_pt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert error_line(capsys, [command, str(text_pt)]) == (
        f"normlab {command}: error: {text_pt}: not a PyTorch file: it holds text starting "
        "'hello\\n' (expected a PyTorch file written by torch.save)"
    )


def test_callable_that_needs_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert error_line(capsys, ["doctor", "torch.nn:Linear"]) == (
        "normlab doctor: error: torch.nn:Linear: calling it with no arguments failed (TypeError: "
        "Linear.__init__() missing 2 required positional arguments: 'in_features' and "
        "'out_features'); a module:callable must build the model from keyword arguments alone, "
        "given after commas: torch.nn:Linear,key=value,..."
    )
    # with the keyword arguments it asks for, the same callable builds
    assert main(["doctor", "torch.nn:Linear,in_features=4,out_features=2", "--static"]) == 0
    capsys.readouterr()


def test_builtin_function_is_not_a_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert error_line(capsys, ["doctor", "os:system"]) == (
        "normlab doctor: error: os:system: 'system' is a built-in function, not a model class or "
        "a function that builds one"
    )


# ---- more of the same kind ---------------------------------------------------------------------


def test_files_that_are_not_what_their_name_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert error_line(capsys, ["doctor", str(empty)]) == (
        f"normlab doctor: error: {empty}: is empty (expected a PyTorch file written by torch.save)"
    )
    noise = tmp_path / "noise.pth"
    noise.write_bytes(bytes(range(250, 256)) + b"\x00" * 10)
    assert error_line(capsys, ["fold", str(noise), str(tmp_path / "out.pt")]) == (
        f"normlab fold: error: {noise}: not a PyTorch file: it holds bytes fa fb fc fd fe ff 00 00 "
        "... (expected a PyTorch file written by torch.save)"
    )
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 16)
    assert error_line(capsys, ["doctor", str(broken)]).startswith(
        f"normlab doctor: error: {broken}: not a readable PyTorch file ("
    )
    weights_dir = tmp_path / "w.pt"
    weights_dir.mkdir()
    assert error_line(capsys, ["doctor", "normlab:resnet20", "--weights", str(weights_dir)]) == (
        f"normlab doctor: error: {weights_dir}: is a directory (expected a PyTorch file written "
        "by torch.save)"
    )
    binary_yaml = tmp_path / "c.yaml"
    binary_yaml.write_bytes(b"\xb1\xff\x00 not text")
    line = error_line(capsys, ["train", "--config", str(binary_yaml)])
    assert line == f"normlab train: error: {binary_yaml}: not UTF-8 text, so not a YAML file"
    assert error_line(capsys, ["study", str(binary_yaml)]) == (
        f"normlab study: error: {binary_yaml}: not UTF-8 text, so not a YAML file"
    )
    keras = tmp_path / "m.keras"
    with zipfile.ZipFile(keras, "w") as zf:
        zf.writestr("config.json", "[1, 2]")
        zf.writestr("model.weights.h5", b"")
    pytest.importorskip("h5py")
    assert error_line(capsys, ["doctor", str(keras)]) == (
        f"normlab doctor: error: {keras}: its config.json is a JSON list, not a Keras model "
        "config (a JSON object)"
    )


def test_multi_line_library_errors_become_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [\n")
    line = error_line(capsys, ["train", "--config", str(bad)])
    assert line.startswith(f"normlab train: error: {bad}: not valid YAML: while parsing")


def test_outputs_that_cannot_be_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    somefile = tmp_path / "somefile"
    somefile.write_text("x")
    a_dir = tmp_path / "adir"
    a_dir.mkdir()
    target = ["normlab:resnet20", "--input-shape", "3,8,8"]
    assert error_line(capsys, ["fold", *target, str(a_dir)]) == (
        f"normlab fold: error: OUT {a_dir}: is a directory (expected the name of a file to write)"
    )
    assert error_line(capsys, ["export", *target, "--onnx", f"{somefile}/m.onnx"]) == (
        f"normlab export: error: --onnx {somefile}/m.onnx: {somefile} is a file, not a directory"
    )
    assert error_line(capsys, ["convert", *target, str(a_dir), "--op", "frozen-bn"]) == (
        f"normlab convert: error: OUT {a_dir}: is a directory (expected the name of a file to write)"
    )
    assert error_line(
        capsys, ["recalibrate", *target, "--data", "synthetic", "--out", str(a_dir)]
    ) == (
        f"normlab recalibrate: error: --out {a_dir}: is a directory (expected the name of a file "
        "to write)"
    )
    assert error_line(capsys, ["report", str(somefile)]) == (
        f"normlab report: error: STUDY_DIR {somefile}: exists and is not a directory (expected a "
        "directory to write into)"
    )
    assert error_line(capsys, ["study", "placement", "--dry-run", "--out", str(somefile)]) == (
        f"normlab study: error: --out {somefile}: exists and is not a directory (expected a "
        "directory to write into)"
    )
    assert not list(a_dir.iterdir())  # the checks create nothing


def test_inputs_the_model_does_not_accept(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    line = error_line(
        capsys, ["fold", "normlab:resnet20", str(tmp_path / "f.pt"), "--input-shape", "1,8,8"]
    )
    assert line.startswith(
        "normlab fold: error: the model fails on a batch of input shape 1,8,8 (RuntimeError: "
    )
    assert line.endswith("; pass --input-shape C,H,W with a shape the model accepts")
    line = error_line(
        capsys,
        ["recalibrate", "normlab:resnet20", "--data", "digits", "--out", str(tmp_path / "r")],
    )
    assert line.startswith(
        "normlab recalibrate: error: the model does not accept the 1x32x32 images of data source "
        "'digits' (RuntimeError: "
    )
    assert not (tmp_path / "f.pt").exists() and not (tmp_path / "r").exists()


def test_numbers_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = ["normlab:resnet20", "--input-shape", "3,8,8"]
    huge = str(10**30)
    for argv, flag in [
        (["fold", *target, str(tmp_path / "f.pt"), "--batch", huge], "--batch"),
        (["fold", *target, str(tmp_path / "f.pt"), "--repeats", "0"], "--repeats"),
        (["fold", *target, str(tmp_path / "f.pt"), "--threads", huge], "--threads"),
        (["doctor", *target, "--max-batches", "-1"], "--max-batches"),
        (["doctor", *target, "--rank-rtol", "nan"], "--rank-rtol"),
        (["doctor", *target, "--num-classes", "0"], "--num-classes"),
    ]:
        with pytest.raises(SystemExit) as info:  # argparse's usage error, exit status 2
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"error: argument {flag}: expected " in err and "Traceback" not in err
    assert error_line(
        capsys, ["export", *target, "--onnx", str(tmp_path / "m"), "--opset", "3"]
    ) == (
        "normlab export: error: --opset must be an ONNX opset from 7 to 20 (what this torch "
        "exports), got 3"
    )
    assert error_line(capsys, ["train", *FAST, "--seed", huge]) == (
        f"normlab train: error: seed (--seed) must be an integer in [0, 2**63), got {huge}"
    )
    assert error_line(capsys, ["study", "placement", "--dry-run", "--seeds", huge]) == (
        f"normlab study: error: seeds must be a count >= 1 (at most 10000) or a list of seeds, "
        f"got {huge}"
    )
    # --dry-run checks the executor options too (it used to accept any)
    dry = ["study", "placement", "--dry-run", "--out", str(tmp_path / "dry")]
    assert error_line(capsys, [*dry, "--jobs", "0"]) == (
        "normlab study: error: --jobs must be >= 1, got 0"
    )
    assert error_line(capsys, [*dry, "--executor", "nope"]) == (
        "normlab study: error: unknown executor 'nope'; known executors: local, ray, serial"
    )
    line = error_line(capsys, ["train", *FAST, "--set", f"data.synthetic_image_size={huge}"])
    assert line == (
        f"normlab train: error: data.synthetic_image_size must be at most 32768, got {huge}"
    )


# ---- internal errors ---------------------------------------------------------------------------


def _boom(args: object) -> int:
    raise RuntimeError("boom\nsecond line")


def test_internal_error_is_one_line_with_exit_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NORMLAB_DEBUG", raising=False)
    monkeypatch.setattr(normlab.cli, "cmd_models", _boom)
    assert error_line(capsys, ["models"], code=3) == (
        "normlab models: internal error: RuntimeError: boom second line (a bug in normlab; run "
        "`normlab --debug models ...` or set NORMLAB_DEBUG=1 to see the traceback, and please "
        "report it)"
    )


def test_debug_flag_and_variable_show_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(normlab.cli, "cmd_models", _boom)
    monkeypatch.delenv("NORMLAB_DEBUG", raising=False)
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "models"])
    monkeypatch.setenv("NORMLAB_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["models"])
    monkeypatch.setenv("NORMLAB_DEBUG", "0")  # "0" is off
    assert main(["models"]) == 3
    # --debug also shows where a user error came from
    monkeypatch.delenv("NORMLAB_DEBUG")
    with pytest.raises(ConfigError, match="unknown model"):
        main(["--debug", "train", "--model", "nope"])
    capsys.readouterr()


def test_debug_traceback_reaches_the_terminal() -> None:
    code = (
        "import normlab.cli as c\n"
        "def boom(args):\n"
        "    raise RuntimeError('boom')\n"
        "c.cmd_models = boom\n"
        "raise SystemExit(c.main(['--debug', 'models']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1  # the interpreter's status for an uncaught exception
    assert "Traceback (most recent call last)" in proc.stderr
    assert "RuntimeError: boom" in proc.stderr and "internal error" not in proc.stderr


def test_os_errors_name_the_file_and_interrupts_stay(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def disk_full(args: object) -> int:
        raise OSError(28, "No space left on device", "/data/run/checkpoint.pt")

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.delenv("NORMLAB_DEBUG", raising=False)
    monkeypatch.setattr(normlab.cli, "cmd_models", disk_full)
    assert error_line(capsys, ["models"]) == (
        "normlab models: error: /data/run/checkpoint.pt: No space left on device"
    )
    monkeypatch.setattr(normlab.cli, "cmd_models", interrupted)
    assert error_line(capsys, ["models"], code=130) == (
        "normlab models: interrupted; resume with --resume"
    )


# ---- the shared pieces -------------------------------------------------------------------------


def test_output_checks_create_nothing(tmp_path: Path) -> None:
    assert output_dir(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert output_file(tmp_path / "c" / "f.pt", "OUT") == tmp_path / "c" / "f.pt"
    existing = tmp_path / "f.pt"
    existing.write_text("old")
    assert output_file(existing, "OUT") == existing  # replacing a file is fine
    assert output_dir(tmp_path, "--out") == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pt"]
    with pytest.raises(ConfigError, match=r"^--out: expected a path, got ''$"):
        output_dir("", "--out")
    with pytest.raises(ConfigError, match="exists and is not a regular file"):
        output_file("/dev/null", "OUT")  # atomic replacement would replace the device
