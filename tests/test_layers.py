"""One import direction, enforced: the import-linter contracts in pyproject.toml.

The layers contract lists normlab's packages from the top (``cli``) to the ground (``errors``);
a module may import only from its own package or the packages below it. Every import counts,
including those inside functions ("late" imports written to dodge a cycle are still edges);
only ``if TYPE_CHECKING:`` blocks are left out. The second contract forbids cycles among the
modules inside each package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from _helpers import SRC

ROOT = Path(__file__).resolve().parents[1]


def _lint(src: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with this repository's contracts, on the package found in ``src``."""
    script = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports("
    script += f"config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True))"
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_import_points_down_the_layers_and_no_package_has_a_cycle():
    result = _lint(SRC, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_contracts_catch_a_late_import_that_points_up(tmp_path):
    # the same contracts on a copy of the package with one function-level back edge added
    shutil.copytree(
        SRC / "normlab", tmp_path / "normlab", ignore=shutil.ignore_patterns("__pycache__")
    )
    errors = tmp_path / "normlab" / "errors.py"
    errors.write_text(
        errors.read_text()
        + textwrap.dedent(
            """

            def _back_edge():
                from normlab.store import RunDir  # points up: the ground importing the store

                return RunDir
            """
        )
    )
    result = _lint(tmp_path, tmp_path)
    assert result.returncode != 0
    assert "normlab.errors -> normlab.store" in result.stdout, result.stdout


def test_the_contracts_catch_a_cycle_inside_a_package(tmp_path):
    shutil.copytree(
        SRC / "normlab", tmp_path / "normlab", ignore=shutil.ignore_patterns("__pycache__")
    )
    cache = tmp_path / "normlab" / "data" / "cache.py"
    cache.write_text(
        cache.read_text()
        + "\n\ndef _cycle():\n    from normlab.data import tree\n\n    return tree\n"
    )
    result = _lint(tmp_path, tmp_path)
    assert result.returncode != 0
    assert "cache" in result.stdout and "tree" in result.stdout, result.stdout
