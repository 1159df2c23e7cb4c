"""Architectures with pluggable normalization and placement, built by name.

``build_model("resnet50", 1000, norm="gn", placement="post")``; ``list_models()`` lists what is
registered (mobilenetv2, resnet18, resnet50, resnet20/32/44/56/110, mlp) with their options.
Third-party architectures are named ``torchvision:NAME``, ``timm:NAME`` or ``module:callable``
and get the norm axis and XBNBlock by module replacement (:mod:`normlab.models.external`).
``lsuv_init(model, batch)`` gives any model (normlab's or not) a data-dependent init for
training without normalization layers.
"""

from normlab.models import mlp, mobilenetv2, resnet  # noqa: F401  (register the architectures)
from normlab.models.blocks import (
    PLACEMENTS,
    BuildContext,
    ConvNormAct,
    init_weights,
    zero_init_last_norms,
)
from normlab.models.build import (
    MODELS,
    ModelEntry,
    build_model,
    check_model_options,
    list_models,
    model_entry,
    register_model,
)
from normlab.models.external import is_external
from normlab.models.lsuv import LsuvLayer, lsuv_init

__all__ = [
    "MODELS",
    "PLACEMENTS",
    "BuildContext",
    "ConvNormAct",
    "LsuvLayer",
    "ModelEntry",
    "build_model",
    "check_model_options",
    "init_weights",
    "is_external",
    "list_models",
    "lsuv_init",
    "model_entry",
    "register_model",
    "zero_init_last_norms",
]
