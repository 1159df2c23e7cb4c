"""Multi-process training on PyTorch's own engine: torchrun + DistributedDataParallel.

``torchrun --nproc-per-node N -m normlab train ...`` (or ``normlab train --devices N``, which
launches exactly that) runs N processes; :func:`context_from_env` reads the rank layout that
torchrun puts in the environment, and ``fit`` then:

* shards every *global* batch: ``batch_size`` is the global batch, each rank trains on its
  contiguous slice of ``batch_size / N`` samples of the same shuffled, augmented batch (so with
  SyncBN or a batch-independent norm, N processes compute what one process computes with the
  same global batch);
* wraps the model in DDP (gloo on CPU, NCCL on CUDA), optionally after converting BN to
  SyncBN (``sync_bn: true``);
* reconciles BN running statistics across ranks before every evaluation and checkpoint
  (``dist_bn``: ``reduce`` = average over ranks, ``broadcast`` = rank 0's, ``none``);
* reduces training and validation metrics over ranks, and gathers the per-image validation
  predictions of the ranks' strided shards back into the validation set's order; only rank 0
  writes files, logs and shows a progress bar.

A rank that dies ends the job: torchrun stops the other workers, and every collective has the
timeout ``runtime.dist_timeout`` (seconds) so no rank waits forever.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.errors import ConfigError, TrainingError

DIST_BN_MODES = ("reduce", "broadcast", "none")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a multi-process job (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env() -> DistContext:
    """The rank layout torchrun exports (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from None
    return DistContext(rank=rank, world_size=world, local_rank=local)


def init_distributed(ctx: DistContext, device: torch.device, timeout_s: float) -> None:
    """Join the process group (gloo on CPU, NCCL on CUDA) unless already joined."""
    if not ctx.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def shutdown_distributed(*, orderly: bool = True) -> None:
    """Leave the process group (a no-op when none is joined).

    ``orderly`` (the success path): every rank first waits at a barrier, so no rank tears its
    gloo/NCCL connections down while a peer is still working (rank 0 writes the last
    checkpoint after the final collective), and objects that hold the group (the DDP
    wrapper's reducer) are collected while the interpreter is fully alive; letting them die
    during interpreter shutdown can abort the process (SIGABRT). On a failure path pass
    ``orderly=False``: a barrier would wait for a rank that is gone until the timeout.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if orderly:
        import gc

        dist.barrier()
        gc.collect()
    dist.destroy_process_group()


def all_reduce_sum(values: Sequence[float | int], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (identity in a single process)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def gather_strided(shard: torch.Tensor) -> torch.Tensor:
    """The whole 1-d tensor of which each rank holds the strided shard ``whole[rank::world]``
    (how ``fit`` shards the validation set), in the whole's order; ``shard`` itself in a
    single process. Every rank gets it (an all-gather: gloo and NCCL both have one; padded,
    since shards differ in length by up to one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return shard
    world = dist.get_world_size()
    size = torch.tensor([shard.numel()], dtype=torch.int64, device=shard.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    lengths = [int(n) for n in torch.cat(sizes).tolist()]
    padded = shard.new_zeros(max(lengths))
    padded[: shard.numel()] = shard
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    whole = shard.new_empty(sum(lengths))
    for rank, (part, n) in enumerate(zip(parts, lengths, strict=True)):
        whole[rank::world] = part[:n]
    return whole


def reconcile_batchnorm(model: nn.Module, mode: str) -> None:
    """Make BN running statistics identical on all ranks (see module doc for ``mode``).

    A no-op outside a process group, for ``mode == "none"``, and for SyncBN statistics (they
    are equal on all ranks already, up to rounding; reducing them is harmless).
    """
    if mode not in DIST_BN_MODES:
        raise ConfigError(f"dist_bn must be one of {', '.join(DIST_BN_MODES)}, got {mode!r}")
    if mode == "none" or not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, _BatchNorm) or module.running_mean is None:
                continue
            for buf in (module.running_mean, module.running_var):
                assert buf is not None
                if mode == "reduce":
                    dist.all_reduce(buf)
                    buf.div_(world)
                else:
                    dist.broadcast(buf, src=0)


def available_devices(device_type: str) -> int:
    """How many processes ``--devices`` may start: GPUs on CUDA, CPU cores otherwise."""
    if device_type == "cuda":
        return torch.cuda.device_count()
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def launch(devices: int, argv: Sequence[str], *, device_type: str) -> int:
    """Run ``normlab <argv>`` in ``devices`` processes under torchrun; return its exit status.

    Raises ConfigError when more devices are asked for than this machine has.
    """
    have = available_devices(device_type)
    if devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {devices}")
    if devices > have:
        what = "GPUs" if device_type == "cuda" else "CPU cores"
        raise ConfigError(f"--devices {devices} but this machine has {have} {what}")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nproc-per-node", str(devices),
        "-m", "normlab", *argv,
    ]  # fmt: skip
    env = dict(os.environ)
    # One intra-op thread per core share: N processes must not oversubscribe the cores.
    if device_type != "cuda" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, available_devices("cpu") // devices))
    if shutil.which(sys.executable) is None:  # pragma: no cover
        raise TrainingError(f"cannot run {sys.executable} to launch torchrun")
    proc = subprocess.run(cmd, env=env, check=False)
    return proc.returncode


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over ``model`` (which must already be on ``device``)."""
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    # broadcast_buffers=False keeps BN running statistics rank-local, so that ``dist_bn``
    # (reduce / broadcast / none) decides how they are reconciled; torch 2.13 deprecates the
    # name but its replacement does not yet offer "no sync at init".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
