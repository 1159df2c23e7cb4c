"""Choose device, memory layout and precision for a model on this hardware.

``auto`` settings are resolved here, once, before training; the resolved values are written to
the run's ``config.yaml`` so that every run of a study uses the same arithmetic.

Rules (measured on 2-core Xeons, see ``benchmarks/train_throughput.py``):

* device ``auto``: CUDA when available, else CPU.
* memory format ``auto``: ``channels_last`` for models with 2-d convolutions (oneDNN and cuDNN
  both run NHWC convolutions faster), ``contiguous`` for conv-free models (the MLP).
* precision ``auto``: ``bf16`` autocast when the device runs bf16 fast (CUDA with bf16
  support; a CPU with AMX — AVX512-BF16 alone made training slower) *and* the model's compute
  is dominated by dense convolutions or matmuls; ``fp32`` for models whose convolutions are mostly depthwise
  (MobileNetV2) — there bf16 gave no speed-up on CPU while costing precision.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from normlab.config import RuntimeConfig
from normlab.errors import ConfigError
from normlab.hostinfo import cpu_flags


@dataclass(frozen=True)
class ResolvedRuntime:
    device: torch.device
    precision: str  # "fp32" | "bf16"
    memory_format: str  # "channels_last" | "contiguous"

    @property
    def torch_memory_format(self) -> torch.memory_format:
        return (
            torch.channels_last
            if self.memory_format == "channels_last"
            else torch.contiguous_format
        )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when this CPU has bf16 matrix units (AMX) that oneDNN uses for convolutions."""
    if not torch.backends.mkldnn.is_available():
        return False
    # AVX512-BF16 alone only converts: measured here, resnet20 training was *slower* in bf16
    # than in fp32 (441 vs 510 img/s, channels_last, 2 cores). AMX tiles are what pay.
    return "amx_bf16" in cpu_flags()


def depthwise_fraction(model: nn.Module) -> float:
    """Fraction of conv layers (by count) that are grouped/depthwise convolutions."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return 0.0
    return sum(1 for m in convs if m.groups > 1) / len(convs)


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def resolve_runtime(cfg: RuntimeConfig, model: nn.Module) -> ResolvedRuntime:
    """Resolve the ``auto`` fields of ``cfg`` for ``model`` on this machine (see module doc)."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"runtime.device is {cfg.device!r} but CUDA is not available on this machine; "
                "use runtime.device=cpu or auto"
            )

    if cfg.memory_format == "auto":
        memory_format = "channels_last" if has_conv(model) else "contiguous"
    else:
        memory_format = cfg.memory_format

    if cfg.precision == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()
        # One layer in three being depthwise marks a MobileNet-style network (see module doc).
        precision = "bf16" if native and depthwise_fraction(model) < 0.3 else "fp32"
    else:
        precision = cfg.precision
        if (
            precision == "bf16"
            and device.type == "cpu"
            and not torch.backends.mkldnn.is_available()
        ):
            raise ConfigError(
                "runtime.precision=bf16 needs oneDNN (mkldnn), absent from this torch"
            )
    return ResolvedRuntime(device=device, precision=precision, memory_format=memory_format)
