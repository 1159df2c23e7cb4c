"""A run directory and its files.

Layout of a run directory::

    config.yaml     resolved TrainConfig + ``meta`` (git SHA, normlab/torch versions, host)
    metrics.jsonl   one JSON object per finished epoch, appended and flushed every epoch
    summary.json    status (running | completed | diverged | failed), best/final accuracy, time
    checkpoint.pt   latest state (model, optimizer, scheduler, RNG states), written atomically;
                    its schema is :class:`normlab.store.checkpoint.Checkpoint`
    predictions.npz every validation image's predicted class by the final and the best-epoch
                    model, and the labels (:mod:`normlab.store.predictions`); rewritten
                    atomically every epoch; absent in runs made before normlab kept it
    init.json       only with ``model.init: lsuv``: what the initialisation did, per layer
    bn_buffers.rank<R>.pt  only in multi-process runs with ``dist_bn: none``: rank R's BN
                    running statistics (the checkpoint holds rank 0's)

This module is the only reader and writer of these files: the training loop, the study
runner, the report and the BN toolbox all go through :class:`RunDir`.

Guarantees: ``config.yaml``, ``summary.json``, ``checkpoint.pt``, ``predictions.npz`` and
``init.json`` are written atomically (write to a temporary file in the same directory, fsync, ``os.replace``), so
a crash leaves either the old or the new file, never a torn one; the checkpoint keeps a copy of
the predictions, so a resumed run rewrites the file to match it. ``metrics.jsonl`` is
append-only during a run;
a torn last line (a crash mid-write) is ignored on read, and on resume the file is rewritten
(atomically) to hold exactly the epochs the checkpoint covers, so no epoch is duplicated.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.config import TrainConfig, config_from_dict, config_to_dict, load_yaml
from normlab.errors import DataError, NormlabError
from normlab.models import build_model
from normlab.store.checkpoint import Checkpoint
from normlab.store.predictions import Predictions
from normlab.yamlio import dumps

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
PREDICTIONS = "predictions.npz"
INIT = "init.json"  # only with a data-dependent init (model.init: lsuv): what it did per layer
RANK_BUFFERS = re.compile(r"^bn_buffers\.rank(\d+)\.pt$")

# summary.json's "status"
STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_DIVERGED = "diverged"
STATUS_FAILED = "failed"
FINISHED = (STATUS_COMPLETED, STATUS_DIVERGED)  # a run in one of these is not trained further
# what summary.json records of the data, so a run's model can be rebuilt without the data
MODEL_DIMS = ("num_classes", "channels", "image_size")


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
    def predictions_path(self) -> Path:
        return self.path / PREDICTIONS

    @property
    def init_path(self) -> Path:
        return self.path / INIT

    def rank_buffers_path(self, rank: int) -> Path:
        return self.path / f"bn_buffers.rank{rank}.pt"

    def exists(self) -> bool:
        return self.config_path.is_file()

    # -- config ------------------------------------------------------------------------------
    def write_config(self, config: TrainConfig, meta: Mapping[str, Any]) -> None:
        """``config.yaml``: the resolved config, with ``meta`` (provenance) after it."""
        doc = config_to_dict(config)
        doc["meta"] = dict(meta)
        atomic_write_text(self.config_path, dumps(doc))

    def read_config_doc(self) -> dict[str, Any]:
        """``config.yaml`` as written: the config's sections and ``meta``; ConfigError naming
        the file when it is missing or not a YAML mapping."""
        return load_yaml(self.config_path)

    def read_config_dict(self) -> dict[str, Any]:
        """``config.yaml`` as a plain mapping, without ``meta``."""
        raw = self.read_config_doc()
        raw.pop("meta", None)
        return raw

    def read_config(self) -> TrainConfig:
        """The run's saved config, validated (ConfigError naming the file and key)."""
        return config_from_dict(self.read_config_dict(), source=str(self.config_path))

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
            data = json.loads(self.summary_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise NormlabError(f"{self.summary_path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise NormlabError(
                f"{self.summary_path}: holds a JSON {type(data).__name__}, not an object"
            )
        return data

    # -- per-image validation predictions ----------------------------------------------------
    def write_predictions(self, predictions: Predictions) -> None:
        """Replace ``predictions.npz`` atomically."""
        atomic_write_bytes(self.predictions_path, predictions.to_bytes())

    def read_predictions(self) -> Predictions | None:
        """``predictions.npz``, or None when the run has none (made before normlab kept
        predictions); NormlabError naming the file when it cannot be read."""
        if not self.predictions_path.is_file():
            return None
        data = self.predictions_path.read_bytes()
        return Predictions.from_bytes(data, source=str(self.predictions_path))

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, state: Checkpoint | Mapping[str, Any]) -> None:
        """Serialise ``state`` with torch.save and replace ``checkpoint.pt`` atomically."""
        doc = state.to_dict() if isinstance(state, Checkpoint) else dict(state)
        _save_torch(self.checkpoint_path, doc)

    def load_training_checkpoint(self) -> Checkpoint | None:
        """The latest checkpoint, validated against :class:`Checkpoint`; None when none."""
        state = self.load_checkpoint()
        if state is None:
            return None
        return Checkpoint.from_dict(state, source=str(self.checkpoint_path))

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

    # -- per-rank BN statistics --------------------------------------------------------------
    def save_rank_buffers(self, model: nn.Module, rank: int) -> None:
        """Write this rank's BN running statistics to ``bn_buffers.rank<R>.pt`` (atomic)."""
        buffers = {
            f"{name}.{key}" if name else key: buf.detach().cpu().clone()
            for name, module in model.named_modules()
            if isinstance(module, _BatchNorm)
            for key, buf in module.named_buffers(recurse=False)
            if buf is not None
        }
        _save_torch(self.rank_buffers_path(rank), buffers)

    def rank_buffer_files(self) -> list[tuple[int, Path]]:
        """``(rank, path)`` of every ``bn_buffers.rank<R>.pt``, sorted by rank (empty when
        there are none: single-process runs, or ``dist_bn`` reduce/broadcast)."""
        if not self.path.is_dir():
            return []
        found = []
        for child in self.path.iterdir():
            m = RANK_BUFFERS.match(child.name)
            if m and child.is_file():
                found.append((int(m.group(1)), child))
        return sorted(found)

    # -- the model ---------------------------------------------------------------------------
    def build_model(
        self, config: TrainConfig | None = None, summary: Mapping[str, Any] | None = None
    ) -> nn.Module:
        """The run's network, freshly initialised (load a state into it to get the trained
        one), from its config and the data dimensions ``summary.json`` records. DataError
        naming the file when the summary lacks them."""
        config = config if config is not None else self.read_config()
        summary = summary if summary is not None else (self.read_summary() or {})
        missing = [k for k in MODEL_DIMS if k not in summary]
        if missing:
            raise DataError(
                f"{self.summary_path}: missing {', '.join(missing)} (needed to rebuild the model)"
            )
        return model_from_config(
            config,
            int(summary["num_classes"]),
            int(summary["channels"]),
            int(summary["image_size"]),
        )


def model_from_config(
    config: TrainConfig, num_classes: int, channels: int, image_size: int
) -> nn.Module:
    """The network ``config`` describes, for data of these dimensions (freshly initialised)."""
    return build_model(
        config.model.name,
        num_classes,
        norm=config.norm,
        placement=config.model.placement,
        in_channels=channels,
        input_size=image_size,
        small_input=config.model.small_input,
        conv_bias=config.model.conv_bias,
        **dict(config.model.options),
    )


def _save_torch(path: Path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
