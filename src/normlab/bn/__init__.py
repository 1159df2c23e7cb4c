"""The BN toolbox for any PyTorch model: doctor, fold, recalibrate, convert, export.

Python API (each also a ``normlab`` subcommand, see :mod:`normlab.cli.bn`):

* :func:`diagnose` (``normlab doctor``): find normalization defects; returns a :class:`Report`
  of :class:`Finding` s with stable ids (the table: ``docs/doctor_checks.md``, generated from
  the check registry :mod:`normlab.bn.checks`).
* :func:`fold_batchnorm` / :func:`fold_batchnorm_report` (``normlab fold``): fold BN into the
  preceding or next conv/linear, exactly, verified on an example input.
* :func:`recalibrate_batchnorm` (``normlab recalibrate``): precise BN population statistics.
* :func:`keras_to_torch_conventions`, :func:`sync_to_batchnorm`, :func:`to_frozen_batchnorm`,
  :func:`remove_bias_before_bn` (``normlab convert``): exact conversions; :func:`reduce_ranks`
  (``normlab convert --op reduce-ranks``): average per-rank BN statistics into one state_dict.
* :func:`diagnose_rank_set` (``normlab doctor A B ...``, or a run directory with per-rank BN
  buffers): ranks whose BN statistics or parameters disagree.
* :func:`export_onnx` (``normlab export``): ONNX of the folded model, checked with onnxruntime.
* :func:`read_keras`, :func:`read_onnx`, :func:`load_target`: read models from files.

Submodules are imported lazily (``import normlab.bn`` does not import onnx or h5py), except
:mod:`normlab.bn.diagnose`: its function :func:`diagnose` shares the module's name, so it is
bound here eagerly and ``normlab.bn.diagnose`` is the function (the module stays importable as
``from normlab.bn.diagnose import CHECKS``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from normlab.bn.convert import (
        keras_to_torch_conventions,
        reduce_ranks,
        remove_bias_before_bn,
        sync_to_batchnorm,
        to_frozen_batchnorm,
    )
    from normlab.bn.export import export_onnx
    from normlab.bn.fold import FoldResult, fold_batchnorm, fold_batchnorm_report
    from normlab.bn.keras_file import read_keras
    from normlab.bn.load import load_target
    from normlab.bn.onnx_file import read_onnx
    from normlab.bn.recalibrate import RecalibrationResult, recalibrate_batchnorm

from normlab.bn.diagnose import Finding, Report, diagnose, diagnose_layers, diagnose_rank_set

_LAZY = {
    "fold_batchnorm": "normlab.bn.fold",
    "fold_batchnorm_report": "normlab.bn.fold",
    "FoldResult": "normlab.bn.fold",
    "recalibrate_batchnorm": "normlab.bn.recalibrate",
    "RecalibrationResult": "normlab.bn.recalibrate",
    "keras_to_torch_conventions": "normlab.bn.convert",
    "sync_to_batchnorm": "normlab.bn.convert",
    "reduce_ranks": "normlab.bn.convert",
    "to_frozen_batchnorm": "normlab.bn.convert",
    "remove_bias_before_bn": "normlab.bn.convert",
    "export_onnx": "normlab.bn.export",
    "read_keras": "normlab.bn.keras_file",
    "read_onnx": "normlab.bn.onnx_file",
    "load_target": "normlab.bn.load",
}

__all__ = [
    "Finding",
    "FoldResult",
    "RecalibrationResult",
    "Report",
    "diagnose",
    "diagnose_layers",
    "diagnose_rank_set",
    "export_onnx",
    "fold_batchnorm",
    "fold_batchnorm_report",
    "keras_to_torch_conventions",
    "load_target",
    "read_keras",
    "read_onnx",
    "recalibrate_batchnorm",
    "reduce_ranks",
    "remove_bias_before_bn",
    "sync_to_batchnorm",
    "to_frozen_batchnorm",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'normlab.bn' has no attribute {name!r}")
