"""An internal bug is one line with exit status 3, and its traceback appears with
``--debug``/NORMLAB_DEBUG=1; a library's multi-line message is printed as one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import normlab.cli
from normlab.cli import main
from normlab.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 2) -> str:
    """Run ``normlab ARGV``; check the exit status and that stderr is exactly one line."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err.rstrip("\n")


def test_multi_line_library_errors_become_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [\n")
    line = error_line(capsys, ["train", "--config", str(bad)])
    assert line.startswith(f"normlab train: error: {bad}: not valid YAML: while parsing")


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
