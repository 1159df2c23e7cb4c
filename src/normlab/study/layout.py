"""The names in a study directory, in one place (the runner writes them, the report reads
them)::

    <study>/study.yaml      STUDY_FILE: the applied spec + meta
    <study>/state.json      STATE_FILE: every run's status, for a glance or a dashboard
    <study>/.study.lock     LOCK_FILE: one runner per study directory
    <study>/runs/[<group>/]<variant>/seed-<n>/     RUNS_DIR: one run directory each, plus
        study_run.json      RUN_INFO: the run's place in its study and its data split sizes
        train.log           RUN_LOG: the run's own output
        study_config.yaml   RUN_CONFIG: a multi-process run's resolved config (for --config)
"""

from __future__ import annotations

from pathlib import Path

STUDY_FILE = "study.yaml"
"""The file a study directory keeps its (applied) specification in; a valid spec file itself."""
STATE_FILE = "state.json"
LOCK_FILE = ".study.lock"
RUNS_DIR = "runs"
RUN_INFO = "study_run.json"
"""Written into each run directory when it runs: the run's place in its study and the sizes of
its data splits (the report's binomial view needs the validation count)."""
RUN_LOG = "train.log"
"""The run's own output (per-epoch lines, warnings), appended as it trains."""
RUN_CONFIG = "study_config.yaml"
"""A multi-process run's resolved config, written into its run directory for ``--config``."""


def run_dir_for(out: str | Path, group: str | None, variant: str, seed: int) -> Path:
    """``<out>/runs/[<group>/]<variant>/seed-<seed>``."""
    base = Path(out) / RUNS_DIR
    if group:
        base = base / group
    return base / variant / f"seed-{seed}"
