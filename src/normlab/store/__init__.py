"""The run store: one directory per training run, written so that nothing computed is lost.

:class:`RunDir` owns the run directory's formats (config.yaml with provenance, the checkpoint
schema, summary and status, per-image validation predictions, per-rank BN buffers) and
rebuilds a run's model;
:func:`config_differences` is the one check of whether a saved run matches a config.
"""

from normlab.store.checkpoint import Checkpoint
from normlab.store.compat import config_differences
from normlab.store.predictions import Predictions
from normlab.store.provenance import git_sha, run_meta
from normlab.store.run import (
    CHECKPOINT,
    CONFIG,
    FINISHED,
    METRICS,
    MODEL_DIMS,
    PREDICTIONS,
    STATUS_COMPLETED,
    STATUS_DIVERGED,
    STATUS_FAILED,
    STATUS_RUNNING,
    SUMMARY,
    RunDir,
    atomic_write_bytes,
    atomic_write_text,
    model_from_config,
)

__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "FINISHED",
    "METRICS",
    "MODEL_DIMS",
    "PREDICTIONS",
    "STATUS_COMPLETED",
    "STATUS_DIVERGED",
    "STATUS_FAILED",
    "STATUS_RUNNING",
    "SUMMARY",
    "Checkpoint",
    "Predictions",
    "RunDir",
    "atomic_write_bytes",
    "atomic_write_text",
    "config_differences",
    "git_sha",
    "model_from_config",
    "run_meta",
]
