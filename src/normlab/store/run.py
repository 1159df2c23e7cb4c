"""A run directory and its files.

Layout of a run directory::

    config.yaml     resolved TrainConfig + ``meta`` (git SHA, normlab/torch versions, host)
    metrics.jsonl   one JSON object per finished epoch, appended and flushed every epoch
    summary.json    status (running | completed | diverged | failed), best/final accuracy, time
    checkpoint.pt   latest state (model, optimizer, scheduler, RNG states), written atomically
    init.json       only with ``model.init: lsuv``: what the initialisation did, per layer

Guarantees: ``config.yaml``, ``summary.json``, ``checkpoint.pt`` and ``init.json`` are
written atomically (write to a temporary file in the same directory, fsync, ``os.replace``), so
a crash leaves either the old or the new file, never a torn one. ``metrics.jsonl`` is append-only during a run;
a torn last line (a crash mid-write) is ignored on read, and on resume the file is rewritten
(atomically) to hold exactly the epochs the checkpoint covers, so no epoch is duplicated.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from normlab.errors import NormlabError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
INIT = "init.json"  # only with a data-dependent init (model.init: lsuv): what it did per layer


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir + fsync + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean(row: Mapping[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/Inf: store them as null so every line parses with any JSON reader."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = None
        else:
            out[k] = v
    return out


class RunDir:
    """Read and write the files of one run directory (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- paths -------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def init_path(self) -> Path:
        return self.path / INIT

    def exists(self) -> bool:
        return self.config_path.is_file()

    # -- metrics -----------------------------------------------------------------------------
    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one epoch's row and flush it to disk."""
        self.path.mkdir(parents=True, exist_ok=True)
        line = json.dumps(_clean(row), default=_json_default, sort_keys=False)
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """All complete rows of ``metrics.jsonl`` (a torn final line is skipped)."""
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-append
        return rows

    def truncate_metrics(self, last_epoch: int) -> list[dict[str, Any]]:
        """Keep only rows with ``epoch <= last_epoch`` (atomically); return them."""
        rows = [r for r in self.read_metrics() if int(r.get("epoch", 0)) <= last_epoch]
        text = "".join(json.dumps(r, default=_json_default) + "\n" for r in rows)
        atomic_write_text(self.metrics_path, text)
        return rows

    # -- summary -----------------------------------------------------------------------------
    def write_summary(self, summary: Mapping[str, Any]) -> None:
        self._write_json(self.summary_path, summary)

    def write_init(self, record: Mapping[str, Any]) -> None:
        """The record of a data-dependent initialisation (``init.json``), written once."""
        self._write_json(self.init_path, record)

    def _write_json(self, path: Path, doc: Mapping[str, Any]) -> None:
        atomic_write_text(path, json.dumps(_clean(doc), indent=2, default=_json_default) + "\n")

    def read_summary(self) -> dict[str, Any] | None:
        if not self.summary_path.is_file():
            return None
        try:
            data: dict[str, Any] = json.loads(self.summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise NormlabError(f"{self.summary_path}: not valid JSON ({exc})") from None
        return data

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        """Serialise ``state`` with torch.save and replace ``checkpoint.pt`` atomically."""
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        atomic_write_bytes(self.checkpoint_path, buffer.getvalue())

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The latest checkpoint, or None when there is none.

        Loaded with ``weights_only=True``: checkpoints hold only tensors and plain containers.
        """
        if not self.checkpoint_path.is_file():
            return None
        try:
            state: dict[str, Any] = torch.load(
                self.checkpoint_path, map_location="cpu", weights_only=True
            )
        except Exception as exc:  # a checkpoint we cannot read must not be silently replaced
            raise NormlabError(
                f"{self.checkpoint_path}: cannot read checkpoint ({type(exc).__name__}: {exc}); "
                "move it away to restart the run from scratch"
            ) from None
        return state
