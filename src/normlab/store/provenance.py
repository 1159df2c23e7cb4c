"""Where a run came from: the ``meta`` section saved beside every resolved config."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

import normlab
from normlab.hostinfo import cpu_model_name


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


def cpu_description() -> str:
    """The CPU as this process sees it: model name (``/proc/cpuinfo`` where there is one, else
    :func:`platform.processor`), the vector instructions PyTorch's CPU kernels use here
    (``torch.backends.cpu.get_cpu_capability``) and the cores this process may run on, e.g.
    ``"Intel(R) Xeon(R) Processor (AVX512, 2 cores)"``. Wall times are only comparable on
    the same description: machines of one name differ in exactly these."""
    model = cpu_model_name() or platform.processor() or platform.machine() or "unknown CPU"
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 0
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}, {cores} cores)"


def run_meta() -> dict[str, Any]:
    """normlab, torch and Python versions, git SHA, host, CPU, time and the command line."""
    return {
        "normlab_version": normlab.__version__,
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "git_sha": git_sha(),
        "host": platform.node(),
        "machine": platform.machine(),
        "cpu": cpu_description(),
        "created": datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
