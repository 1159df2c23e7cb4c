"""The format of a run's ``predictions.npz``: :class:`Predictions`.

Every validation image's predicted class, by the final model and by the best-epoch model, so
that a report can resample the validation images as well as the seeds, and compare two models
image by image (McNemar's test). A numpy ``.npz`` archive (deflate-compressed; read it with
``numpy.load(path)``, no pickles), holding:

    labels       [N] true class of each validation image, in the validation set's order
    final        [N] class predicted by the model after ``final_epoch``
    final_epoch  0-d int: the last finished epoch
    best         [N] class predicted by the model of ``best_epoch`` (absent when that epoch
                 was trained before normlab kept predictions: an old run resumed)
    best_epoch   0-d int (absent with ``best``)
    num_classes  0-d int
    val_id       0-d str: which images of the source these are
                 (:attr:`normlab.data.DataBundle.val_id`; empty when unknown)

Class arrays are ``uint8`` up to 256 classes, ``uint16`` up to 65,536, else ``int32``: 2,000
validation images take 2 kB per array before compression; the file, labels and both
predictions of 10 classes, about 4.5 kB. The accuracy of ``final`` (``best``)
is exactly the run's ``final/val/acc`` (``best/val/acc``): both count the same argmaxes.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from normlab.errors import NormlabError

_ARRAYS = ("labels", "final", "best")


def class_dtype(num_classes: int) -> np.dtype[Any]:
    """The smallest integer dtype that holds every class index of ``num_classes`` classes."""
    if num_classes <= 2**8:
        return np.dtype(np.uint8)
    if num_classes <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _classes(values: Any, num_classes: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values).astype(class_dtype(num_classes), copy=False).reshape(-1)


@dataclass(frozen=True, eq=False)
class Predictions:
    """One run's per-image validation predictions (see the module docstring)."""

    labels: np.ndarray
    final: np.ndarray
    final_epoch: int
    num_classes: int
    best: np.ndarray | None = None
    best_epoch: int | None = None
    val_id: str = ""

    @classmethod
    def build(
        cls,
        labels: Any,
        final: Any,
        final_epoch: int,
        num_classes: int,
        *,
        best: Any = None,
        best_epoch: int | None = None,
        val_id: str = "",
    ) -> Predictions:
        """From tensors or arrays of class indices, stored in :func:`class_dtype`."""
        return cls(
            labels=_classes(labels, num_classes),
            final=_classes(final, num_classes),
            final_epoch=int(final_epoch),
            num_classes=int(num_classes),
            best=None if best is None else _classes(best, num_classes),
            best_epoch=None if best is None or best_epoch is None else int(best_epoch),
            val_id=val_id,
        )

    def __post_init__(self) -> None:
        n = self.labels.shape
        for name in ("final", "best"):
            arr = getattr(self, name)
            if arr is not None and arr.shape != n:
                raise ValueError(f"predictions: {name} has shape {arr.shape}, labels {n}")
        if (self.best is None) != (self.best_epoch is None):
            raise ValueError("predictions: best and best_epoch go together")

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    def correct(self, which: str) -> np.ndarray | None:
        """Per-image correctness (bool [N]) of the ``"final"`` or ``"best"`` model; None when
        the best-epoch predictions are unknown."""
        pred = {"final": self.final, "best": self.best}[which]
        return None if pred is None else pred == self.labels

    def accuracy(self, which: str) -> float | None:
        """Accuracy as the training loop computes it (correct count / images)."""
        hit = self.correct(which)
        return None if hit is None else int(np.count_nonzero(hit)) / self.n

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {
            "labels": self.labels,
            "final": self.final,
            "final_epoch": np.asarray(self.final_epoch, dtype=np.int64),
            "num_classes": np.asarray(self.num_classes, dtype=np.int64),
            "val_id": np.asarray(self.val_id, dtype=np.str_),
        }
        if self.best is not None:
            arrays["best"] = self.best
            arrays["best_epoch"] = np.asarray(self.best_epoch, dtype=np.int64)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str) -> Predictions:
        """Parse ``predictions.npz``; NormlabError naming ``source`` when it is not one."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                doc = {k: npz[k] for k in npz.files}
            missing = [k for k in ("labels", "final", "final_epoch", "num_classes") if k not in doc]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            for k in _ARRAYS:
                if k in doc and (doc[k].ndim != 1 or doc[k].dtype.kind not in "iu"):
                    raise ValueError(f"{k} is not a 1-d integer array")
            return cls(
                labels=doc["labels"],
                final=doc["final"],
                final_epoch=int(doc["final_epoch"]),
                num_classes=int(doc["num_classes"]),
                best=doc.get("best"),
                best_epoch=int(doc["best_epoch"]) if "best_epoch" in doc else None,
                val_id=str(doc["val_id"]) if "val_id" in doc else "",
            )
        except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise NormlabError(
                f"{source}: not a readable predictions file ({type(exc).__name__}: {exc})"
            ) from None
