"""normlab's probes in a PyTorch Lightning training: :class:`ProbeCallback`.

Needs the ``lightning`` package (``pip install 'normlab[lightning]'``); without it, importing
this module raises a :class:`~normlab.errors.ConfigError` whose one line says so. Usage::

    from normlab.integrations.lightning import ProbeCallback

    probes = ProbeCallback(["weights", "bn", "shift", "acts", "gap"], module="model",
                           data=probe_loader, val=val_loader, doctor="fail")
    lightning.Trainer(max_epochs=10, callbacks=[probes]).fit(lit_module, train_loader)

What it does:

* at ``on_train_start`` (before the first step) it attaches
  :class:`normlab.probes.Instruments` to the network: ``pl_module`` itself, or its submodule
  ``module`` (a dotted attribute path such as ``"model"``: then the layer names in the keys
  are the network's own, ``layer1.0.bn1``, as in a normlab ``fit`` of that network). The
  optimizers are the trainer's (for ``weights/eff_lr``); autocast follows the trainer's
  precision (``32-true``, ``bf16-mixed``, ``16-mixed``; other precisions are refused);
  ``data`` defaults to the trainer's training loader (pass one without augmentation for
  normlab's definitions; see :mod:`normlab.probes.instruments` for what is read and when);
* at every ``on_train_epoch_end`` (after the epoch's validation, before an epoch-wise
  scheduler steps) it measures and logs every numeric key through ``pl_module.log_dict``
  (the Lightning logger: TensorBoard, CSV, MLflow...) under the same key strings as normlab's
  ``metrics.jsonl``; the list-valued ``weights/first/<layer>`` is not a scalar and is only
  kept in :attr:`ProbeCallback.rows`, which holds every epoch's full measurement;
* at ``on_fit_end``, with ``doctor="warn"`` (default) or ``"fail"``, it runs
  :func:`normlab.bn.diagnose` on the trained network with a fixed sample of ``data``
  (``trained=True``; ``mode_recorded=False``: the train/eval flags Lightning leaves at the end
  are not a deployment decision) and warns, or raises :class:`DoctorFailed`, when the report
  holds error findings; the report is kept in :attr:`ProbeCallback.report`.

The guarantees are those of :class:`~normlab.probes.Instruments`: the network is left
bit-identical, hooks are removed, and the caller's random generators are as they were, so a
training with the callback trains exactly as without it. Under DDP every process measures
its own replica and shard; Lightning's loggers write rank 0's values.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from normlab.errors import ConfigError, TrainingError

try:
    import lightning.pytorch as pl
except ImportError:
    raise ConfigError(
        "the Lightning callback needs PyTorch Lightning: pip install 'normlab[lightning]'"
    ) from None

from normlab.bn import Report, diagnose
from normlab.probes import DEFAULT_PROBES, Instruments, build_probes

__all__ = ["DOCTOR_MODES", "DoctorFailed", "ProbeCallback"]

DOCTOR_MODES = ("off", "warn", "fail")

_AUTOCAST = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}

DOCTOR_SAMPLES_BATCHES = 8
"""Training batches of ``data`` the doctor's dynamic checks (estimation shift) run on."""


class DoctorFailed(TrainingError):
    """The doctor found error findings in the trained network (``doctor="fail"``)."""


def autocast_dtype(precision: object) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision setting; ConfigError for the ones the
    probes cannot reproduce (``-true`` half precisions and doubles convert the inputs)."""
    key = str(precision)
    if key not in _AUTOCAST:
        raise ConfigError(
            f"ProbeCallback: trainer precision {key!r} is not supported; use one of "
            + ", ".join(_AUTOCAST)
        )
    return _AUTOCAST[key]


class ProbeCallback(pl.Callback):
    """normlab's probes as a Lightning callback (see the module docstring).

    Args:
        probes: probe specs (``"shift:batches=8"``); default all five.
        module: dotted path of the network inside the LightningModule (None: the module).
        data: training images for the probes (default: the trainer's training loader).
        val: validation images for ``shift/val/*`` (optional).
        seed, batch_size, eval_batch_size: as in :class:`~normlab.probes.Instruments`.
        doctor: ``off``, ``warn`` (default) or ``fail`` on the doctor's error findings.
    """

    def __init__(
        self,
        probes: Sequence[str] = DEFAULT_PROBES,
        *,
        module: str | None = None,
        data: object = None,
        val: object = None,
        seed: int = 0,
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
        doctor: str = "warn",
    ) -> None:
        if doctor not in DOCTOR_MODES:
            raise ConfigError(
                f"ProbeCallback: doctor must be one of {', '.join(DOCTOR_MODES)}, got {doctor!r}"
            )
        build_probes(probes)  # bad specs fail here, not at the first epoch
        self.probe_specs = list(probes)
        self.module = module
        self.data, self.val = data, val
        self.seed, self.batch_size, self.eval_batch_size = seed, batch_size, eval_batch_size
        self.doctor = doctor
        self.instruments: Instruments | None = None
        self.rows: list[dict[str, Any]] = []
        """Every epoch's measurement: ``{"epoch": e, **keys}`` (lists included)."""
        self.report: Report | None = None
        """The doctor's report at the end of fitting (None before, or with ``doctor="off"``)."""

    def network(self, pl_module: pl.LightningModule) -> nn.Module:
        """The network the probes observe: ``pl_module`` or its submodule ``module``."""
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            children = ", ".join(name for name, _ in pl_module.named_children()) or "(none)"
            raise ConfigError(
                f"ProbeCallback: the LightningModule has no submodule {self.module!r}; "
                f"its children: {children}"
            ) from None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = self.data if self.data is not None else trainer.train_dataloader
        self.instruments = Instruments(
            self.network(pl_module),
            self.probe_specs,
            data=data,
            val=self.val,
            optimizer=list(trainer.optimizers) or None,
            seed=self.seed,
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
            autocast=autocast_dtype(trainer.precision),
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.instruments is None:
            return
        epoch = trainer.current_epoch + 1
        metrics = self.instruments.measure(epoch)
        self.rows.append({"epoch": epoch, **metrics})
        scalars = {
            k: v
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if scalars:
            pl_module.log_dict(scalars, on_step=False, on_epoch=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.doctor == "off" or self.instruments is None:
            return
        batches = self.instruments.fixed_batches(
            DOCTOR_SAMPLES_BATCHES * self.instruments.batch_size
        )
        self.report = diagnose(
            self.network(pl_module),
            data=batches,
            trained=True,
            mode_recorded=False,
            batch_size=self.instruments.batch_size,
            target=self.module or type(pl_module).__name__,
        )
        errors = [f for f in self.report.findings if f.severity == "error"]
        if not errors:
            return
        ids = ", ".join(sorted({f.id for f in errors}))
        message = (
            f"normlab doctor: {len(errors)} error finding(s) in the trained network ({ids})\n"
            + self.report.format_text()
        )
        if self.doctor == "fail":
            raise DoctorFailed(message)
        warnings.warn(message, stacklevel=2)
