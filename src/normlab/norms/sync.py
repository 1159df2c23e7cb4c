"""Synchronised BatchNorm that also runs on CPU (gloo) — and conversion to and from it.

``torch.nn.SyncBatchNorm`` only synchronises GPU tensors; on CPU it raises. normlab's
:class:`SyncBatchNorm` computes the same thing with a differentiable all-reduce
(``torch.distributed.nn.functional.all_reduce``), so multi-process training with SyncBN is
testable on a CPU with the gloo backend. On CUDA, :func:`convert_sync_batchnorm` uses torch's
own (faster, fused) implementation. Back to plain BatchNorm (for inference, export):
``normlab.bn.convert.sync_to_batchnorm`` / ``normlab convert --op sync-to-bn``.

Semantics (identical to torch's SyncBatchNorm): in training, every rank normalises with the
mean and *biased* variance of the union of all ranks' batches (``n`` = samples x spatial
positions over all ranks); the running statistics are updated with PyTorch's momentum
convention (``running = (1 - m) * running + m * batch``) and the *unbiased* global variance
(``n / (n - 1)``). The backward pass sums the statistics' gradients over ranks, so DDP's
gradient averaging yields the gradient of the global-batch loss: training on W ranks with local
batch b equals single-process training with batch W*b (up to float rounding). In eval mode, or
when no process group is initialised, it is plain BatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.errors import ConfigError
from normlab.norms.layers import _BatchRenorm, _GhostBatchNorm
from normlab.norms.swap import rebuild_batchnorm, swap_modules


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the incoming gradients over ranks too (each rank's
    input affects every rank's output)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the union of all ranks' batches; works with gloo on CPU (see module doc)."""

    original_type: type[nn.Module] = nn.BatchNorm2d

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        synced = self.training and dist.is_available() and dist.is_initialized()
        if not synced or dist.get_world_size() == 1:
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = (1, -1) + (1,) * (input.dim() - 2)
        x = input.float()
        count = torch.full((1,), float(x.numel() // x.shape[1]), device=x.device)
        # Two passes (mean, then mean squared deviation) rather than E[x^2] - E[x]^2: the same
        # numerics as a single-process BatchNorm, so N ranks match one process closely.
        first = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        c = x.shape[1]
        n = first[c]
        mean = first[:c] / n
        centered = x - mean.view(shape)
        var = _AllReduceSum.apply((centered * centered).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None and self.num_batches_tracked is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        y = centered * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def _batchnorm_types() -> tuple[type[nn.Module], ...]:
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every plain ``BatchNorm*d`` with a synchronised one, keeping its state.

    On CUDA this is ``torch.nn.SyncBatchNorm`` (via its own converter); elsewhere normlab's
    :class:`SyncBatchNorm`, built by :func:`normlab.norms.swap.rebuild_batchnorm`
    (hyperparameters, the state_dict on the same device and in the same dtype, requires_grad and
    the train/eval flag carry over) with the class it replaces recorded as ``original_type``; a
    layer shared by several parents becomes one SyncBN that they share. Batch Renormalization
    and ghost BN are refused (ConfigError): a plain SyncBN would silently drop what makes them
    different.
    """
    for name, m in model.named_modules():
        if isinstance(m, _BatchRenorm | _GhostBatchNorm):
            raise ConfigError(
                f"sync_bn supports plain BatchNorm; layer {name!r} is {type(m).__name__} "
                "(use norm bn, or sync_bn=false)"
            )
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return swap_modules(model, _to_sync)


def _to_sync(name: str, module: nn.Module) -> SyncBatchNorm | None:
    if type(module) not in _batchnorm_types():
        return None
    assert isinstance(module, _BatchNorm)
    new = rebuild_batchnorm(module, SyncBatchNorm)
    new.original_type = type(module)  # what normlab.bn.convert.sync_to_batchnorm restores
    return new
