"""The one training loop: ``fit(config) -> RunResult``.

``fit`` builds the data and the model from a :class:`TrainConfig`, trains for
``config.epochs`` epochs with evaluation (eval mode) after each, and keeps a run directory
(see :mod:`normlab.store.run`) up to date: a metrics row, an atomic checkpoint and the
per-image validation predictions (final and best epoch) after every epoch, ``summary.json``
with the status. ``fit(..., resume=True)`` continues an interrupted run
from its last checkpoint and produces the same metrics an uninterrupted run would (same model,
optimizer, scheduler, data-order and augmentation RNG states; on the same machine and thread
count the numbers are bit-identical).

Setup (:mod:`normlab.train.setup`), one epoch (:mod:`normlab.train.epoch`) and evaluation
(:mod:`normlab.engine.evaluate`) live in their own modules; this one is the loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normlab.config import TrainConfig
from normlab.data import DataBundle, describe_flip
from normlab.engine.callbacks import Callback
from normlab.engine.distributed import (
    context_from_env,
    reconcile_batchnorm,
    shutdown_distributed,
    wrap_ddp,
)
from normlab.engine.evaluate import evaluate_with_predictions
from normlab.engine.state import FitState
from normlab.store import (
    FINISHED,
    STATUS_COMPLETED,
    STATUS_DIVERGED,
    STATUS_FAILED,
    STATUS_RUNNING,
    Checkpoint,
    Predictions,
    RunDir,
)
from normlab.train.epoch import progress_enabled, train_epoch
from normlab.train.names import resolve_names
from normlab.train.setup import Session, build_session, open_run, start


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    status: str
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    model: nn.Module
    config: TrainConfig


def fit(
    config: TrainConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    data: DataBundle | None = None,
    verbose: bool = True,
) -> RunResult:
    """Train ``config`` and keep its run directory ``out`` (default ``runs/<time>-...``).

    With ``resume=True``, ``out`` must hold a run; it continues from its last checkpoint.
    ``config`` may then be None (the saved one is used); a given config must agree with it.
    A finished run is returned as it is. Without ``resume``, ``out`` must not hold a run yet.

    ``data`` lets a caller pass an already built bundle (it must be what ``config.data``
    describes). Raises :class:`ConfigError`/:class:`DataError`/:class:`TrainingError` on bad
    input before anything is written; a run that fails later is marked ``failed`` in its
    summary and the error re-raised; a NaN/Inf loss stops the run with status ``diverged``.
    """
    dctx = context_from_env()
    run, config, resuming = open_run(config, out, resume, dctx)
    previous = run.read_summary() if resuming else None
    if previous is not None and previous.get("status") in FINISHED:
        return _finished_result(run, config, previous)
    names = resolve_names(config)
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    s = build_session(config, run, dctx, data)
    config = s.config
    verbose = verbose and dctx.is_main  # one voice in a multi-process job
    log = print if verbose else (lambda *a, **k: None)
    progress = start(s, resuming, log)
    callbacks = [*names.probes, *callbacks]  # probes named in the config observe the run
    history, best = progress.history, progress.best
    kept = progress.predictions  # per-image predictions of the last and the best epoch
    state = FitState(
        config=config,
        model=s.model,
        optimizer=s.optimizer,
        scheduler=s.scheduler,
        data=s.data,
        runtime=s.runtime,
        run=run,
        train_loader=s.train_loader,
        val_loader=s.val_loader,
        start_epoch=progress.start_epoch,
        history=history,
        dist=dctx,
    )
    train_model: nn.Module = wrap_ddp(s.model, s.runtime.device) if dctx.enabled else s.model
    if config.runtime.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]
    t_start = time.perf_counter()

    def wall() -> float:
        return progress.wall_before + time.perf_counter() - t_start

    def write_summary(status: str, **extra: Any) -> dict[str, Any]:
        summary = _summary(s, history, best, status, wall(), extra)
        if dctx.is_main:
            run.write_summary(summary)
        return summary

    if progress.start_epoch > 1:
        log(f"resuming {run.path} at epoch {progress.start_epoch}/{config.epochs}")
    if dctx.is_main and kept:  # as the checkpoint has them (a crash may have come between)
        run.write_predictions(_predictions(s, progress.start_epoch - 1, best, kept))
    log(_first_line(s))
    status, summary = STATUS_RUNNING, write_summary(STATUS_RUNNING)
    failed = True  # until the loop ends normally: decides how the process group is left
    try:
        for cb in callbacks:
            cb.on_fit_start(state)
        show_progress = verbose and progress_enabled(config.runtime.progress)
        for epoch in range(progress.start_epoch, config.epochs + 1):
            for cb in callbacks:
                cb.on_epoch_start(state, epoch)
            row, diverged_at = train_epoch(
                state, train_model, s.l2, epoch, show_progress, callbacks
            )
            if diverged_at is not None:
                status = STATUS_DIVERGED
                summary = write_summary(status, diverged_at={"epoch": epoch, "step": diverged_at})
                log(f"epoch {epoch}: loss is NaN/Inf at step {diverged_at}; run marked diverged")
                break
            t_eval = time.perf_counter()
            if dctx.enabled and not config.sync_bn:
                reconcile_batchnorm(s.model, config.dist_bn)
            # the same forward pass gives the metrics and every image's predicted class
            val = evaluate_with_predictions(s.model, s.val_loader, state.autocast())
            row["val/loss"], row["val/acc"] = val.loss, val.acc
            row["seconds"] = round(row["seconds"] + time.perf_counter() - t_eval, 4)
            for cb in callbacks:
                row.update(cb.on_epoch_end(state, epoch, row))
            kept["final"] = val.predictions
            if val.acc > best["acc"]:
                best.update(acc=val.acc, epoch=epoch)
                kept["best"] = val.predictions
            if dctx.enabled and config.dist_bn == "none":
                # Statistics stay per rank: keep every rank's, so `normlab doctor RUN` can
                # show how far they disagree (the checkpoint holds rank 0's).
                run.save_rank_buffers(s.model, dctx.rank)
            if dctx.is_main:
                # The row first, then the checkpoint: a crash between the two leaves a row the
                # checkpoint does not cover, which resume trims and recomputes (never a gap).
                run.append_metrics(row)
                run.save_checkpoint(_checkpoint(s, epoch, best, wall(), kept))
                run.write_predictions(_predictions(s, epoch, best, kept))
            history.append(row)
            summary = write_summary(STATUS_RUNNING)
            log(_epoch_line(row, epoch, config.epochs))
        else:
            status = STATUS_COMPLETED
            summary = write_summary(status)
        failed = False
    except KeyboardInterrupt:
        write_summary(STATUS_RUNNING, interrupted=True)
        for cb in callbacks:
            cb.on_fit_end(state, STATUS_RUNNING)
        raise
    except BaseException as exc:
        write_summary(STATUS_FAILED, error=f"{type(exc).__name__}: {exc}")
        for cb in callbacks:
            cb.on_fit_end(state, STATUS_FAILED)
        raise
    finally:
        if s.owns_group:
            del train_model  # DDP holds the group: drop it before the group goes
            shutdown_distributed(orderly=not failed)
    for cb in callbacks:
        cb.on_fit_end(state, status)
    return RunResult(run.path, status, summary, history, s.model, config)


def _summary(
    s: Session,
    history: list[dict[str, Any]],
    best: dict[str, Any],
    status: str,
    wall_seconds: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """``summary.json``: status, progress, final and best accuracy, and what rebuilding the
    run's model needs (its data dimensions)."""
    last = history[-1] if history else {}
    return {
        "status": status,
        "epochs_completed": len(history),
        "epochs": s.config.epochs,
        "final/val/acc": last.get("val/acc"),
        "final/val/loss": last.get("val/loss"),
        "best/val/acc": best["acc"] if best["epoch"] else None,
        "best/epoch": best["epoch"] or None,
        "wall_seconds": round(wall_seconds, 3),
        "precision": s.runtime.precision,
        "memory_format": s.runtime.memory_format,
        "device": str(s.runtime.device),
        "num_classes": s.data.num_classes,
        "channels": s.data.channels,
        "image_size": s.data.image_size,
        **extra,
    }


def _checkpoint(
    s: Session,
    epoch: int,
    best: dict[str, Any],
    wall_seconds: float,
    kept: dict[str, torch.Tensor],
) -> Checkpoint:
    return Checkpoint(
        epoch=epoch,
        model=s.model.state_dict(),
        optimizer=s.optimizer.state_dict(),
        scheduler=s.scheduler.state_dict(),
        torch_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        data_rng=s.generator.get_state(),
        best=dict(best),
        wall_seconds=wall_seconds,
        predictions=dict(kept),
    )


def _predictions(
    s: Session, epoch: int, best: dict[str, Any], kept: dict[str, torch.Tensor]
) -> Predictions:
    """``predictions.npz`` after ``epoch``: the best epoch's only once known (a run resumed from
    a checkpoint older than predictions learns it when an epoch beats the old best)."""
    return Predictions.build(
        s.data.val_labels,
        kept["final"],
        epoch,
        s.data.num_classes,
        best=kept.get("best"),
        best_epoch=best["epoch"],
        val_id=s.data.val_id,
    )


def _first_line(s: Session) -> str:
    c, r = s.config, s.runtime
    return (
        f"normlab: {c.model.name} norm={c.norm.name} placement={c.model.placement} "
        f"data={c.data.name} ({s.data.train_labels.numel()} train / {s.data.val_labels.numel()} val) "
        f"{describe_flip(c.data)} "
        f"device={r.device} precision={r.precision} layout={r.memory_format} -> {s.run.path}"
    )


def _epoch_line(row: dict[str, Any], epoch: int, epochs: int) -> str:
    return (
        f"epoch {epoch}/{epochs}  train loss {row['train/loss']:.4f} acc {row['train/acc']:.4f}"
        f"  val loss {row['val/loss']:.4f} acc {row['val/acc']:.4f}  lr {row['lr']:.4g}"
        f"  {row['seconds']:.1f}s {row['images_per_s']:.0f} img/s"
    )


def _finished_result(run: RunDir, config: TrainConfig, summary: dict[str, Any]) -> RunResult:
    """A run that already ended: load its final model from the checkpoint, train nothing."""
    model = run.build_model(config, summary)
    ckpt = run.load_checkpoint()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    return RunResult(
        run.path, str(summary.get("status")), summary, run.read_metrics(), model, config
    )
