"""The model zoo the BN toolbox is proven on: every torchvision classification model under
100 M parameters and a broad timm sample, built untrained (no weights, no network) with
trained-looking BN statistics, at small inputs.

Imported as ``import _zoo`` by the zoo tests (tests/test_bn_zoo.py, and the doctor's zoo checks)
and by benchmarks/zoo_fold.py (which puts tests/ on ``sys.path``). :func:`zoo_entries` lists the
models, :func:`build` makes one in eval mode with populated statistics, :func:`uncalibrated`
gives the same model with the statistics of a fresh one (mean 0, var 1) for checks that must
flag it.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

MAX_PARAMS = 100_000_000
NUM_CLASSES = 10

# timm sample: the families the issue names (BN variants, norm+act modules, reused convs,
# attention blocks), convnext / nfnet as controls without BN. Values: create_model kwargs.
TIMM: dict[str, dict[str, Any]] = {
    "resnet18": {},
    "resnet50d": {},
    "resnetv2_50": {},
    "dpn48b": {},
    "dpn68": {},
    "densenet121": {},
    "efficientnet_b0": {},
    "tf_efficientnet_b0": {},
    "tf_efficientnet_lite0": {},
    "mobilenetv2_100": {},
    "mobilenetv3_small_100": {},
    "mobilenetv3_large_100": {},
    "tf_mobilenetv3_small_100": {},
    "mixnet_s": {},
    "tf_mixnet_s": {},
    "regnetx_002": {},
    "regnety_002": {},
    "repvgg_a0": {},
    "ghostnet_100": {},
    "hrnet_w18_small": {},
    "dla34": {},
    "cspresnet50": {},
    "cspdarknet53": {},
    "botnet26t_256": {"img_size": 64},
    "lambda_resnet26t": {"img_size": 64},
    "mobilevit_xxs": {},
    "convnext_atto": {},
    "nf_regnet_b0": {},
}

# torchvision models that need more than 64x64, or a size given at build time.
# maxvit: partitions of 7 at every stage
TV_INPUT = {"inception_v3": 80, "maxvit_t": 224}
TV_KWARGS: dict[str, dict[str, Any]] = {
    "vit_b_16": {"image_size": 64},
    "vit_b_32": {"image_size": 64},
    "maxvit_t": {"input_size": (224, 224)},
    "inception_v3": {"aux_logits": False, "init_weights": False},
    "googlenet": {"aux_logits": False, "init_weights": False},
}


@dataclass(frozen=True)
class ZooEntry:
    lib: str
    """``torchvision`` or ``timm``."""
    name: str
    input_size: int = 64
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.lib}-{self.name}"

    def example(self, batch: int = 2, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, self.input_size, self.input_size, generator=g)


def torchvision_entries() -> list[ZooEntry]:
    """Every torchvision classification model under :data:`MAX_PARAMS` (counted from the
    weights' metadata, so nothing is built or downloaded to list them)."""
    from torchvision import models

    out = []
    for name in models.list_models(module=models):
        weights = list(models.get_model_weights(name))
        if weights and int(weights[0].meta["num_params"]) >= MAX_PARAMS:
            continue
        out.append(ZooEntry("torchvision", name, TV_INPUT.get(name, 64), TV_KWARGS.get(name, {})))
    return out


def timm_entries() -> list[ZooEntry]:
    return [ZooEntry("timm", name, 64, kw) for name, kw in TIMM.items()]


def zoo_entries() -> list[ZooEntry]:
    """The whole zoo, torchvision first; a library that is not installed is left out."""
    out: list[ZooEntry] = []
    with contextlib.suppress(ImportError):
        out += torchvision_entries()
    try:
        import timm  # noqa: F401
    except ImportError:
        return out
    return out + timm_entries()


def build(entry: ZooEntry, *, seed: int = 0, steps: int = 2) -> nn.Module:
    """``entry``'s model, untrained, in eval mode, with trained-looking BNs: every affine BN
    gets weight ~ U(0.7, 1.3) and bias ~ U(-0.2, 0.2), every conv/linear bias U(-0.1, 0.1), and
    the running statistics are the cumulative average over ``steps`` train-mode passes on
    shifted random inputs (each BN's momentum is restored afterwards). Deterministic given
    ``seed``."""
    torch.manual_seed(seed)
    if entry.lib == "torchvision":
        from torchvision import models

        model = models.get_model(entry.name, weights=None, num_classes=NUM_CLASSES, **entry.kwargs)
    else:
        import timm

        model = timm.create_model(
            entry.name, pretrained=False, num_classes=NUM_CLASSES, **entry.kwargs
        )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.affine:
                m.weight.copy_(0.6 * torch.rand(m.weight.shape, generator=g) + 0.7)
                m.bias.copy_(0.4 * torch.rand(m.bias.shape, generator=g) - 0.2)
            elif isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None:
                m.bias.copy_(0.2 * torch.rand(m.bias.shape, generator=g) - 0.1)
        bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the statistics of the batches seen
        model.train()
        x = entry.example(batch=4, seed=seed + 100)
        for _ in range(steps):
            model(x + 0.5 * torch.randn(x.shape, generator=g) + 0.3)
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
    return model.eval()


def uncalibrated(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose BN running statistics are a fresh model's (mean 0, var 1,
    no batches tracked): the copy the doctor must flag as uncalibrated."""
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            m.reset_running_stats()
    return out.eval()


def bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def fold_check(
    model: nn.Module,
    entry: ZooEntry,
    *,
    with_example: bool,
    reference: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Fold ``model`` (with or without ``entry``'s example input) and judge the result on the
    example and on a held-out input of the same size against
    :func:`normlab.bn.fold.fold_tolerance` (float32: 1e-4 relative to max |y|).

    ``reference``: the original's outputs by input name (``example``, ``holdout``), filled in
    on first use so that several checks share them. Returns ``outcome``: ``exact``;
    ``rounding`` (beyond the float32 tolerance, but the same folds on the float64 model are
    exact to 1e-9: the fold is exact and the model amplifies float32 rounding, as deep
    untrained residual stacks do); ``wrong`` (outputs differ, in float64 too); ``refused``
    (the folder raised a NormlabError, ``reason`` says why). Also ``folded``, ``left``,
    ``rel_error`` (float32), ``seconds`` (the fold call alone) and the ``result``.
    """
    import time

    from normlab.bn.fold import fold_batchnorm_report, fold_tolerance
    from normlab.errors import NormlabError

    inputs = {"example": entry.example(batch=2, seed=1), "holdout": entry.example(batch=3, seed=2)}
    reference = {} if reference is None else reference
    start = time.perf_counter()
    try:
        result = fold_batchnorm_report(model, inputs["example"] if with_example else None)
    except NormlabError as exc:
        return {"outcome": "refused", "reason": str(exc), "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    err = scale = 0.0
    with torch.no_grad():
        for key, x in inputs.items():
            if key not in reference:
                reference[key] = model.eval()(x)
            want, got = reference[key], result.model(x)
            err = max(err, float((want.double() - got.double()).abs().max()))
            scale = max(scale, float(want.abs().max()))
    outcome = "exact" if err <= fold_tolerance(scale, torch.float32) else "wrong"
    if outcome == "wrong" and _exact_in_float64(model, entry, result, with_example):
        outcome = "rounding"
    return {
        "outcome": outcome,
        "folded": len(result.folded),
        "left": len(result.skipped),
        "rel_error": err / max(scale, 1e-12),
        "seconds": seconds,
        "result": result,
    }


def _exact_in_float64(model: nn.Module, entry: ZooEntry, result: Any, with_example: bool) -> bool:
    """Whether folding the float64 copy of ``model`` the same way folds every norm the float32
    fold folded (it may fold more: float32 verification leaves a fold whose rounding, amplified
    by a deep stack, exceeds the tolerance on the example) and leaves outputs equal to 1e-9
    relative on the held-out input: then the math of each float32 fold is exact."""
    from normlab.bn.fold import fold_batchnorm_report

    model64 = copy.deepcopy(model).double()
    example = entry.example(batch=2, seed=1).double()
    folded64 = fold_batchnorm_report(model64, example if with_example else None)
    if not {s.norm for s in result.folded} <= {s.norm for s in folded64.folded}:
        return False
    x = entry.example(batch=3, seed=2).double()
    with torch.no_grad():
        want, got = model64(x), folded64.model(x)
    return float((want - got).abs().max()) <= 1e-9 * max(1.0, float(want.abs().max()))
