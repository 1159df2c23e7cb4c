"""Where a run came from: the ``meta`` section saved beside every resolved config."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

import normlab


def git_sha() -> str | None:
    """The git commit of the normlab source tree (``+dirty`` when it has local changes), or
    None outside a git checkout."""
    src = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def run_meta() -> dict[str, Any]:
    """normlab, torch and Python versions, git SHA, host, time and the command line."""
    return {
        "normlab_version": normlab.__version__,
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "git_sha": git_sha(),
        "host": platform.node(),
        "machine": platform.machine(),
        "created": datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
