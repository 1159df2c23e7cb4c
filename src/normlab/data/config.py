"""What data to train on: :class:`DataConfig` and the ``--data`` spec parser.

A config stores only names, paths and numbers (it is saved with every run); ``build_data``
resolves it into tensors. Every field is validated on construction and a bad value raises
:class:`~normlab.errors.ConfigError` naming the field, e.g.
``data.val_split must be in [0, 1), got 1.5``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from normlab.data.sources import SOURCES
from normlab.errors import ConfigError

MAX_SIDE = 32768
"""Largest image side, synthetic channel count and crop padding, in pixels, a config may ask for
(beyond it tensor sizes overflow before any memory runs out)."""

MAX_SYNTHETIC_BYTES = 2**32
"""Most uint8 bytes a synthetic data set may hold (samples x channels x side x side)."""

SPLIT_SEED_RUN = "run"
"""``data.split_seed``'s value for "each run draws its split with its own seed"."""


def _fail(field: str, expectation: str, value: object) -> None:
    raise ConfigError(f"data.{field} must be {expectation}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DataConfig:
    """Which data set to load and how to split and augment it.

    Splits: with ``val_split == 0`` the source's own test split is the validation set; a
    source without one (``digits``, ``synthetic``, an image folder of plain class folders)
    holds out a stratified 20% of its images instead (:data:`DEFAULT_HOLDOUT`). With
    ``val_split > 0`` that fraction of the *training* split is held out (stratified) and the
    source's test split is not used. Splits and limits are deterministic given the ``seed``
    passed to :func:`~normlab.data.build_data`; which seed a training run passes is
    ``split_seed``'s choice (:meth:`split_seed_for`).

    Augmentation (``augment``): random crops, and horizontal flips only where the source is
    known to be flip-invariant, unless ``flip`` says otherwise.
    """

    name: str = "digits"
    """Source name in :data:`~normlab.data.SOURCES`: digits | cifar10 | imagefolder | synthetic."""
    path: str | None = None
    """cifar10: the official python tarball or its extracted folder, or an image-folder
    tree/tarball (e.g. cifar10-jpeg.tar.gz); None: download (cached). imagefolder: a folder or
    .tar(.gz) with train/ and test/ (or val/) class folders, or just class folders."""
    val_split: float = 0.0
    """Fraction of the training split held out as validation; 0: use the source's test split."""
    augment: bool = True
    """Pad-and-random-crop plus horizontal flip (when ``flip``) on training batches."""
    crop_padding: int = 4
    """Zero padding (pixels per side) before the random crop; 0 disables cropping."""
    flip: bool | None = None
    """Random horizontal flip (p = 0.5) when ``augment`` is on. None: the source's default
    (``Source.flip``: on for cifar10, off for digits, synthetic and imagefolder), decided on
    construction, so a built DataConfig, and a run's ``config.yaml``, always holds true or
    false. (Until normlab chose flips by source, the default was True for every source.)"""
    image_size: int | None = None
    """Resize every image to image_size x image_size (bilinear) when decoding; None: native."""
    limit_train: int | None = None
    """Keep only this many training images (a deterministic, class-stratified subset)."""
    limit_val: int | None = None
    """Keep only this many validation images (a deterministic, class-stratified subset)."""
    synthetic_samples: int = 512
    """synthetic: number of images in all (before the validation hold-out)."""
    synthetic_image_size: int = 32
    synthetic_classes: int = 10
    synthetic_channels: int = 3
    cache_dir: str | None = None
    """Where decoded arrays are cached; None: $NORMLAB_CACHE, else ~/.cache/normlab."""
    split_seed: int | str | None = None
    """Which train/validation split (and ``limit_*`` subsets) a run draws. None: seed 0 for
    every run, the split normlab has always used, so seed-to-seed spread is training noise
    only; an integer >= 0: that split for every run; ``"run"``: the run's own ``seed``, so each
    seed redraws the split (runs with the same seed still share it, so arms stay paired) and
    seed-to-seed spread also covers which images are held out (Bouthillier et al., MLSys
    2021). A source's own test split is fixed whatever the seed: only ``limit_val`` (and the
    training subset) is redrawn from it; set ``val_split`` to redraw the held-out images."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            _fail("name", "a data source name", self.name)
        source = SOURCES.get(self.name)  # ConfigError listing the known names
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            _fail("path", "a non-empty path or null", self.path)
        if self.path is not None and not source.uses_path:
            raise ConfigError(
                f"data.path is not used by the '{self.name}' source, got {self.path!r}"
            )
        if self.path is None and source.requires_path:
            raise ConfigError(
                f"data.path is required for the '{self.name}' source "
                f"(e.g. --data {self.name}:/path/to/images)"
            )
        if self.flip is None:
            object.__setattr__(self, "flip", source.flip)
        v = self.val_split
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1:
            _fail("val_split", "in [0, 1)", v)
        for name in ("augment", "flip"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "true or false", getattr(self, name))
        if not _is_int(self.crop_padding) or self.crop_padding < 0:
            _fail("crop_padding", "an integer >= 0", self.crop_padding)
        if self.crop_padding > MAX_SIDE:
            _fail("crop_padding", f"at most {MAX_SIDE}", self.crop_padding)
        for name in ("image_size", "limit_train", "limit_val"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                _fail(name, "an integer >= 1 or null", value)
        if self.image_size is not None and self.image_size > MAX_SIDE:
            _fail("image_size", f"at most {MAX_SIDE}", self.image_size)
        for name, low, high in (
            ("synthetic_samples", 2, MAX_SYNTHETIC_BYTES),
            ("synthetic_image_size", 1, MAX_SIDE),
            ("synthetic_classes", 2, MAX_SYNTHETIC_BYTES),
            ("synthetic_channels", 1, MAX_SIDE),
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                _fail(name, f"an integer >= {low}", value)
            if value > high:
                _fail(name, f"at most {high}", value)
        size = self.synthetic_samples * self.synthetic_channels * self.synthetic_image_size**2
        if self.name == "synthetic" and size > MAX_SYNTHETIC_BYTES:
            raise ConfigError(
                f"data.synthetic_samples x synthetic_channels x synthetic_image_size^2 is {size} "
                f"bytes of images, more than the {MAX_SYNTHETIC_BYTES} a synthetic data set may "
                "hold"
            )
        if self.synthetic_samples < self.synthetic_classes:
            _fail(
                "synthetic_samples",
                f">= synthetic_classes ({self.synthetic_classes})",
                self.synthetic_samples,
            )
        if isinstance(self.cache_dir, os.PathLike):
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
        if self.cache_dir is not None and (
            not isinstance(self.cache_dir, str) or not self.cache_dir
        ):
            _fail("cache_dir", "a non-empty path or null", self.cache_dir)
        s = self.split_seed
        seed_ok = isinstance(s, int) and not isinstance(s, bool) and s >= 0
        if not (s is None or s == SPLIT_SEED_RUN or seed_ok):
            _fail("split_seed", f"null, an integer >= 0 or {SPLIT_SEED_RUN!r}", s)
        object.__setattr__(self, "val_split", float(v))  # NaN fails the range check above

    def split_seed_for(self, run_seed: int) -> int:
        """The seed :func:`~normlab.data.build_data` draws the split with for a run whose
        ``seed`` is ``run_seed`` (see ``split_seed``)."""
        if self.split_seed is None:
            return 0
        if self.split_seed == SPLIT_SEED_RUN:
            return run_seed
        return int(self.split_seed)


def split_data_spec(spec: str) -> tuple[str, str | None]:
    """A ``--data`` value, ``NAME`` or ``NAME:PATH``, as ``(name, path or None)``.

    Only the first ``:`` separates name from path. ConfigError naming ``--data`` when the name
    or the path after ``:`` is empty; whether the name is a known source is checked by
    :class:`DataConfig`.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"--data must be NAME or NAME:PATH, got {spec!r}")
    name, sep, path = spec.partition(":")
    if not name.strip():
        raise ConfigError(f"--data {spec!r} has no source name before ':' (use NAME or NAME:PATH)")
    if sep and not path.strip():
        raise ConfigError(f"--data {spec!r} has an empty path after ':' (use NAME or NAME:PATH)")
    return name.strip(), path.strip() if sep else None


def parse_data_spec(spec: str, **overrides: Any) -> DataConfig:
    """Parse a ``--data`` value: ``NAME`` or ``NAME:PATH``, plus field overrides.

    Examples: ``"digits"``, ``"synthetic"``, ``"cifar10"``, ``"cifar10:/data/cifar.tar.gz"``,
    ``"imagefolder:/some/dir"``. Only the first ``:`` separates name from path. Overrides whose
    value is None are ignored (the field keeps its default), so a CLI can pass every option.
    """
    name, path = split_data_spec(spec)
    known = {f.name for f in fields(DataConfig)}
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(
            f"unknown data option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    if "name" in given:
        raise ConfigError("give the data source name in the spec, not as an override")
    if path is not None and "path" in given:
        raise ConfigError(f"--data {spec!r} already names a path; do not also override data.path")
    kwargs: dict[str, Any] = {"name": name, **given}
    if path is not None:
        kwargs["path"] = path
    return DataConfig(**kwargs)
