"""``build_data``: a config -> the train and validation tensors, split and described.

Splitting and limiting are deterministic functions of the labels and ``seed`` (numpy PCG64
streams, independent of torch's global RNG), so the same config and seed give the same images
on every machine. Pass the same seed to keep the split fixed across runs that differ in
something else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from normlab.data.config import DataConfig
from normlab.data.sources import SOURCES
from normlab.errors import ConfigError, DataError

DEFAULT_HOLDOUT = 0.2  # held out as validation when val_split == 0 and there is no test split

# Independent random streams per purpose, so changing one option does not move the others.
_STREAM_SPLIT, _STREAM_LIMIT_TRAIN, _STREAM_LIMIT_VAL = 1, 2, 3


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(kept, held_out)``, both sorted, holding out ``fraction`` per class.

    ``round(fraction * n)`` images are held out in all, shared among classes by largest
    remainder (each class gets ``floor(fraction * n_c)`` or one more; ties broken at random),
    so even tiny data sets get a validation set; a class always keeps one training image.
    """
    rng = np.random.default_rng([seed, _STREAM_SPLIT])
    classes, counts = np.unique(labels, return_counts=True)
    exact = fraction * counts
    take = np.floor(exact).astype(np.int64)
    extra = int(np.floor(fraction * len(labels) + 0.5)) - int(take.sum())
    by_remainder = np.lexsort((rng.permutation(len(classes)), -(exact - take)))
    take[by_remainder[: max(extra, 0)]] += 1
    take = np.minimum(take, counts - 1)
    held = [
        rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)
    ]
    held_out = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_out] = False
    return np.flatnonzero(mask), held_out


def stratified_order(labels: np.ndarray, seed: int, stream: int = 0) -> np.ndarray:
    """A random permutation of ``range(len(labels))`` whose every prefix is class-balanced.

    The k-th of a class's n_c members (in random order) gets the key ``(k + 0.5) / n_c``;
    sorting by key (random tie-break) interleaves classes in proportion to their sizes, so the
    first N indices hold each class ``N * n_c / n`` times, up to rounding.
    """
    rng = np.random.default_rng([seed, stream])
    key = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        key[rng.permutation(idx)] = (np.arange(len(idx)) + 0.5) / len(idx)
    return np.lexsort((rng.permutation(len(labels)), key))


def _limit(
    idx: np.ndarray, labels: np.ndarray, limit: int | None, seed: int, stream: int, field: str
) -> np.ndarray:
    if limit is None:
        return idx
    if limit > len(idx):
        raise ConfigError(f"data.{field}={limit} exceeds the {len(idx)} images available")
    chosen = idx[stratified_order(labels[idx], seed, stream)[:limit]]
    return np.sort(chosen)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (biased: divided by the count) of uint8 ``[N, C, H, W]``
    images in [0, 1] units. Exact: computed in float64 from a 256-bin histogram per channel."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1).cpu(), minlength=256).to(torch.float64)
        mean = (hist * levels).sum() / hist.sum()
        var = (hist * (levels - mean) ** 2).sum() / hist.sum()
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)


@dataclass(frozen=True, eq=False)
class DataBundle:
    """Train and validation images in memory, with what a model and a loader need to know.

    Images are uint8 ``[N, C, H, W]`` (contiguous), labels int64 ``[N]``. ``mean`` and ``std``
    are per channel in [0, 1] units over the training images actually used (std biased); the
    loader normalises with ``(x / 255 - mean) / std``. ``val_id`` names which images of the
    source form the validation set, in order (:func:`validation_id`; empty for a bundle not
    made by :func:`build_data`): two runs with equal ids evaluated the same images.
    """

    name: str
    source_hash: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_id: str = ""

    def __post_init__(self) -> None:
        for split in ("train", "val"):
            x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise DataError(
                    f"{split}_images must be uint8 [N, C, H, W], got {x.dtype} {x.shape}"
                )
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise DataError(f"{split}_labels must be int64 [{x.shape[0]}], got {y.shape}")
        if self.val_images.shape[1:] != self.train_images.shape[1:]:
            raise DataError("train and val images differ in shape")
        if len(self.class_names) != self.num_classes:
            raise DataError("class_names and num_classes disagree")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError("mean/std need one value per channel")

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def height(self) -> int:
        return int(self.train_images.shape[2])

    @property
    def width(self) -> int:
        return int(self.train_images.shape[3])

    @property
    def image_size(self) -> int:
        """Side of the (square) images; raises for non-square ones (use height and width)."""
        if self.height != self.width:
            raise DataError(
                f"{self.name} images are {self.height}x{self.width}, not square; set "
                "data.image_size to resize them"
            )
        return self.height

    def describe(self) -> dict[str, Any]:
        """A JSON-safe summary for run records."""
        return {
            "name": self.name,
            "source_hash": self.source_hash,
            "train": int(self.train_labels.numel()),
            "val": int(self.val_labels.numel()),
            "shape": [self.channels, self.height, self.width],
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "mean": list(self.mean),
            "std": list(self.std),
        }


def _take(array: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    """``array[idx]`` as a contiguous tensor; no copy when ``idx`` is everything, in order."""
    if len(idx) == len(array) and np.array_equal(idx, np.arange(len(array))):
        array = np.ascontiguousarray(array)
    else:
        array = array[idx]
    if not array.flags.writeable:  # torch warns on read-only buffers
        array = array.copy()
    return torch.from_numpy(array)


def validation_id(source_hash: str, pool: str, idx: np.ndarray) -> str:
    """A short digest naming the validation images: the source (its content hash), the pool
    they come from (``"test"``, or ``"train"`` for a held-out part of the training split) and
    their indices in that pool, in order. Equal ids: the same images in the same order."""
    h = hashlib.sha256(f"{source_hash}\0{pool}\0".encode())
    h.update(np.ascontiguousarray(idx, dtype="<i8").tobytes())
    return h.hexdigest()[:16]


def build_data(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Load (decode once, then from the cache), split, limit and describe a data set.

    Validation set: with ``cfg.val_split > 0``, that stratified fraction of the training split;
    else the source's test split; else (no test split) a stratified ``DEFAULT_HOLDOUT`` (20%)
    of the training split. ``limit_train`` / ``limit_val`` then keep a class-stratified subset.
    """
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"build_data expects a DataConfig, got {type(cfg).__name__}")
    raw = SOURCES.get(cfg.name).load(cfg)
    labels = raw.train_labels
    if cfg.val_split > 0 or raw.test_images is None:
        fraction = cfg.val_split if cfg.val_split > 0 else DEFAULT_HOLDOUT
        train_idx, val_idx = stratified_split(labels, fraction, seed)
        val_images, val_labels, pool = raw.train_images, labels, "train"
    else:
        assert raw.test_labels is not None
        train_idx = np.arange(len(labels))
        val_images, val_labels, pool = raw.test_images, raw.test_labels, "test"
        val_idx = np.arange(len(val_labels))
    train_idx = _limit(train_idx, labels, cfg.limit_train, seed, _STREAM_LIMIT_TRAIN, "limit_train")
    val_idx = _limit(val_idx, val_labels, cfg.limit_val, seed, _STREAM_LIMIT_VAL, "limit_val")
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise DataError(
            f"{cfg.name}: the split leaves {len(train_idx)} training and {len(val_idx)} "
            f"validation images (of {len(labels)}); raise data.val_split or use more data"
        )
    train_images = _take(raw.train_images, train_idx)
    mean, std = channel_stats(train_images)
    return DataBundle(
        name=cfg.name,
        source_hash=raw.source_hash,
        train_images=train_images,
        train_labels=_take(labels, train_idx),
        val_images=_take(val_images, val_idx),
        val_labels=_take(val_labels, val_idx),
        num_classes=len(raw.class_names),
        class_names=raw.class_names,
        mean=mean,
        std=std,
        val_id=validation_id(raw.source_hash, pool, val_idx),
    )
