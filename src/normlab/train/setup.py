"""Everything :func:`normlab.train.fit` does before its first epoch, in order.

:func:`open_run` decides between a fresh run and a resumed one (and refuses what cannot be
either); :func:`build_session` builds data, model, runtime, optimizer, schedule and loaders
from a config; :func:`start` either restores the session from the run's checkpoint or writes
the run's config (and applies a data-dependent init). Nothing is written to the run directory
before :func:`start`, so bad input never leaves a half-made run behind.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from normlab.config import TrainConfig, config_to_dict
from normlab.data import BatchLoader, DataBundle, build_data
from normlab.engine.distributed import DistContext, init_distributed
from normlab.engine.optim import L2Penalty, build_optimizer, build_scheduler
from normlab.engine.runtime import ResolvedRuntime, resolve_runtime
from normlab.errors import ConfigError, TrainingError
from normlab.models.lsuv import lsuv_init
from normlab.norms import uses_batch_stats
from normlab.norms.sync import convert_sync_batchnorm
from normlab.store import RunDir, config_differences, model_from_config, run_meta


def default_run_dir(config: TrainConfig, root: str | Path = "runs") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    model = config.model.name.replace(":", "-").replace("/", "-")  # torchvision:resnet18
    name = f"{stamp}-{model}-{config.norm.name}-{config.model.placement}"
    return Path(root) / name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_run(
    config: TrainConfig | None, out: str | Path | None, resume: bool, dctx: DistContext
) -> tuple[RunDir, TrainConfig, bool]:
    """``(run, config, resuming)``: the run directory, the config to train (the saved one when
    resuming) and whether ``run`` already holds a run. ConfigError when ``out`` holds a run and
    ``resume`` is off, when it holds none to resume, or when ``config`` disagrees with it."""
    if out is None:
        if resume:
            raise ConfigError("resume needs the run directory to continue (--out DIR)")
        if dctx.enabled:
            raise ConfigError("a multi-process run needs its run directory: pass --out DIR")
        config = config if config is not None else TrainConfig()
        out = default_run_dir(config)
    run = RunDir(out)
    if not run.exists():
        if resume and config is None:
            raise ConfigError(f"--resume: {run.path} holds no run (no {run.config_path.name})")
        return run, config if config is not None else TrainConfig(), False
    if not resume:
        raise ConfigError(
            f"{run.path} already holds a run; pass --resume to continue it, or choose another --out"
        )
    saved = run.read_config()
    if config is not None:
        diffs = config_differences(config_to_dict(saved), config_to_dict(config))
        if diffs:
            raise ConfigError(
                f"--resume: the given settings differ from the run in {run.path}: "
                + "; ".join(diffs)
            )
    return run, saved, True


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


@dataclass
class Session:
    """A config made concrete: what the loop trains, on what, with what."""

    config: TrainConfig  # with the runtime fields resolved
    run: RunDir
    dist: DistContext
    data: DataBundle
    model: nn.Module
    runtime: ResolvedRuntime
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    l2: L2Penalty | None
    generator: torch.Generator  # batch order and augmentation
    train_loader: BatchLoader
    val_loader: BatchLoader
    loader_kw: dict[str, Any] = field(default_factory=dict)
    owns_group: bool = False  # this call made the process group, so it must end it


def build_session(
    config: TrainConfig, run: RunDir, dctx: DistContext, data: DataBundle | None = None
) -> Session:
    """Build data, model, runtime, optimizer, schedule and loaders for ``config``.

    Random state is drawn in a fixed order (seed everything, the data split with the seed
    ``data.split_seed`` chooses, the model's init with ``config.seed``, then the data
    generator), so equal configs give equal sessions. Raises on settings that cannot train;
    writes nothing.
    """
    seed_everything(config.seed)
    # By default the train/validation split is fixed (seed 0): training seeds vary init, order
    # and augmentation, not which images are held out, so seed-to-seed spread is training
    # noise; data.split_seed = "run" redraws it with each seed.
    split = config.data.split_seed_for(config.seed)
    bundle = data if data is not None else build_data(config.data, seed=split)
    torch.manual_seed(config.seed)
    model = model_from_config(config, bundle.num_classes, bundle.channels, bundle.image_size)
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
    o = config.optim
    l2 = (
        L2Penalty(model, o.l2, biases=o.l2_biases, norm_params=o.l2_norm_params)
        if o.l2 > 0
        else None
    )
    generator = torch.Generator().manual_seed(config.seed)
    train_loader, val_loader, loader_kw = _loaders(config, bundle, runtime, generator, dctx)
    return Session(
        config=config,
        run=run,
        dist=dctx,
        data=bundle,
        model=model,
        runtime=runtime,
        optimizer=optimizer,
        scheduler=scheduler,
        l2=l2,
        generator=generator,
        train_loader=train_loader,
        val_loader=val_loader,
        loader_kw=loader_kw,
        owns_group=owns_group,
    )


def _loaders(
    config: TrainConfig,
    bundle: DataBundle,
    runtime: ResolvedRuntime,
    generator: torch.Generator,
    dctx: DistContext,
) -> tuple[BatchLoader, BatchLoader, dict[str, Any]]:
    """The training loader (shuffled, augmented, drawing from ``generator``), this rank's
    validation loader, and the normalisation/placement arguments both share."""
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
    dcfg = config.data
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
    return train_loader, val_loader, common


@dataclass
class Progress:
    """Where a run stands when its loop starts."""

    start_epoch: int = 1
    best: dict[str, Any] = field(default_factory=lambda: {"acc": -1.0, "epoch": 0})
    wall_before: float = 0.0  # training seconds of earlier sessions of this run
    history: list[dict[str, Any]] = field(default_factory=list)
    # per-image validation predictions of the last ("final") and best ("best") epoch so far
    predictions: dict[str, torch.Tensor] = field(default_factory=dict)


def start(s: Session, resuming: bool, log: Any) -> Progress:
    """Restore ``s`` from the run's checkpoint (model, optimizer, schedule, RNG states,
    metrics trimmed to what the checkpoint covers), or start the run: write its config and,
    with ``model.init: lsuv``, initialise the model and record what that did."""
    run, dctx = s.run, s.dist
    ckpt = run.load_training_checkpoint() if resuming else None
    if ckpt is not None:
        s.model.load_state_dict(ckpt.model)
        s.optimizer.load_state_dict(ckpt.optimizer)
        s.scheduler.load_state_dict(ckpt.scheduler)
        torch.set_rng_state(ckpt.torch_rng)
        s.generator.set_state(ckpt.data_rng)
        if ckpt.cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt.cuda_rng)
        if dctx.is_main:
            history = run.truncate_metrics(ckpt.epoch)
        else:
            history = [r for r in run.read_metrics() if int(r["epoch"]) <= ckpt.epoch]
        kept = dict(ckpt.predictions or {})  # none in checkpoints older than predictions
        return Progress(ckpt.epoch + 1, dict(ckpt.best), ckpt.wall_seconds, history, kept)
    if dctx.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        if run.metrics_path.exists():
            run.metrics_path.unlink()  # a run that died before its first checkpoint restarts
        run.write_config(s.config, {**run_meta(), "world_size": dctx.world_size})
    if s.config.model.init == "lsuv":
        steps = _lsuv(s)
        if dctx.is_main:
            # what LSUV did, per layer, kept beside the run (resume does not redo it)
            run.write_init(
                {"method": "lsuv", "samples": s.config.model.init_samples, "layers": steps}
            )
            slow = [st["name"] for st in steps if not st["converged"]]
            log(
                f"LSUV init: {len(steps)} conv/linear layers scaled to unit output variance"
                + (f"; not converged: {', '.join(slow)}" if slow else "")
                + f" ({run.init_path})"
            )
    return Progress()


def _lsuv(s: Session) -> list[dict[str, Any]]:
    """``model.init: lsuv`` on the first ``init_samples`` images of a seeded permutation of the
    training split, normalised but not augmented; returns the per-layer record. Every rank of a
    multi-process run computes the same result (same images, same seed)."""
    config, images, labels = s.config, s.train_loader.images, s.train_loader.labels
    g = torch.Generator().manual_seed(config.seed)
    n = min(config.model.init_samples, int(labels.numel()))
    idx = torch.randperm(int(labels.numel()), generator=g)[:n].to(images.device)
    x, _ = next(iter(BatchLoader.evaluation(images[idx], labels[idx], n, **s.loader_kw)))
    return [dataclasses.asdict(step) for step in lsuv_init(s.model, x, generator=g)]
