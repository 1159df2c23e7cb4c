"""ONNX export of the folded eval model, checked against onnxruntime on the same inputs.

:func:`export_onnx` folds every foldable BN (:func:`~normlab.bn.fold.fold_batchnorm_report`),
exports the folded model in eval mode with PyTorch's TorchScript-based exporter
(``dynamo=False``: it needs only the ``onnx`` package; the batch dimension is dynamic), checks
the file with ``onnx.checker``, runs it with ``onnxruntime`` on the example input and compares
with the PyTorch outputs of the *original* model. The file is written atomically.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from normlab.bn.fold import FoldResult, fold_batchnorm_report
from normlab.bn.graph import eval_mode
from normlab.errors import NormlabError
from normlab.store import atomic_write_bytes

__all__ = ["OPSETS", "ExportResult", "check_opset", "export_onnx"]


def _opsets() -> range:
    """The ONNX opsets this torch's TorchScript exporter writes (7..20 in torch 2.14)."""
    try:
        from torch.onnx import _constants

        low = int(_constants.ONNX_MIN_OPSET)
        high = int(
            getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET)
        )
    except (ImportError, AttributeError):  # pragma: no cover - a torch without the constants
        low, high = 7, 17
    return range(low, high + 1)


OPSETS = _opsets()
"""Opsets :func:`export_onnx` accepts."""


def check_opset(opset: object) -> int:
    """``opset`` if it is in :data:`OPSETS`; NormlabError naming ``--opset`` otherwise."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise NormlabError(
            f"--opset must be an ONNX opset from {OPSETS[0]} to {OPSETS[-1]} (what this torch "
            f"exports), got {opset!r}"
        )
    return opset


def _first_line(exc: BaseException, limit: int = 240) -> str:
    """``"Error: first line"``, cut at ``limit`` characters (the exporter's quote whole graphs)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    line = line if len(line) <= limit else line[:limit] + " ..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how closely onnxruntime reproduces PyTorch."""

    path: Path
    max_abs_error: float
    """max |onnxruntime(x) - original_torch(x)| over all outputs."""
    output_scale: float
    fold: FoldResult | None
    opset: int
    bn_nodes: int
    """BatchNormalization nodes left in the exported graph."""

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "max_abs_error": self.max_abs_error,
            "output_scale": self.output_scale,
            "opset": self.opset,
            "bn_nodes": self.bn_nodes,
            "folded": len(self.fold.folded) if self.fold else 0,
        }


def export_onnx(
    model: nn.Module,
    example_input: Tensor,
    path: str | Path,
    *,
    fold: bool = True,
    opset: int = 17,
    rtol: float = 1e-4,
) -> ExportResult:
    """Export ``model`` (folded, eval mode) to ONNX at ``path`` and check it with onnxruntime.

    Raises :class:`NormlabError` when onnx/onnxruntime are missing, when ``opset`` is not in
    :data:`OPSETS`, when the exporter, the ONNX checker or onnxruntime refuse the model (the
    message names the step and its error), or when onnxruntime's output differs from
    PyTorch's by more than ``rtol * max(1, max|y|)``.
    """
    check_opset(opset)
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise NormlabError(
            "ONNX export needs the onnx and onnxruntime packages (pip install onnx onnxruntime)"
        ) from exc
    path = Path(path)
    fold_result = fold_batchnorm_report(model, example_input) if fold else None
    exported = fold_result.model if fold_result is not None else model
    buffer = io.BytesIO()
    # The exporter, the checker and onnxruntime judge the user's model: their refusals (an op
    # without an ONNX form at this opset, say) are the answer, not a bug here.
    try:
        with eval_mode(exported), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
            torch.onnx.export(
                exported,
                (example_input,),
                buffer,  # type: ignore[arg-type]  # the legacy exporter writes to file objects
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
    except Exception as exc:
        raise NormlabError(
            f"torch.onnx.export cannot export the model at opset {opset} ({_first_line(exc)}); "
            "try another --opset"
        ) from exc
    data = buffer.getvalue()
    try:
        proto = onnx.load_from_string(data)
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise NormlabError(
            f"the exported ONNX model fails onnx.checker ({_first_line(exc)})"
        ) from exc
    bn_nodes = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        x = example_input.detach().cpu().float().numpy()
        got = session.run(None, {session.get_inputs()[0].name: x})
    except Exception as exc:
        raise NormlabError(
            f"onnxruntime cannot run the exported model ({_first_line(exc)})"
        ) from exc
    with eval_mode(model), torch.no_grad():
        want = model(example_input)
    wants = [want] if isinstance(want, Tensor) else list(want)
    if len(got) != len(wants):
        raise NormlabError(f"ONNX model has {len(got)} outputs, PyTorch {len(wants)}")
    err = max(
        float(np.abs(np.asarray(g, dtype=np.float64) - w.detach().double().cpu().numpy()).max())
        for g, w in zip(got, wants, strict=True)
    )
    scale = max(float(w.detach().abs().max()) for w in wants)
    if not err <= rtol * max(1.0, scale):
        raise NormlabError(
            f"onnxruntime's output differs from PyTorch's by {err:.3g} (outputs up to "
            f"{scale:.3g}); not writing {path}"
        )
    atomic_write_bytes(path, data)
    return ExportResult(path, err, scale, fold_result, opset, bn_nodes)
