"""Probes: measure the mechanisms behind the accuracy, every epoch, under stable metric keys.

``normlab train --probe weights,bn,shift,acts,gap`` (or ``probes: [...]`` in a config / study
spec) adds the probes' keys to each epoch's row of ``metrics.jsonl``:

==========  ==========================================================================  ========
probe       keys (``<layer>``: qualified module name, e.g. ``layer1.0.bn1``)            module
==========  ==========================================================================  ========
weights     ``weights/norm|angle/<layer>`` (conv, linear), ``weights/eff_lr/<layer>``   weights
            (scale-invariant layers: lr / ||w||^2), ``weights/first/<layer>`` (list)
bn          ``bn/running_mean|running_var|gamma|beta|num_batches_tracked|               bn
            init_fraction/<layer>``
shift       ``bn/shift/mean|var/<layer>``, ``shift/val/acc_precise|loss_precise|         shift
            acc_running|loss_running`` (+ ``bn/inference_shift/...`` with inference)
acts        ``acts/mean|std|skew|zeros/<layer>`` at every norm layer's input             acts
gap         ``gap/train|eval/loss|acc`` on one fixed training batch                      gap
==========  ==========================================================================  ========

A spec is ``NAME`` or ``NAME:KEY=VALUE[:KEY=VALUE...]`` (``:`` because ``,`` separates probes on
the command line), e.g. ``shift:batches=32:val_samples=0``. Options and defaults:

* weights: ``k=10`` values of ``layer=<first conv/linear>``
* shift: ``batches=8`` training batches for the population statistics, ``val_samples=1000``
  (0: the whole validation set), ``inference=false``
* acts: ``batches=2``, ``mode=train`` (or ``eval``)
* gap: ``batch_size=0`` (0: the training batch size)

The defaults keep all five probes together under 5% of an epoch of resnet20 on CIFAR-10
(``benchmarks/probe_overhead.py``). Guarantees common to all probes (see
:mod:`normlab.probes.base`): the model is left bit-identical, hooks are removed in ``finally``,
and no random number is drawn from the training streams, so probes on or off train the same.

The same probes in anyone's loop, on any ``nn.Module`` (a torchvision or timm model):
:class:`Instruments` (:mod:`normlab.probes.instruments`)::

    probes = Instruments(model, ["weights", "bn", "shift", "acts", "gap"],
                         data=train_loader, val=val_loader, optimizer=optimizer)
    metrics = probes.measure(epoch)   # at each epoch's end: the keys above

Both read the training through one small interface,
:class:`~normlab.probes.context.ProbeContext`: one implementation of every probe. A PyTorch
Lightning callback built on it: :mod:`normlab.integrations.lightning`.

The math lives in plain functions: :mod:`normlab.probes.stats` (population statistics / precise
BN, estimation shift, initial-value fraction, per-channel moments), shared with ``normlab.bn``.
Plots: :mod:`normlab.probes.plots` (imports matplotlib; not imported here).
"""

from __future__ import annotations

from normlab.probes.acts import ActsProbe
from normlab.probes.base import Probe
from normlab.probes.bn import BNProbe
from normlab.probes.catalog import PROBES, build_probes, validate_probes
from normlab.probes.gap import GapProbe
from normlab.probes.instruments import DEFAULT_PROBES, Instruments
from normlab.probes.shift import ShiftProbe
from normlab.probes.weights import WeightsProbe

__all__ = [
    "DEFAULT_PROBES",
    "PROBES",
    "ActsProbe",
    "BNProbe",
    "GapProbe",
    "Instruments",
    "Probe",
    "ShiftProbe",
    "WeightsProbe",
    "build_probes",
    "validate_probes",
]
