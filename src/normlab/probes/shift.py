"""``shift`` probe: estimation shift of every BN layer, and what recalibration would buy.

Seed 004 (Huang et al. 2022, "Delving into the Estimation Shift of Batch Normalization in a
Network", arXiv 2203.10778): BN's running (EMA) estimates drift from the population statistics
they stand for. At the end of each epoch that validates (every epoch unless ``eval_every``
says otherwise) this probe

1. recomputes each BN layer's population statistics with the current weights
   (:func:`normlab.probes.stats.population_statistics`, precise BN): a fixed sample of
   ``batches`` x ``batch_size`` training images (or ``images`` of them, cut to whole batches:
   use it to compare batch sizes on equal samples) *without* augmentation, in batches of the
   training batch size, forwarded in batch-statistics mode (BN normalises with batch
   statistics, as in training; dropout off), per-channel mean and biased variance pooled over
   all values of the sample;
2. records ``bn/shift/mean/<layer>`` and ``bn/shift/var/<layer>``
   (:func:`normlab.probes.stats.estimation_shift`): mean over channels of
   ``|running_mean - mean| / sqrt(var + eps)`` and of ``|log(running_var + eps) - log(var + eps)|``;
3. evaluates a fixed sample of ``val_samples`` validation images in eval mode with these
   population statistics substituted for the running ones (then restored bit for bit):
   ``shift/val/acc_precise``, ``shift/val/loss_precise``; and, on the same images with the
   running statistics, ``shift/val/acc_running``, ``shift/val/loss_running`` (so
   ``acc_precise - acc_running`` is what recalibration would buy, measured on paired images;
   when the sample is the whole validation set these equal the row's ``val/acc``, ``val/loss``
   and are copied from it rather than recomputed).

With ``inference=true`` it also records ``bn/inference_shift/mean|var/<layer>``: the same
distances to the statistics of the input each BN receives at inference (the whole network in
eval mode with its running statistics), which include the accumulation through earlier layers'
shifted statistics that the paper describes. Layers appear in execution order (depth).

The precise definition, its noise floor and its relation to the paper: docs/estimation_shift.md.

Cost per epoch: ``batches`` (or ``images / batch_size``) forward passes of a training batch (+ as many again with
``inference``), and ``2 * val_samples`` validation images forward (``val_samples`` when it
covers the whole validation set).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from normlab.engine.evaluate import evaluate
from normlab.probes.base import IMAGES_OPTION, Option, Probe, sample_loader, training_batches
from normlab.probes.stats import (
    PopulationStatistics,
    batchnorm_layers,
    estimation_shift,
    population_statistics,
    substituted_statistics,
)

if TYPE_CHECKING:
    from torch import nn

    from normlab.probes.context import Batches, ProbeContext

__all__ = ["ShiftProbe", "shift_metrics"]


def shift_metrics(
    model: nn.Module, stats: Mapping[str, PopulationStatistics], prefix: str = "bn/shift"
) -> dict[str, float]:
    """``{prefix}/mean/<layer>`` and ``{prefix}/var/<layer>`` for every layer in ``stats``
    (in its order), comparing ``model``'s running statistics with ``stats``."""
    layers = batchnorm_layers(model)
    out: dict[str, float] = {}
    for name, pop in stats.items():
        m = layers[name]
        assert m.running_mean is not None and m.running_var is not None
        mean_shift, var_shift = estimation_shift(m.running_mean, m.running_var, pop, m.eps)
        out[f"{prefix}/mean/{name}"] = mean_shift
        out[f"{prefix}/var/{name}"] = var_shift
    return out


class ShiftProbe(Probe):
    """Estimation shift per BN layer and validation accuracy with precise statistics."""

    name = "shift"
    VALIDATES = True
    OPTIONS: ClassVar[dict[str, Option]] = {
        "batches": (int, 8, 1, "training batches (of the training batch size) for the statistics"),
        "images": IMAGES_OPTION,
        "val_samples": (
            int,
            1000,
            0,
            "validation images evaluated with precise and running statistics (0: all)",
        ),
        "inference": (bool, False, None, "also record bn/inference_shift/* (one more pass)"),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._train: Batches | None = None
        self._val: Batches | None = None
        self._val_is_all = False

    def start(self, ctx: ProbeContext) -> None:
        self._train = training_batches(
            ctx, self.options["batches"], salt=self.name, images=self.options["images"]
        )
        n_val = ctx.split_size("val")
        wanted = self.options["val_samples"] or None
        self._val_is_all = wanted is None or (n_val is not None and wanted >= n_val)
        self._val = sample_loader(
            ctx,
            split="val",
            samples=None if self._val_is_all else wanted,
            batch_size=ctx.eval_batch_size,
            salt=self.name,
            drop_last=False,
        )

    def measure(self, ctx: ProbeContext, epoch: int, row: Mapping[str, Any]) -> dict[str, Any]:
        model = ctx.model
        if self._train is None or not batchnorm_layers(model):
            return {}
        stats = population_statistics(model, self._train, autocast=ctx.autocast())
        out: dict[str, Any] = dict(shift_metrics(model, stats))
        if self.options["inference"]:
            seen = population_statistics(
                model, self._train, normalize_with="running", autocast=ctx.autocast()
            )
            out.update(shift_metrics(model, seen, prefix="bn/inference_shift"))
        if self._val is not None:
            out.update(self._validation(ctx, stats, row))
        return out

    def _validation(
        self, ctx: ProbeContext, stats: Mapping[str, PopulationStatistics], row: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``shift/val/*``: the validation sample with precise and with running statistics."""
        model, val = ctx.model, self._val
        assert val is not None
        with substituted_statistics(model, stats):
            precise = evaluate(model, val, ctx.autocast())
        out = {"shift/val/acc_precise": precise["acc"], "shift/val/loss_precise": precise["loss"]}
        if self._val_is_all and "val/acc" in row:
            out["shift/val/acc_running"] = row["val/acc"]
            out["shift/val/loss_running"] = row["val/loss"]
        else:
            running = evaluate(model, val, ctx.autocast())
            out["shift/val/acc_running"] = running["acc"]
            out["shift/val/loss_running"] = running["loss"]
        return out
