"""The docs table of the doctor's checks, generated from the registry.

``python -m normlab.bn.checks_doc`` rewrites ``docs/doctor_checks.md`` (run it after adding or
changing a check); tests/test_bn_diagnose.py fails while the committed file differs from
:func:`render`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from normlab.bn import diagnose as _registers_every_check  # noqa: F401
from normlab.bn.checks import checks_markdown

__all__ = ["DOC", "render"]

DOC = Path(__file__).resolve().parents[3] / "docs" / "doctor_checks.md"

_HEADER = """# The doctor's checks

Generated from the check registry (`normlab.bn.checks`) by `python -m normlab.bn.checks_doc`;
do not edit by hand. Ids are stable: CI scripts may match on them. `normlab doctor` exits 0
when it finds notes only, 1 with warnings, 2 with errors.

Kinds: `layer` checks look at one norm layer, `model` checks at the whole model (the training
verdict and its evidence, the graph), `file` checks at the target file before it is loaded,
`data` checks run the model on real batches, `ranks` checks compare per-rank copies.

"""


def render() -> str:
    """The whole of ``docs/doctor_checks.md``."""
    return _HEADER + checks_markdown()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else DOC
    out.write_text(render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
