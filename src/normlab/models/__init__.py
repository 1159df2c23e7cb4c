"""Architectures with pluggable normalization and placement, built by name.

``build_model("resnet50", 1000, norm="gn", placement="post")``; ``list_models()`` lists what is
registered (mobilenetv2, resnet18, resnet50, resnet20/32/44/56/110, mlp) with their options.
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
    register_model,
)
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
    "list_models",
    "lsuv_init",
    "register_model",
    "zero_init_last_norms",
]
