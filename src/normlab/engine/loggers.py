"""The metrics of a run in the viewers users already read: TensorBoard and MLflow.

``metrics.jsonl`` stays the source of truth; a logger is a :class:`Callback` that copies its
rows out. Conventions, stated once:

* **What is logged**: every row the run has *kept* (written to metrics.jsonl and covered by a
  checkpoint: the loop's ``history``), at step = the row's epoch, after that epoch's checkpoint
  (at the next epoch's start, and at the end of the run). Every key whose value is a real
  number is a scalar of the same name (``epoch`` too); booleans, None, strings and lists
  (e.g. per-layer lists a probe returns) are skipped, not flattened.
* **Resume** neither duplicates nor loses a point. TensorBoard: ``<run>/tensorboard`` is a view
  of metrics.jsonl, rebuilt on every start (its event files are deleted, then every kept row is
  written again), so an event a crash left beyond the checkpoint cannot survive. MLflow: the
  run directory's MLflow run is found again by its ``normlab.run_dir`` tag and only rows after
  the last logged epoch are added (a logged row is never one that resume trims: rows are
  logged only once a checkpoint covers them).
* **Where**: ``tensorboard`` writes ``<run>/tensorboard/`` (point ``tensorboard --logdir`` at a
  folder of runs, e.g. a study's ``runs/``: each run is named by its path, group/variant/seed).
  ``mlflow`` writes an MLflow file store (no server): ``mlflow:DIR``, default ``<run>/mlruns``
  for ``normlab train`` and ``<study>/mlruns`` for a study; experiment = the study's name
  (``normlab`` for a single run), one MLflow run per run directory, tagged ``normlab.study``,
  ``normlab.group``, ``normlab.variant``, ``normlab.seed`` and ``normlab.run_dir``, with the
  run's config as params. MLflow 3 keeps its file store in maintenance mode and refuses it
  unless ``MLFLOW_ALLOW_FILE_STORE=true``; this logger sets that variable in its process when it
  is unset (an explicit ``false`` is respected, and refused with the reason).
* Each is an optional extra (``pip install 'normlab[tensorboard]'``, ``'normlab[mlflow]'``);
  :func:`parse_loggers` checks the package is there, so a missing one fails before training,
  in one line naming the extra.
* Only the main process of a multi-process run logs.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normlab.config import config_to_dict, flatten
from normlab.engine.callbacks import Callback
from normlab.errors import ConfigError

if TYPE_CHECKING:
    from normlab.engine.state import FitState

__all__ = ["LOGGERS", "LoggerSpec", "make_loggers", "parse_loggers", "prepare_store", "scalars"]

LOGGERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
}
"""Logger name -> (the module it needs, the normlab extra that installs it)."""


@dataclass(frozen=True)
class LoggerSpec:
    """A logger by name, with its directory where it takes one (``mlflow:DIR``)."""

    name: str
    path: str | None = None

    def __str__(self) -> str:
        return self.name if self.path is None else f"{self.name}:{self.path}"


def _require(name: str) -> None:
    module, extra = LOGGERS[name]
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"logger {name!r} needs the {module} package: pip install 'normlab[{extra}]'"
        ) from None


def parse_loggers(value: str | Sequence[str] | None) -> tuple[LoggerSpec, ...]:
    """``"tensorboard,mlflow:DIR"`` (or a list of such items) as logger specs, each checked:
    a known name, a path only where the logger takes one, its package installed."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    specs = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"log: expected logger names ({', '.join(LOGGERS)}), got {item!r}")
        name, sep, path = item.strip().partition(":")
        if name not in LOGGERS:
            raise ConfigError(f"log: unknown logger {name!r}; known: {', '.join(LOGGERS)}")
        if sep and (name != "mlflow" or not path.strip()):
            raise ConfigError(
                f"log: {item!r}: only mlflow takes a directory (mlflow:DIR); tensorboard "
                "always writes into the run directory (<run>/tensorboard)"
            )
        _require(name)
        specs.append(LoggerSpec(name, path.strip() if sep else None))
    if len({s.name for s in specs}) != len(specs):
        raise ConfigError(f"log: a logger is named twice in {', '.join(map(str, specs))}")
    return tuple(specs)


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The keys of a metrics row that are logged: real numbers (not booleans), as floats."""
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


class _RowLogger(Callback):
    """Copies kept rows (``state.history``) out once a checkpoint covers them."""

    observes_only = True

    def __init__(self) -> None:
        self.logged = 0  # the last epoch written out
        self.active = False

    def open(self, state: FitState) -> int:
        """Start logging this run; return the last epoch already logged."""
        raise NotImplementedError

    def write(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def close(self, status: str) -> None:
        raise NotImplementedError

    def _flush(self, state: FitState) -> None:
        rows = [r for r in state.history if int(r["epoch"]) > self.logged]
        if rows:
            self.write(rows)
            self.logged = int(rows[-1]["epoch"])

    def on_fit_start(self, state: FitState) -> None:
        if not state.dist.is_main:
            return
        self.logged = self.open(state)
        self.active = True
        self._flush(state)

    def on_epoch_start(self, state: FitState, epoch: int) -> None:
        if self.active:
            self._flush(state)

    def on_fit_end(self, state: FitState, status: str) -> None:
        if self.active:
            self.active = False
            try:
                self._flush(state)
            finally:
                self.close(status)


class TensorBoardLogger(_RowLogger):
    """Scalars in ``<run>/tensorboard/`` event files (see the module docstring)."""

    def open(self, state: FitState) -> int:
        from torch.utils.tensorboard import SummaryWriter

        logdir = state.run.path / "tensorboard"
        if logdir.is_dir():
            for old in logdir.glob("events.out.tfevents.*"):
                old.unlink()  # a view of metrics.jsonl: rebuilt from the kept rows
        self.writer = SummaryWriter(log_dir=str(logdir))
        return 0

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            step = int(row["epoch"])
            for key, value in scalars(row).items():
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


_MLFLOW_STATUS = {"completed": "FINISHED", "running": "KILLED"}


class MlflowLogger(_RowLogger):
    """One MLflow run per run directory in a file store (see the module docstring)."""

    def __init__(self, store: str | Path | None, tags: Mapping[str, Any]) -> None:
        super().__init__()
        self.store = store
        self.tags = {k: str(v) for k, v in tags.items() if v is not None}

    def open(self, state: FitState) -> int:
        from mlflow.exceptions import MlflowException

        store = Path(self.store) if self.store is not None else state.run.path / "mlruns"
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self.client, self.run_id = _open_run(store.resolve(), state, self.tags)
        except MlflowException as exc:
            raise ConfigError(f"mlflow store {store}: {str(exc).splitlines()[0]}") from None
        history = self.client.get_metric_history(self.run_id, "epoch")
        return max((int(m.step) for m in history), default=0)

    def write(self, rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(key, value, 0, int(row["epoch"]))
            for row in rows
            for key, value in scalars(row).items()
        ]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, _MLFLOW_STATUS.get(status, "FAILED"))


def _experiment(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return str(found.experiment_id if found is not None else client.create_experiment(name))


def prepare_store(specs: Sequence[LoggerSpec], default: Path, experiment: str) -> None:
    """Create the MLflow experiment ``experiment`` in the store an ``mlflow`` spec writes
    (``default`` when it names none) before parallel runs start: two processes that both find
    it missing would each create one."""
    from mlflow.tracking import MlflowClient

    for spec in specs:
        if spec.name == "mlflow":
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            store = Path(spec.path) if spec.path else default
            _experiment(MlflowClient(tracking_uri=store.resolve().as_uri()), experiment)


def _open_run(store: Path, state: FitState, tags: Mapping[str, str]) -> tuple[Any, str]:
    """The MLflow run of this run directory in ``store`` (created, with tags and params, the
    first time; set running again on resume)."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    exp_id = _experiment(client, tags.get("normlab.study", "normlab"))
    run_dir = str(state.run.path.resolve())
    for run in client.search_runs([exp_id], max_results=50000):
        if run.data.tags.get("normlab.run_dir") == run_dir:
            client.update_run(run.info.run_id, status="RUNNING")
            return client, run.info.run_id
    name = tags.get("normlab.run_name") or state.run.path.name
    run = client.create_run(exp_id, run_name=name, tags={**tags, "normlab.run_dir": run_dir})
    params = [
        Param(k, str(v)[:500]) for k, v in sorted(flatten(config_to_dict(state.config)).items())
    ]
    for i in range(0, len(params), 100):  # MLflow's limit per batch
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return client, run.info.run_id


def make_loggers(
    specs: Sequence[LoggerSpec],
    *,
    tags: Mapping[str, Any] | None = None,
    mlflow_store: str | Path | None = None,
) -> list[Callback]:
    """The callbacks for ``specs``; ``tags`` (``normlab.study``, ``normlab.group``, ...) go to
    MLflow, ``mlflow_store`` is the store for an ``mlflow`` spec without a directory (None: the
    run directory's ``mlruns``)."""
    out: list[Callback] = []
    for spec in specs:
        if spec.name == "tensorboard":
            out.append(TensorBoardLogger())
        else:
            out.append(MlflowLogger(spec.path or mlflow_store, tags or {}))
    return out
