"""``python -m normlab`` is the ``normlab`` command."""

import sys

from normlab.cli import main, reader_gone

status = main()
try:
    sys.stdout.flush()  # a reader that went away after the last write: not an error
except BrokenPipeError:
    status = reader_gone()
raise SystemExit(status)
