"""The one training loop: ``fit(config) -> RunResult``.

``fit`` builds the data and the model from a :class:`TrainConfig`, trains for
``config.epochs`` epochs with evaluation (eval mode) after each (or, with ``eval_every: N``,
after every N-th and the last), and keeps a run directory (see :mod:`normlab.store.run`) up to
date: a metrics row and an atomic checkpoint after every epoch, the per-image validation
predictions (final and best epoch) after every validated one, ``summary.json`` with the
status. ``fit(..., resume=True)`` continues an interrupted run from its last checkpoint and
produces the same metrics an uninterrupted run would (same model, optimizer, scheduler,
data-order and augmentation RNG states; on the same machine and thread count the numbers are
bit-identical).

Setup (:mod:`normlab.train.setup`), one epoch (:mod:`normlab.train.epoch`) and evaluation
(:mod:`normlab.engine.evaluate`) live in their own modules; this one is the loop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
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
from normlab.errors import ConfigError
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
    loop = RunLoop(config, out=out, resume=resume, callbacks=callbacks, data=data, verbose=verbose)
    if loop.finished is not None:
        return loop.finished
    train_one(loop)
    return loop.result()


def fit_together(
    configs: Sequence[TrainConfig],
    outs: Sequence[str | Path],
    *,
    callbacks: Sequence[Sequence[Callback]] | None,
    data: DataBundle | None,
    verbose: bool,
    shares_data: Callable[[TrainConfig, TrainConfig], bool],
    check: Callable[[Sequence[RunLoop]], None],
    train: Callable[[Sequence[RunLoop]], None],
) -> list[RunResult]:
    """The driver of :func:`~normlab.train.stacked.fit_stacked` and
    :func:`~normlab.train.twins.fit_twins`: open (or resume) one :class:`RunLoop` per config,
    reusing the first run's data where ``shares_data(first, config)``; ``check`` the unfinished
    loops (ConfigError: before anything is trained) and ``train`` them together, or train a
    lone unfinished one as ``fit`` would. Returns every run's result, in order."""
    if len(configs) != len(outs):
        raise ConfigError(f"{len(configs)} configs but {len(outs)} run directories")
    per_run = list(callbacks) if callbacks is not None else [[] for _ in configs]
    loops: list[RunLoop] = []
    shared = data
    for config, out, cbs in zip(configs, outs, per_run, strict=True):
        loop = RunLoop(config, out=out, resume=True, callbacks=cbs, data=shared, verbose=verbose)
        loops.append(loop)
        if loop.finished is None and shares_data(configs[0], config):
            shared = loop.s.data  # the same split: build the images once
    active = [lp for lp in loops if lp.finished is None]
    if len(active) >= 2:
        check(active)
        train(active)
    elif active:  # one left: nothing to train it with
        train_one(active[0])
    return [lp.result() for lp in loops]


def together_refusal(loops: Sequence[RunLoop], steps_seen_by: str) -> str | None:
    """What stops ``loops`` training together in one process, whatever the way: checkpoints at
    different epochs, a process group, a callback that acts per step, or one that may change
    the model at the start of the fit or of an epoch (``steps_seen_by`` says why the shared
    training would miss it). None when nothing does."""
    starts = {lp.progress.start_epoch for lp in loops}
    if len(starts) != 1:
        return f"their checkpoints are at different epochs ({sorted(s - 1 for s in starts)})"
    if loops[0].dctx.enabled:
        return "several processes (a process group)"
    for lp in loops:
        for cb in lp.callbacks:
            name = type(cb).__name__
            if type(cb).on_step_end is not Callback.on_step_end:
                return f"callback {name} acts after every step, and {steps_seen_by}"
            hooks = [
                hook
                for hook in ("on_fit_start", "on_epoch_start")
                if getattr(type(cb), hook) is not getattr(Callback, hook)
            ]
            if hooks and not cb.observes_only:
                return (
                    f"callback {name} overrides {' and '.join(hooks)} without declaring "
                    "observes_only = True, so it may change the model there, and "
                    f"{steps_seen_by}"
                )
    return None


def train_one(loop: RunLoop) -> None:
    """Drive ``loop`` through its remaining epochs, one ``train_epoch`` each."""
    with loop.running():
        for epoch in loop.epochs():
            loop.epoch_start(epoch)
            row, diverged_at = train_epoch(
                loop.state, loop.train_model, loop.s.l2, epoch, loop.show_progress, loop.callbacks
            )
            if diverged_at is not None:
                loop.diverged(epoch, diverged_at)
                break
            loop.end_epoch(epoch, row)
        else:
            loop.complete()


class RunLoop:
    """One run's bookkeeping around its training epochs, for :func:`fit` (one run) and
    :func:`normlab.train.stacked.fit_stacked` (several runs trained as one module).

    Construction opens (or resumes) the run directory and builds the session; ``finished`` is
    the result of a run that had already ended (nothing else is then built). Inside
    :meth:`running`, the driver calls :meth:`epoch_start`, trains, then :meth:`end_epoch`
    (evaluation, callbacks, metrics row, checkpoint, predictions, summary) or
    :meth:`diverged`, and :meth:`complete` after the last epoch. :meth:`running` marks the run
    failed or interrupted on an exception and calls the callbacks' ``on_fit_end``.
    """

    def __init__(
        self,
        config: TrainConfig | None,
        *,
        out: str | Path | None,
        resume: bool,
        callbacks: Sequence[Callback],
        data: DataBundle | None,
        verbose: bool,
    ) -> None:
        self.dctx = dctx = context_from_env()
        run, config, resuming = open_run(config, out, resume, dctx)
        self.run = run
        previous = run.read_summary() if resuming else None
        self.finished: RunResult | None = None
        if previous is not None and previous.get("status") in FINISHED:
            self.finished = _finished_result(run, config, previous)
            return
        names = resolve_names(config)
        if config.runtime.threads:
            torch.set_num_threads(config.runtime.threads)
        self.s = s = build_session(config, run, dctx, data)
        self.config = config = s.config
        self.verbose = verbose = verbose and dctx.is_main  # one voice in a multi-process job
        self.progress = progress = start(s, resuming, self.log)
        self.callbacks = [*names.probes, *callbacks]  # probes named in the config observe it
        self.history, self.best = progress.history, progress.best
        self.kept = progress.predictions  # per-image predictions of the last and best epoch
        self.state = FitState(
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
            history=self.history,
            dist=dctx,
        )
        train_model: nn.Module = wrap_ddp(s.model, s.runtime.device) if dctx.enabled else s.model
        if config.runtime.compile:
            train_model = torch.compile(train_model)  # type: ignore[assignment]
        self.train_model = train_model
        self.show_progress = verbose and progress_enabled(config.runtime.progress)
        self.status = STATUS_RUNNING
        self.summary: dict[str, Any] = {}
        self.extra_summary: dict[str, Any] = {}  # written into every summary (fit_stacked)
        self._t_start = time.perf_counter()

    def log(self, *args: Any) -> None:
        if self.verbose:
            print(*args)

    def wall(self) -> float:
        return self.progress.wall_before + time.perf_counter() - self._t_start

    def write_summary(self, status: str, **extra: Any) -> dict[str, Any]:
        summary = _summary(
            self.s, self.history, self.best, status, self.wall(), {**self.extra_summary, **extra}
        )
        if self.dctx.is_main:
            self.run.write_summary(summary)
        return summary

    def epochs(self) -> range:
        return range(self.progress.start_epoch, self.config.epochs + 1)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Start the run (first line, summary, ``on_fit_start``); on leaving, record how it
        ended and call ``on_fit_end`` (also after an error, which is re-raised)."""
        progress, s = self.progress, self.s
        if progress.start_epoch > 1:
            self.log(
                f"resuming {self.run.path} at epoch {progress.start_epoch}/{self.config.epochs}"
            )
        if (
            self.dctx.is_main and self.kept
        ):  # as the checkpoint has them (a crash may have come between)
            self.run.write_predictions(
                _predictions(
                    s, _last_validated(self.config, progress.start_epoch - 1), self.best, self.kept
                )
            )
        self.log(_first_line(s))
        self.summary = self.write_summary(STATUS_RUNNING)
        failed = True  # until the loop ends normally: decides how the process group is left
        try:
            for cb in self.callbacks:
                cb.on_fit_start(self.state)
            yield
            failed = False
        except KeyboardInterrupt:
            self.write_summary(STATUS_RUNNING, interrupted=True)
            for cb in self.callbacks:
                cb.on_fit_end(self.state, STATUS_RUNNING)
            raise
        except BaseException as exc:
            self.write_summary(STATUS_FAILED, error=f"{type(exc).__name__}: {exc}")
            for cb in self.callbacks:
                cb.on_fit_end(self.state, STATUS_FAILED)
            raise
        finally:
            if s.owns_group:
                del self.train_model  # DDP holds the group: drop it before the group goes
                shutdown_distributed(orderly=not failed)
        for cb in self.callbacks:
            cb.on_fit_end(self.state, self.status)

    def epoch_start(self, epoch: int) -> None:
        """Put the model in training mode, then call the callbacks' ``on_epoch_start`` (so a
        callback can keep a submodule in eval mode for the epoch)."""
        self.state.model.train()
        for cb in self.callbacks:
            cb.on_epoch_start(self.state, epoch)

    def diverged(self, epoch: int, step: int) -> None:
        self.status = STATUS_DIVERGED
        self.summary = self.write_summary(self.status, diverged_at={"epoch": epoch, "step": step})
        self.log(f"epoch {epoch}: loss is NaN/Inf at step {step}; run marked diverged")

    def end_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """Evaluate the trained epoch (when ``config.evaluates(epoch)``), let the callbacks add
        to its row, and write the row, the checkpoint, the predictions and the summary. An
        epoch that does not validate has no ``val/*`` in its row and leaves the predictions and
        the best epoch as they were; everything else (the BN reconciliation of a multi-process
        run, the checkpoint) happens every epoch, so training never depends on ``eval_every``."""
        s, dctx, best, kept, run = self.s, self.dctx, self.best, self.kept, self.run
        t_eval = time.perf_counter()
        if dctx.enabled and not self.config.sync_bn:
            reconcile_batchnorm(s.model, self.config.dist_bn)
        val = None
        if self.config.evaluates(epoch):
            # the same forward pass gives the metrics and every image's predicted class
            val = evaluate_with_predictions(s.model, s.val_loader, self.state.autocast())
            row["val/loss"], row["val/acc"] = val.loss, val.acc
        row["seconds"] = round(row["seconds"] + time.perf_counter() - t_eval, 4)
        for cb in self.callbacks:
            row.update(cb.on_epoch_end(self.state, epoch, row))
        if val is not None:
            kept["final"] = val.predictions
            if val.acc > best["acc"]:
                best.update(acc=val.acc, epoch=epoch)
                kept["best"] = val.predictions
        if dctx.enabled and self.config.dist_bn == "none":
            # Statistics stay per rank: keep every rank's, so `normlab doctor RUN` can
            # show how far they disagree (the checkpoint holds rank 0's).
            run.save_rank_buffers(s.model, dctx.rank)
        if dctx.is_main:
            # The row first, then the checkpoint: a crash between the two leaves a row the
            # checkpoint does not cover, which resume trims and recomputes (never a gap).
            run.append_metrics(row)
            run.save_checkpoint(_checkpoint(s, epoch, best, self.wall(), kept))
            if val is not None:
                run.write_predictions(_predictions(s, epoch, best, kept))
        self.history.append(row)
        self.summary = self.write_summary(STATUS_RUNNING)
        self.log(_epoch_line(row, epoch, self.config.epochs))

    def complete(self) -> None:
        self.status = STATUS_COMPLETED
        self.summary = self.write_summary(self.status)

    def result(self) -> RunResult:
        if self.finished is not None:
            return self.finished
        return RunResult(
            self.run.path, self.status, self.summary, self.history, self.s.model, self.config
        )


def _summary(
    s: Session,
    history: list[dict[str, Any]],
    best: dict[str, Any],
    status: str,
    wall_seconds: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """``summary.json``: status, progress, final and best accuracy, and what rebuilding the
    run's model needs (its data dimensions). ``final/val/*`` is the last validated epoch's
    (the last epoch's once the run is complete: it always validates)."""
    validated = [row for row in history if "val/acc" in row]
    last = validated[-1] if validated else {}
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


def _last_validated(config: TrainConfig, epoch: int) -> int:
    """The last epoch up to ``epoch`` that validated (``TrainConfig.evaluates``)."""
    return next((e for e in range(epoch, 0, -1) if config.evaluates(e)), 0)


def _first_line(s: Session) -> str:
    c, r = s.config, s.runtime
    return (
        f"normlab: {c.model.name} norm={c.norm.name} placement={c.model.placement} "
        f"data={c.data.name} ({s.data.train_labels.numel()} train / {s.data.val_labels.numel()} val) "
        f"{describe_flip(c.data)} "
        f"device={r.device} precision={r.precision} layout={r.memory_format} -> {s.run.path}"
    )


def _epoch_line(row: dict[str, Any], epoch: int, epochs: int) -> str:
    val = (
        f"val loss {row['val/loss']:.4f} acc {row['val/acc']:.4f}"
        if "val/acc" in row
        else "not validated (eval_every)"
    )
    return (
        f"epoch {epoch}/{epochs}  train loss {row['train/loss']:.4f} acc {row['train/acc']:.4f}"
        f"  {val}  lr {row['lr']:.4g}  {row['seconds']:.1f}s {row['images_per_s']:.0f} img/s"
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
