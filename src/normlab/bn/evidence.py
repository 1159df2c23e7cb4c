"""Was the model trained? A verdict from evidence, and the evidence it rests on.

A BN layer whose running mean is 0 and variance 1 is broken in a trained model and expected in a
fresh one, so the doctor must know which it is, and say how it knows. Evidence, strongest first:

1. ``declared``: the caller says (``trained=``; ``--trained`` / ``--untrained``).
2. ``counter``: what the file records of the optimisation: a Keras optimizer's ``iterations``;
   in a PyTorch checkpoint dict the optimizer state (``step`` per parameter, momentum buffers;
   an empty state says nothing, since SGD without momentum keeps none),
   a scheduler's ``last_epoch``, and ``step`` / ``global_step`` / ``iteration`` /
   ``num_updates`` / ``epoch`` fields (``epoch`` 0 says nothing: many trainers count epochs
   from 0; plural names such as ``epochs`` are often planned totals and are not read); a
   normlab run's epoch.
3. ``batches``: ``num_batches_tracked`` of PyTorch BN layers: above 0, a BN ran training-mode
   forwards; 0 in every layer, none did. A live model's parameters holding ``.grad``: a
   backward pass ran.
4. ``affine``: BN/GN weight and bias. At their default initial values (weight all 1 or all 0,
   bias all 0) they say untrained. Values that are random but alike in every layer, as a fresh
   initialisation draws them (timm's RepVGG: N(0.1, 0.1)), also say untrained, when there are
   enough layers and values to tell (:func:`alike`) and the weights sit away from the default
   1 (a draw centred on 1 cannot be told from a default init that training moved a little);
   anything else says trained. A random
   initialisation cannot be told from a *short* training with the BN layers kept in eval mode
   (measured: 100 Adam steps at lr 1e-3 from timm's N(0.1, 0.1) still look alike), so a verdict
   resting on it says so.

The verdict (:func:`training_verdict`) is ``trained`` when the strongest category with a
trained-or-untrained item has one saying trained (a counter above 0 outweighs an affine at its
initial values), ``untrained`` when it has only items saying untrained, and ``unknown`` when
nothing says either. Every verdict names the items it rests on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from normlab.bn.graph import NormLayer

if TYPE_CHECKING:
    from normlab.bn.keras_file import KerasTraining

__all__ = [
    "CATEGORIES",
    "Evidence",
    "TrainingVerdict",
    "affine_at_init",
    "alike",
    "checkpoint_evidence",
    "gradient_evidence",
    "keras_evidence",
    "layer_evidence",
    "target_evidence",
    "training_verdict",
]

CATEGORIES = ("declared", "counter", "batches", "affine")
TRAINED, UNTRAINED, NEUTRAL = "trained", "untrained", "neutral"
AFFINE_FAMILIES = ("batchnorm", "frozen_bn", "groupnorm")
MIN_LAYERS_ALIKE = 4
"""Fewest non-default layers, and values, to call their affine a random initialisation."""
MIN_VALUES_ALIKE = 512


@dataclass(frozen=True)
class Evidence:
    """One fact about training read from the model or its file."""

    category: str
    """One of :data:`CATEGORIES`."""
    says: str
    """``trained``, ``untrained`` or ``neutral``."""
    detail: str
    """The fact in words, with the value and where it was read."""
    value: Any = None
    """The number read (a step count, a batch count), or ``"random-init"`` for affine values
    that look like a random initialisation (a weaker reading than a counter)."""


@dataclass(frozen=True)
class TrainingVerdict:
    """``trained`` | ``untrained`` | ``unknown``, and the evidence behind it."""

    verdict: str
    rests_on: tuple[Evidence, ...]
    evidence: tuple[Evidence, ...]

    @property
    def because(self) -> str:
        """The evidence in words: ``"optimizer iterations=94 (...); ..."``."""
        if not self.rests_on:
            return "no optimizer counter, batch counter or affine parameters say either way"
        return "; ".join(e.detail for e in self.rests_on)

    @property
    def summary(self) -> str:
        return f"{self.verdict} ({self.because})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "summary": self.summary,
            "rests_on": [asdict(e) for e in self.rests_on],
            "evidence": [asdict(e) for e in self.evidence],
        }


def training_verdict(evidence: Iterable[Evidence]) -> TrainingVerdict:
    """The verdict of the strongest category that says anything (see the module docstring)."""
    items = tuple(evidence)
    decisive = [e for e in items if e.says != NEUTRAL]
    for strong in (("declared",), ("counter",)):
        said = [e for e in decisive if e.category in strong]
        trained = [e for e in said if e.says == TRAINED]
        if said:
            return TrainingVerdict(TRAINED if trained else UNTRAINED, tuple(trained or said), items)
    weak = [e for e in decisive if e.category in ("batches", "affine")]
    trained = [e for e in weak if e.says == TRAINED]
    if trained:
        return TrainingVerdict(TRAINED, tuple(trained), items)
    if weak:
        return TrainingVerdict(UNTRAINED, tuple(weak), items)
    return TrainingVerdict("unknown", (), items)


def declared(trained: bool | None) -> list[Evidence]:
    if trained is None:
        return []
    return [
        Evidence(
            "declared",
            TRAINED if trained else UNTRAINED,
            f"declared {'trained' if trained else 'untrained'} by the caller",
            trained,
        )
    ]


# ---- from the layers -------------------------------------------------------------------------


def affine_at_init(layer: NormLayer) -> bool | None:
    """Weight all 1 or all 0 (or absent) and bias all 0 (or absent); None without an affine."""
    w, b = layer.weight, layer.bias
    if w is None and b is None:
        return None
    w_init = w is None or bool((w == 1).all()) or bool((w == 0).all())
    b_init = b is None or bool((b == 0).all())
    return w_init and b_init


def _batch_evidence(layers: Sequence[NormLayer]) -> list[Evidence]:
    counts = {
        layer.name: layer.num_batches_tracked
        for layer in layers
        if layer.family == "batchnorm" and layer.num_batches_tracked is not None
    }
    if not counts:
        return []
    counted = {name: n for name, n in counts.items() if n > 0}
    if counted:
        name, most = max(counted.items(), key=lambda kv: kv[1])
        return [
            Evidence(
                "batches",
                TRAINED,
                f"num_batches_tracked > 0 in {len(counted)} of {len(counts)} BN layer(s) "
                f"(up to {most}, in {name}): BN ran training-mode forwards",
                most,
            )
        ]
    return [
        Evidence(
            "batches",
            UNTRAINED,
            f"num_batches_tracked=0 in all {len(counts)} BN layer(s): no BN ran a training-mode "
            "forward",
            0,
        )
    ]


def alike(vectors: Sequence[Tensor], alpha: float = 1e-3) -> bool:
    """Whether per-layer vectors look like independent draws from one distribution, as a random
    initialisation makes them: not constant, and every layer's mean and variance within a
    Bonferroni-corrected two-sided ``alpha`` bound of the pooled ones (the variance's spread
    from the pooled kurtosis, so uniform and normal draws both pass). Training moves each layer
    its own way, which this rejects once there are enough values; with few values it cannot
    tell, and :func:`layer_evidence` does not ask it then."""
    values = torch.cat([v.reshape(-1).double() for v in vectors])
    mu, var = float(values.mean()), float(values.var())
    if not (var > 0 and math.isfinite(var)):
        return False
    kurtosis = float(((values - mu) ** 4).mean()) / var**2
    z = NormalDist().inv_cdf(1 - alpha / (4 * len(vectors)))
    for v in vectors:
        v = v.reshape(-1).double()
        n = v.numel()
        if n < 2 or float(v.var()) == 0:
            return False
        if abs(float(v.mean()) - mu) > z * math.sqrt(var / n):
            return False
        spread = var * math.sqrt(max(kurtosis / n - (n - 3) / (n * (n - 1)), 1e-12))
        if abs(float(v.var()) - var) > z * spread:
            return False
    return True


def _off_default(weights: Sequence[Tensor]) -> bool:
    """Whether the pooled weights sit away from the default 1 (by 3 standard deviations): a
    random initialisation centred there (N(1, 0.02), U(0.5, 1.5)) looks like a default one
    that training moved a little, which must stay evidence of training."""
    values = torch.cat([v.reshape(-1).double() for v in weights])
    return abs(float(values.mean()) - 1.0) >= 3 * float(values.std())


def _describe(vectors: Sequence[Tensor]) -> str:
    values = torch.cat([v.reshape(-1).double() for v in vectors])
    return f"mean {float(values.mean()):.3g}, std {float(values.std()):.3g}"


def _affine_evidence(layers: Sequence[NormLayer]) -> list[Evidence]:
    affine = [layer for layer in layers if layer.family in AFFINE_FAMILIES]
    states = {layer.name: affine_at_init(layer) for layer in affine}
    known = [layer for layer in affine if states[layer.name] is not None]
    if not known:
        return []
    moved = [layer for layer in known if states[layer.name] is False]
    if not moved:
        return [
            Evidence(
                "affine",
                UNTRAINED,
                f"every BN/GN affine at its default initial values (weight 1 or 0, bias 0) in "
                f"{len(known)} layer(s)",
            )
        ]
    weights = [
        layer.weight
        for layer in moved
        if layer.weight is not None
        and not (bool((layer.weight == 1).all()) or bool((layer.weight == 0).all()))
    ]
    biases = [b for b in (layer.bias for layer in moved) if b is not None and bool((b != 0).any())]
    values = sum(int(v.numel()) for v in (*weights, *biases))
    random_init = (
        len(moved) >= MIN_LAYERS_ALIKE
        and values >= MIN_VALUES_ALIKE
        and bool(weights)
        and _off_default(weights)
        and all(alike(group) for group in (weights, biases) if group)
    )
    if random_init:
        parts = [f"weight {_describe(weights)}" if weights else ""]
        parts.append(f"bias {_describe(biases)}" if biases else "")
        return [
            Evidence(
                "affine",
                UNTRAINED,
                f"the affine parameters of {len(moved)} layer(s) are random but alike in every "
                f"layer ({', '.join(p for p in parts if p)}), as a fresh initialisation draws "
                "them (training moves each layer its own way)",
                "random-init",
            )
        ]
    example = moved[0]
    w = example.weight
    shown = (
        f" (e.g. {example.name}: weight mean {float(w.double().mean()):.3g})"
        if w is not None
        else ""
    )
    return [
        Evidence(
            "affine",
            TRAINED,
            f"the affine parameters of {len(moved)} of {len(known)} BN/GN layer(s) left their "
            f"initial values{shown}",
            len(moved),
        )
    ]


def gradient_evidence(parameters: Iterable[Tensor]) -> list[Evidence]:
    """A live model's ``.grad`` tensors: a backward pass ran (files do not keep them)."""
    params = list(parameters)
    with_grad = sum(p.grad is not None for p in params)
    if not with_grad:
        return []
    return [
        Evidence(
            "batches",
            TRAINED,
            f"{with_grad} of {len(params)} parameter(s) hold gradients (.grad): a backward pass "
            "ran",
            with_grad,
        )
    ]


def layer_evidence(layers: Sequence[NormLayer]) -> list[Evidence]:
    """What the layers themselves say: batch counters and affine parameters."""
    return [*_batch_evidence(layers), *_affine_evidence(layers)]


# ---- from the file ---------------------------------------------------------------------------

# counters of what was done; plural names ("steps", "epochs") are often the planned totals
_STEP_KEYS = ("global_step", "step", "iteration", "num_updates", "n_iter")
_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_state", "optim")
_OPTIMIZER_LISTS = ("optimizer_states", "optimizers")
_SCHEDULER_KEYS = ("scheduler", "lr_scheduler", "scheduler_state_dict", "sched")
_SCHEDULER_LISTS = ("lr_schedulers", "schedulers")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def _optimizer_evidence(key: str, state: Any) -> list[Evidence]:
    """A ``torch.optim`` state_dict: per-parameter ``step`` counts (0 everywhere: untrained), or
    other per-parameter buffers (SGD momentum: trained). An empty state says nothing: plain SGD
    keeps none however long it trains."""
    if not isinstance(state, Mapping) or "state" not in state or "param_groups" not in state:
        return []
    per_param = state["state"]
    if not isinstance(per_param, Mapping):
        return []
    if not per_param:
        # no step yet, or an optimizer that keeps no state (SGD without momentum): says nothing
        return [
            Evidence(
                "counter",
                NEUTRAL,
                f"'{key}' optimizer state is empty (no step taken, or a stateless optimizer "
                "such as SGD without momentum)",
                0,
            )
        ]
    steps = [
        n
        for s in per_param.values()
        if isinstance(s, Mapping)
        for n in [_number(s.get("step"))]
        if n is not None
    ]
    if steps:
        most = int(max(steps))
        return [
            Evidence(
                "counter",
                TRAINED if most > 0 else UNTRAINED,
                f"'{key}' optimizer step={most} ({len(steps)} parameter(s))",
                most,
            )
        ]
    return [
        Evidence(
            "counter",
            TRAINED,
            f"'{key}' optimizer holds per-parameter state for {len(per_param)} parameter(s) "
            "(e.g. momentum buffers): it took steps",
            len(per_param),
        )
    ]


def _scheduler_evidence(key: str, state: Any) -> list[Evidence]:
    if not isinstance(state, Mapping):
        return []
    last = _number(state.get("last_epoch"))
    if last is None or last <= 0:
        return []
    return [Evidence("counter", TRAINED, f"'{key}' scheduler last_epoch={int(last)}", int(last))]


def checkpoint_evidence(checkpoint: Mapping[str, Any]) -> list[Evidence]:
    """Training counters in a PyTorch checkpoint dict (see the module docstring)."""
    out: list[Evidence] = []
    for key in _STEP_KEYS:
        n = _number(checkpoint.get(key))
        if n is not None and n >= 0:
            out.append(
                Evidence("counter", TRAINED if n > 0 else UNTRAINED, f"checkpoint {key}={n:g}", n)
            )
    n = _number(checkpoint.get("epoch"))
    if n is not None and n > 0:
        out.append(Evidence("counter", TRAINED, f"checkpoint epoch={n:g}", n))
    for key in _OPTIMIZER_KEYS:
        out.extend(_optimizer_evidence(key, checkpoint.get(key)))
    for key in _OPTIMIZER_LISTS:
        items = checkpoint.get(key)
        if isinstance(items, list | tuple):
            for i, item in enumerate(items):
                out.extend(_optimizer_evidence(f"{key}[{i}]", item))
    for key in _SCHEDULER_KEYS:
        out.extend(_scheduler_evidence(key, checkpoint.get(key)))
    for key in _SCHEDULER_LISTS:
        items = checkpoint.get(key)
        if isinstance(items, list | tuple):
            for i, item in enumerate(items):
                inner = item.get("scheduler", item) if isinstance(item, Mapping) else item
                out.extend(_scheduler_evidence(f"{key}[{i}]", inner))
    return out


def keras_evidence(training: KerasTraining) -> list[Evidence]:
    """The optimizer iteration counter of a Keras file (:func:`read_keras_training`)."""
    if training.iterations is None:
        return []
    n = training.iterations
    opt = f"{training.optimizer} " if training.optimizer else ""
    return [
        Evidence(
            "counter",
            TRAINED if n > 0 else UNTRAINED,
            f"{opt}optimizer iterations={n} in the file ({training.where})",
            n,
        )
    ]


def target_evidence(target: Any) -> list[Evidence]:
    """File evidence of a loaded :class:`~normlab.bn.load.Target`: its checkpoint dict's
    counters, a Keras file's optimizer iterations, and a normlab run's epoch (``trained``)."""
    out: list[Evidence] = []
    checkpoint = getattr(target, "checkpoint", None)
    if isinstance(checkpoint, Mapping):
        out.extend(checkpoint_evidence(checkpoint))
    path = getattr(target, "path", None)
    if getattr(target, "kind", None) == "keras" and isinstance(path, Path):
        from normlab.bn.keras_file import read_keras_training

        out.extend(keras_evidence(read_keras_training(path)))
    recorded = getattr(target, "trained", None)
    if recorded is not None and not any(e.detail.startswith("checkpoint epoch") for e in out):
        out.append(
            Evidence(
                "counter",
                TRAINED if recorded else UNTRAINED,
                "the checkpoint's epoch (normlab counts finished epochs) is "
                + ("past 0" if recorded else "0"),
                recorded,
            )
        )
    return out
