"""The one training loop: ``fit(config) -> RunResult``.

``fit`` builds the data and the model from a :class:`TrainConfig`, trains for
``config.epochs`` epochs with evaluation (eval mode) after each, and keeps a run directory
(see :mod:`normlab.store.run`) up to date: a metrics row and an atomic checkpoint after every
epoch, ``summary.json`` with the status. ``fit(..., resume=True)`` continues an interrupted run
from its last checkpoint and produces the same metrics an uninterrupted run would (same model,
optimizer, scheduler, data-order and augmentation RNG states; on the same machine and thread
count the numbers are bit-identical).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import random
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

import normlab
from normlab.config import TrainConfig, config_to_dict, load_config
from normlab.data import BatchLoader, DataBundle, build_data, describe_flip
from normlab.errors import ConfigError, TrainingError
from normlab.models import build_model
from normlab.norms import uses_batch_stats
from normlab.norms.sync import convert_sync_batchnorm
from normlab.store import RunDir, atomic_write_bytes, atomic_write_text
from normlab.train.callbacks import Callback
from normlab.train.distributed import (
    DistContext,
    all_reduce_sum,
    context_from_env,
    init_distributed,
    reconcile_batchnorm,
    shutdown_distributed,
    wrap_ddp,
)
from normlab.train.optim import L2Penalty, build_optimizer, build_scheduler
from normlab.train.runtime import ResolvedRuntime, resolve_runtime
from normlab.yamlio import dumps

STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_DIVERGED = "diverged"
STATUS_FAILED = "failed"


@dataclass
class FitState:
    """What callbacks can see of a training run in progress."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: DataBundle
    runtime: ResolvedRuntime
    run: RunDir
    train_loader: BatchLoader
    val_loader: BatchLoader
    start_epoch: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    dist: DistContext = field(default_factory=DistContext)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context the loop uses (a no-op in fp32)."""
        dtype = self.runtime.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.runtime.device.type, dtype=dtype)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    status: str
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    model: nn.Module
    config: TrainConfig


# --------------------------------------------------------------------------------------------
# provenance


def git_sha() -> str | None:
    """The git commit of the normlab source tree (``+dirty`` when it has local changes)."""
    src = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def run_meta() -> dict[str, Any]:
    return {
        "normlab_version": normlab.__version__,
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "git_sha": git_sha(),
        "host": platform.node(),
        "machine": platform.machine(),
        "created": datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def default_run_dir(config: TrainConfig, root: str | Path = "runs") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{config.model.name}-{config.norm.name}-{config.model.placement}"
    return Path(root) / name


# --------------------------------------------------------------------------------------------
# helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_batch_statistics(model: nn.Module, n_train: int, config: TrainConfig) -> None:
    """Refuse settings that make batch-statistics norms (BN, BRN, ghost BN) meaningless."""
    bn_layers = [name for name, m in model.named_modules() if uses_batch_stats(m)]
    if not bn_layers:
        return
    bs = config.batch_size
    if bs == 1:
        raise TrainingError(
            f"batch_size=1 with {config.norm.name!r} normalization in training: batch statistics of "
            f"one sample are degenerate (the sample is normalised against itself; layer "
            f"{bn_layers[0]!r} and {len(bn_layers) - 1} more). Use --batch-size 2 or more, or a "
            "batch-independent norm (--norm gn, ln or in)"
        )
    if not config.drop_last and n_train % bs == 1:
        raise TrainingError(
            f"the last training batch would hold 1 sample ({n_train} images, batch_size={bs}), "
            f"which breaks {config.norm.name!r} normalization (layer {bn_layers[0]!r}); set "
            "drop_last=true (--set drop_last=true) or change --batch-size"
        )


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping) and k != "options":
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _config_differences(saved: TrainConfig, given: TrainConfig) -> list[str]:
    """Keys where ``given`` disagrees with the run's saved config (``auto`` runtime values in
    ``given`` agree with whatever they were resolved to)."""
    a, b = _flatten(config_to_dict(saved)), _flatten(config_to_dict(given))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith("runtime.") and b.get(key) in ("auto", None):
            continue
        if key in ("runtime.progress", "runtime.threads"):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: run has {a.get(key)!r}, given {b.get(key)!r}")
    return diffs


def _progress_enabled(setting: str) -> bool:
    if setting == "on":
        return True
    if setting == "off":
        return False
    return sys.stderr.isatty()


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


def evaluate(
    model: nn.Module,
    loader: BatchLoader,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode over ``loader``.

    The model's training flag is restored afterwards, also on error.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Accumulate on the device: no host sync per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    try:
        with torch.no_grad():
            for x, y in loader:
                with autocast if autocast is not None else contextlib.nullcontext():
                    out = model(x)
                loss = nn.functional.cross_entropy(out.float(), y, reduction="sum")
                loss_sum += loss.detach().double()
                correct += (out.argmax(1) == y).sum()
                count += y.numel()
    finally:
        model.train(was_training)
    # In a multi-process job each rank saw a shard of the data: add the shards up.
    total_loss, total_correct, total = all_reduce_sum(
        [float(loss_sum), int(correct), count], device
    )
    if total == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    return {"loss": total_loss / total, "acc": total_correct / total}


# --------------------------------------------------------------------------------------------
# fit


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
    if out is None:
        if resume:
            raise ConfigError("resume needs the run directory to continue (--out DIR)")
        if dctx.enabled:
            raise ConfigError("a multi-process run needs its run directory: pass --out DIR")
        if config is None:
            config = TrainConfig()
        out = default_run_dir(config)
    run = RunDir(out)
    saved: TrainConfig | None = None
    if run.exists():
        if not resume:
            raise ConfigError(
                f"{run.path} already holds a run; pass --resume to continue it, or choose another --out"
            )
        saved = load_config(run.config_path)
        if config is not None:
            diffs = _config_differences(saved, config)
            if diffs:
                raise ConfigError(
                    f"--resume: the given settings differ from the run in {run.path}: "
                    + "; ".join(diffs)
                )
        config = saved
        previous = run.read_summary() or {}
        if previous.get("status") in (STATUS_COMPLETED, STATUS_DIVERGED):
            return _finished_result(run, config, previous)
    elif resume and config is None:
        raise ConfigError(f"--resume: {run.path} holds no run (no {run.config_path.name})")
    assert config is not None

    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)

    seed_everything(config.seed)
    # The train/validation split is fixed (seed 0): training seeds vary init, order and
    # augmentation, not which images are held out, so seed-to-seed spread is training noise.
    bundle = data if data is not None else build_data(config.data, seed=0)
    torch.manual_seed(config.seed)
    model = _build(config, bundle.num_classes, bundle.channels, bundle.image_size)
    n_train = int(bundle.train_labels.numel())
    check_batch_statistics(model, n_train, config)
    steps_per_epoch = (
        n_train // config.batch_size if config.drop_last else math.ceil(n_train / config.batch_size)
    )
    if steps_per_epoch == 0:
        raise TrainingError(
            f"the training split has {n_train} images, fewer than batch_size={config.batch_size} with "
            "drop_last=true: lower --batch-size or set drop_last=false"
        )

    runtime = resolve_runtime(config.runtime, model)
    if dctx.enabled:
        if runtime.device.type == "cuda":
            runtime = dataclasses.replace(runtime, device=torch.device("cuda", dctx.local_rank))
            torch.cuda.set_device(runtime.device)
        if config.batch_size % dctx.world_size:
            raise ConfigError(
                f"batch_size={config.batch_size} is the global batch and must divide evenly over "
                f"{dctx.world_size} processes"
            )
    config = dataclasses.replace(
        config,
        runtime=dataclasses.replace(
            config.runtime,
            device=str(runtime.device),
            precision=runtime.precision,
            memory_format=runtime.memory_format,
        ),
    )
    # (cast: torch's type stubs for Module.to lack memory_format before 2.14)
    model = cast(
        nn.Module, cast(Any, model.to(runtime.device)).to(memory_format=runtime.torch_memory_format)
    )
    if config.sync_bn:
        if not dctx.enabled:
            raise ConfigError(
                "sync_bn=true needs several processes (a process group): launch with "
                "`normlab train --devices N` or torchrun, or set sync_bn=false"
            )
        model = convert_sync_batchnorm(model, runtime.device)
    owns_group = dctx.enabled and not torch.distributed.is_initialized()
    init_distributed(dctx, runtime.device, config.runtime.dist_timeout)

    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim, steps_per_epoch, config.epochs)
    l2 = (
        L2Penalty(
            model,
            config.optim.l2,
            biases=config.optim.l2_biases,
            norm_params=config.optim.l2_norm_params,
        )
        if config.optim.l2 > 0
        else None
    )

    generator = torch.Generator().manual_seed(config.seed)
    dcfg = config.data
    common: dict[str, Any] = dict(
        mean=bundle.mean,
        std=bundle.std,
        device=runtime.device,
        memory_format=runtime.torch_memory_format,
    )
    # On a GPU the whole uint8 data set moves there once: augmentation runs on the device.
    train_images, train_labels, val_images, val_labels = (
        t.to(runtime.device)
        for t in (bundle.train_images, bundle.train_labels, bundle.val_images, bundle.val_labels)
    )
    train_loader = BatchLoader(
        train_images,
        train_labels,
        config.batch_size,
        shuffle=True,
        drop_last=config.drop_last,
        augment=dcfg.augment,
        crop_padding=dcfg.crop_padding,
        flip=bool(dcfg.flip),  # a bool once built (DataConfig.flip)
        generator=generator,
        **common,
    )
    if dctx.enabled:  # each rank evaluates every world_size-th image; sums are reduced
        val_images = val_images[dctx.rank :: dctx.world_size]
        val_labels = val_labels[dctx.rank :: dctx.world_size]
    val_loader = BatchLoader.evaluation(
        val_images, val_labels, config.eval_batch_size or 2 * config.batch_size, **common
    )

    # ---- fresh start or resume --------------------------------------------------------------
    start_epoch = 1
    best = {"acc": -1.0, "epoch": 0}
    wall_before = 0.0
    history: list[dict[str, Any]] = []
    ckpt = run.load_checkpoint() if saved is not None else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        generator.set_state(ckpt["data_rng"])
        if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        best = dict(ckpt["best"])
        wall_before = float(ckpt["wall_seconds"])
        start_epoch = int(ckpt["epoch"]) + 1
        if dctx.is_main:
            history = run.truncate_metrics(int(ckpt["epoch"]))
        else:
            history = [r for r in run.read_metrics() if int(r["epoch"]) <= int(ckpt["epoch"])]
    elif dctx.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        if run.metrics_path.exists():
            run.metrics_path.unlink()  # a run that died before its first checkpoint restarts
        doc = config_to_dict(config)
        doc["meta"] = {**run_meta(), "world_size": dctx.world_size}
        atomic_write_text(run.config_path, dumps(doc))

    if ckpt is None and config.model.init == "lsuv":
        steps = _lsuv(model, config, train_images, train_labels, common)
        if dctx.is_main:
            # what LSUV did, per layer, kept beside the run (resume does not redo it)
            run.write_init(
                {"method": "lsuv", "samples": config.model.init_samples, "layers": steps}
            )
            slow = [s["name"] for s in steps if not s["converged"]]
            if verbose:
                print(
                    f"LSUV init: {len(steps)} conv/linear layers scaled to unit output variance"
                    + (f"; not converged: {', '.join(slow)}" if slow else "")
                    + f" ({run.init_path})"
                )

    if config.probes:
        # Probes named in the config observe the run (normlab.probes; issue "Instruments").
        from normlab.probes import build_probes

        callbacks = [*build_probes(config.probes), *callbacks]

    state = FitState(
        config=config,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data=bundle,
        runtime=runtime,
        run=run,
        train_loader=train_loader,
        val_loader=val_loader,
        start_epoch=start_epoch,
        history=history,
        dist=dctx,
    )
    train_model: nn.Module = wrap_ddp(model, runtime.device) if dctx.enabled else model
    if config.runtime.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]

    status = STATUS_RUNNING
    summary: dict[str, Any] = {}
    t_start = time.perf_counter()

    def write_summary(status: str, **extra: Any) -> None:
        nonlocal summary
        last = history[-1] if history else {}
        summary = {
            "status": status,
            "epochs_completed": len(history),
            "epochs": config.epochs,
            "final/val/acc": last.get("val/acc"),
            "final/val/loss": last.get("val/loss"),
            "best/val/acc": best["acc"] if best["epoch"] else None,
            "best/epoch": best["epoch"] or None,
            "wall_seconds": round(wall_before + time.perf_counter() - t_start, 3),
            "precision": runtime.precision,
            "memory_format": runtime.memory_format,
            "device": str(runtime.device),
            "num_classes": bundle.num_classes,
            "channels": bundle.channels,
            "image_size": bundle.image_size,
            **extra,
        }
        if dctx.is_main:
            run.write_summary(summary)

    verbose = verbose and dctx.is_main  # one voice in a multi-process job
    show_progress = verbose and _progress_enabled(config.runtime.progress)
    log = print if verbose else (lambda *a, **k: None)
    if start_epoch > 1:
        log(f"resuming {run.path} at epoch {start_epoch}/{config.epochs}")
    log(
        f"normlab: {config.model.name} norm={config.norm.name} placement={config.model.placement} "
        f"data={config.data.name} ({n_train} train / {bundle.val_labels.numel()} val) "
        f"{describe_flip(config.data)} "
        f"device={runtime.device} precision={runtime.precision} layout={runtime.memory_format} -> {run.path}"
    )
    write_summary(STATUS_RUNNING)
    failed = True  # until the loop ends normally: decides how the process group is left
    try:
        for cb in callbacks:
            cb.on_fit_start(state)
        for epoch in range(start_epoch, config.epochs + 1):
            for cb in callbacks:
                cb.on_epoch_start(state, epoch)
            row, diverged_at = _train_epoch(state, train_model, l2, epoch, show_progress, callbacks)
            if diverged_at is not None:
                status = STATUS_DIVERGED
                write_summary(STATUS_DIVERGED, diverged_at={"epoch": epoch, "step": diverged_at})
                log(f"epoch {epoch}: loss is NaN/Inf at step {diverged_at}; run marked diverged")
                break
            t_eval = time.perf_counter()
            if dctx.enabled and not config.sync_bn:
                reconcile_batchnorm(model, config.dist_bn)
            val = evaluate(model, val_loader, state.autocast())
            row["val/loss"], row["val/acc"] = val["loss"], val["acc"]
            row["seconds"] = round(row["seconds"] + time.perf_counter() - t_eval, 4)
            for cb in callbacks:
                row.update(cb.on_epoch_end(state, epoch, row))
            if val["acc"] > best["acc"]:
                best = {"acc": val["acc"], "epoch": epoch}
            if dctx.enabled and config.dist_bn == "none":
                # Statistics stay per rank: keep every rank's, so `normlab doctor RUN` can
                # show how far they disagree (the checkpoint holds rank 0's).
                _save_rank_buffers(run, model, dctx.rank)
            if dctx.is_main:
                # The row first, then the checkpoint: a crash between the two leaves a row the
                # checkpoint does not cover, which resume trims and recomputes (never a gap).
                run.append_metrics(row)
                run.save_checkpoint(
                    {
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state_all()
                        if torch.cuda.is_available()
                        else None,
                        "data_rng": generator.get_state(),
                        "scaler": None,  # bf16 autocast needs no loss scaling
                        "best": best,
                        "wall_seconds": wall_before + time.perf_counter() - t_start,
                    }
                )
            history.append(row)
            write_summary(STATUS_RUNNING)
            log(
                f"epoch {epoch}/{config.epochs}  train loss {row['train/loss']:.4f} acc {row['train/acc']:.4f}"
                f"  val loss {row['val/loss']:.4f} acc {row['val/acc']:.4f}  lr {row['lr']:.4g}"
                f"  {row['seconds']:.1f}s {row['images_per_s']:.0f} img/s"
            )
        else:
            status = STATUS_COMPLETED
            write_summary(STATUS_COMPLETED)
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
        if owns_group:
            del train_model  # DDP holds the group: drop it before the group goes
            shutdown_distributed(orderly=not failed)
    for cb in callbacks:
        cb.on_fit_end(state, status)
    return RunResult(run.path, status, summary, history, model, config)


def _train_epoch(
    state: FitState,
    train_model: nn.Module,
    l2: L2Penalty | None,
    epoch: int,
    show_progress: bool,
    callbacks: Sequence[Callback],
) -> tuple[dict[str, Any], int | None]:
    """One training epoch; returns its metrics row and the step at which the loss became
    non-finite (None if it did not)."""
    cfg = state.config
    model, optimizer, scheduler = state.model, state.optimizer, state.scheduler
    model.train()
    device = state.runtime.device
    # Accumulate on the device: no host sync per step (the loss check below is the only one).
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    l2_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    lr = optimizer.param_groups[0]["lr"]
    t0 = time.perf_counter()
    # A loss check needs a host sync: every step on CPU (free), every 25 steps on a GPU.
    check_every = 1 if state.runtime.device.type == "cpu" else 25
    with _progress(len(state.train_loader), f"epoch {epoch}/{cfg.epochs}", show_progress) as bar:
        for step, (x, y) in enumerate(state.train_loader):
            if state.dist.enabled:  # this rank's contiguous slice of the global batch
                x = x.tensor_split(state.dist.world_size)[state.dist.rank]
                y = y.tensor_split(state.dist.world_size)[state.dist.rank]
            with state.autocast():
                out = train_model(x)
            loss = nn.functional.cross_entropy(
                out.float(), y, label_smoothing=cfg.optim.label_smoothing
            )
            total = loss
            if l2 is not None:
                penalty = l2()
                total = loss + penalty
                l2_sum += penalty.detach().double()
            if step % check_every == 0 and not _all_finite(total.detach(), state.dist.enabled):
                return {}, step
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if cfg.optim.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            n = y.numel()
            loss_sum += loss.detach().double() * n
            correct += (out.detach().argmax(1) == y).sum()
            seen += n
            for cb in callbacks:
                cb.on_step_end(state, epoch, step)
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{float(loss):.3f}")
    total_loss, total_correct, total_seen, total_l2 = all_reduce_sum(
        [float(loss_sum), int(correct), seen, float(l2_sum)], device
    )
    if not math.isfinite(total_loss):
        return {}, len(state.train_loader) - 1
    seconds = time.perf_counter() - t0
    steps = len(state.train_loader)
    row: dict[str, Any] = {
        "epoch": epoch,
        "train/loss": total_loss / max(total_seen, 1),
        "train/acc": total_correct / max(total_seen, 1),
        "lr": lr,
        "seconds": seconds,
        "images_per_s": total_seen / seconds if seconds > 0 else float("nan"),
    }
    if l2 is not None:
        row["train/l2"] = total_l2 / state.dist.world_size / max(steps, 1)
    return row, None


def _save_rank_buffers(run: RunDir, model: nn.Module, rank: int) -> None:
    """Write this rank's BN running statistics to ``bn_buffers.rank<R>.pt`` (atomic)."""
    import io

    from torch.nn.modules.batchnorm import _BatchNorm

    buffers = {
        f"{name}.{key}" if name else key: buf.detach().cpu().clone()
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm)
        for key, buf in module.named_buffers(recurse=False)
        if buf is not None
    }
    data = io.BytesIO()
    torch.save(buffers, data)
    atomic_write_bytes(run.path / f"bn_buffers.rank{rank}.pt", data.getvalue())


def _all_finite(value: torch.Tensor, distributed: bool) -> bool:
    """Whether ``value`` is finite on every rank (all ranks must agree to stop together)."""
    if not distributed:
        return bool(torch.isfinite(value).all())
    flag = torch.isfinite(value).all().to(torch.float64).reshape(1)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def _build(config: TrainConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
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


def _lsuv(
    model: nn.Module,
    config: TrainConfig,
    images: Tensor,
    labels: Tensor,
    loader_kw: dict[str, Any],
) -> list[dict[str, Any]]:
    """``model.init: lsuv`` on the first ``init_samples`` images of a seeded permutation of the
    training split, normalised but not augmented; returns the per-layer record. Every rank of a
    multi-process run computes the same result (same images, same seed)."""
    from normlab.models.lsuv import lsuv_init

    g = torch.Generator().manual_seed(config.seed)
    n = min(config.model.init_samples, int(labels.numel()))
    idx = torch.randperm(int(labels.numel()), generator=g)[:n].to(images.device)
    x, _ = next(iter(BatchLoader.evaluation(images[idx], labels[idx], n, **loader_kw)))
    return [dataclasses.asdict(step) for step in lsuv_init(model, x, generator=g)]


def _finished_result(run: RunDir, config: TrainConfig, summary: dict[str, Any]) -> RunResult:
    """A run that already ended: load its final model from the checkpoint, train nothing."""
    model = _build(
        config, int(summary["num_classes"]), int(summary["channels"]), int(summary["image_size"])
    )
    ckpt = run.load_checkpoint()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    return RunResult(
        run.path, str(summary.get("status")), summary, run.read_metrics(), model, config
    )
