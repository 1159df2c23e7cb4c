"""Optimizers, learning-rate schedules and the Keras-style L2 penalty.

Parameters fall in three kinds, found by walking modules (never by parameter-name patterns):
*kernels* (weights of conv and linear layers), *biases* (their biases) and *norm parameters*
(gamma/beta of any normalization layer, as :func:`normlab.norms.is_norm` recognises them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from normlab.config import OptimConfig
from normlab.norms import is_norm

_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class ParamKinds:
    kernels: list[torch.Tensor]
    biases: list[torch.Tensor]
    norm: list[torch.Tensor]
    other: list[torch.Tensor]


def split_parameters(model: nn.Module) -> ParamKinds:
    """Sort the trainable parameters of ``model`` into kernels, biases, norm params and other."""
    kernels: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    norm: list[torch.Tensor] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, _LAYER_TYPES):
            if module.weight.requires_grad:
                kernels.append(module.weight)
            if module.bias is not None and module.bias.requires_grad:
                biases.append(module.bias)
        elif is_norm(module):
            norm.extend(p for p in module.parameters(recurse=False) if p.requires_grad)
    for group in (kernels, biases, norm):
        seen.update(id(p) for p in group)
    other: list[torch.Tensor] = [
        p for p in model.parameters() if p.requires_grad and id(p) not in seen
    ]
    return ParamKinds(kernels, biases, norm, other)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW; weight decay on kernels and other parameters,
    and on biases and norm parameters unless ``cfg.weight_decay_norm`` is False."""
    kinds = split_parameters(model)
    decay = kinds.kernels + kinds.other
    no_decay = kinds.biases + kinds.norm
    if cfg.weight_decay_norm:
        decay, no_decay = decay + no_decay, []
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_factor(step: int, total_steps: int, warmup_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Linear warm-up from ``1 / (warmup_steps + 1)`` to 1 over ``warmup_steps`` steps, then
    ``constant`` (1), ``step`` (``step_gamma ** k`` after the k-th milestone, milestones being
    fractions of ``total_steps``) or ``cosine`` (half a cosine from 1 to 0 over the steps after
    warm-up).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        passed = sum(1 for m in cfg.step_milestones if step >= m * total_steps)
        return float(cfg.step_gamma**passed)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR following :func:`lr_factor`."""
    total = steps_per_epoch * epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cfg)
    )


class L2Penalty:
    """Keras-style L2 regularisation: ``coef * sum(w ** 2)`` over the selected parameters.

    Matches ``kernel_regularizer=tf.keras.regularizers.l2(coef)`` (and ``bias_regularizer``
    when ``biases``): Keras adds ``coef * sum(w ** 2)`` per regularised tensor to the loss.
    Computed in float32 whatever the autocast dtype.
    """

    def __init__(self, model: nn.Module, coef: float, *, biases: bool, norm_params: bool) -> None:
        kinds = split_parameters(model)
        self.coef = coef
        self.params = (
            kinds.kernels + (kinds.biases if biases else []) + (kinds.norm if norm_params else [])
        )

    def __call__(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        for p in self.params:
            total = total + p.float().pow(2).sum()
        return self.coef * total
