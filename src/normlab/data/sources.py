"""Data sources: each turns a :class:`DataConfig` into uint8 arrays (:class:`RawData`).

Register a new source with ``SOURCES.register("name", Source(load=fn, uses_path=True))``;
``fn(cfg)`` returns :class:`RawData` (use :func:`cached` to decode once). A source also says
whether training images are flipped by default (``Source.flip``, with the reason a run's first
line shows): only sources known to be natural photographs are, because a horizontal flip is an
augmentation only where a mirrored image is still an image of its class. Built in:

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, grey levels 0..16) scaled to
  0..255 and upsampled to 32x32 (or ``image_size``) with a bilinear filter in float; 1 channel.
  No test split. Works offline on a fresh machine. Flip off: a mirrored digit is another shape.
- ``synthetic``: deterministic noise around a smooth per-class pattern (learnable); no test
  split. Generated, never cached. Flip off: the patterns are not mirror-symmetric.
- ``cifar10``: the official python tarball (or its extracted folder) or an image-folder tree or
  tarball (e.g. the JPEG copy); with no path, the official tarball is downloaded once into
  ``<cache>/downloads`` (md5-checked). Flip on: natural photographs.
- ``imagefolder``: any class-per-folder tree (see :mod:`normlab.data.tree`). Flip off: normlab
  cannot know what the images show (``data.flip: true`` for photographs).
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import logging
import os
import pickle
import posixpath
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image

from normlab.data.cache import cache_key, load_or_build, resolve_cache_dir
from normlab.data.tree import FileTree, SourceInput, decode_tree
from normlab.errors import ConfigError, DataError
from normlab.registry import Registry

if TYPE_CHECKING:  # sources read a DataConfig's fields; DataConfig checks names against SOURCES
    from normlab.data.config import DataConfig

log = logging.getLogger("normlab.data")


@dataclass(frozen=True)
class RawData:
    """A decoded source: uint8 ``[N, C, H, W]`` images and int64 labels, per split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    class_names: tuple[str, ...]
    source_hash: str  # content hash of the source (see normlab.data.cache)
    from_cache: bool = False


@dataclass(frozen=True)
class Source:
    """A registered data source."""

    load: Callable[[DataConfig], RawData]
    uses_path: bool = False  # data.path is meaningful for this source
    requires_path: bool = False  # data.path must be given
    description: str = ""
    flip: bool = False
    """``data.flip``'s default: True only for data known to keep its class under a horizontal
    mirror (natural photographs); a source that cannot know that leaves flips off."""
    flip_reason: str = "not known to be flip-invariant"
    """Why ``flip`` is what it is, in a few words (a run's first line shows it)."""


SOURCES: Registry[Source] = Registry("data source")


def describe_flip(cfg: DataConfig) -> str:
    """Whether ``cfg``'s training batches are flipped, and why, as a run's first line shows it:
    ``flip=off (digits: handwritten digits: ...)``, ``flip=on (data.flip; the digits default is
    off)``, ``flip=off (data.augment is off)``."""
    source = SOURCES.get(cfg.name)
    if not cfg.augment:
        return "flip=off (data.augment is off)"
    state = "on" if cfg.flip else "off"
    if cfg.flip == source.flip:
        return f"flip={state} ({cfg.name}: {source.flip_reason})"
    return f"flip={state} (data.flip; the {cfg.name} default is {'on' if source.flip else 'off'})"


def cached(
    cfg: DataConfig,
    source: str,
    content_hash: str,
    options: dict[str, Any],
    decode: Callable[[], tuple[dict[str, np.ndarray], tuple[str, ...]]],
) -> RawData:
    """Load ``source`` from the cache, or run ``decode()`` (arrays, class names) and cache it.

    ``options`` are the decoding options that change the arrays; they are part of the key.
    """

    def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        t0 = time.perf_counter()
        log.info("data: decoding %s (not in cache) ...", source)
        arrays, class_names = decode()
        log.info("data: decoded %s in %.1f s", source, time.perf_counter() - t0)
        return arrays, {"class_names": list(class_names), "source_hash": content_hash}

    cache_dir = resolve_cache_dir(cfg.cache_dir)
    key = cache_key(source, content_hash, **options)
    arrays, meta, hit = load_or_build(cache_dir, source, key, build)
    return RawData(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"],
        test_images=arrays.get("test_images"),
        test_labels=arrays.get("test_labels"),
        class_names=tuple(meta["class_names"]),
        source_hash=content_hash,
        from_cache=hit,
    )


def _resize_float(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of one float32 [H, W] plane (PIL's filter, as used for decoded images)."""
    im = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32))
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def _resize_uint8_chw(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of uint8 [N, C, H, W] images (as PIL does on decode): RGB images as
    such, any other channel count one plane at a time (PIL would treat 2 or 4 as alpha)."""
    n, c = images.shape[:2]
    out = np.empty((n, c, size, size), dtype=np.uint8)
    for i in range(n):
        if c == 3:
            im = Image.fromarray(np.ascontiguousarray(images[i].transpose(1, 2, 0)))
            out[i] = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR)).transpose(
                2, 0, 1
            )
            continue
        for j in range(c):
            im = Image.fromarray(np.ascontiguousarray(images[i, j]))
            out[i, j] = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))
    return out


# ---- digits ------------------------------------------------------------------------------

DIGITS_SIZE = 32


def _decode_digits(
    images: np.ndarray, labels: np.ndarray, size: int
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    out = np.empty((len(images), 1, size, size), dtype=np.uint8)
    for i, img in enumerate(images):
        up = _resize_float(img * (255.0 / 16.0), size)  # grey levels 0..16 -> 0..255
        out[i, 0] = np.clip(np.rint(up), 0, 255)
    return {"train_images": out, "train_labels": labels}, tuple(str(d) for d in range(10))


def _load_digits(cfg: DataConfig) -> RawData:
    from sklearn.datasets import load_digits  # late: importing sklearn takes ~1 s

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)  # [1797, 8, 8], values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    content = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    size = cfg.image_size or DIGITS_SIZE
    return cached(
        cfg, "digits", content, {"image_size": size}, lambda: _decode_digits(images, labels, size)
    )


SOURCES.register(
    "digits",
    Source(
        _load_digits,
        description="scikit-learn 8x8 digits upsampled to 32x32, 1 channel",
        flip_reason="handwritten digits: a mirrored digit is another shape",
    ),
)


# ---- synthetic ---------------------------------------------------------------------------

SYNTHETIC_SEED = 20240601  # fixed: the data are a function of the config only
_SYNTHETIC_VERSION = 1


def _load_synthetic(cfg: DataConfig) -> RawData:
    """Each class has a smooth random pattern (4x4 control points, bilinear); images are that
    pattern plus Gaussian pixel noise (sd ~30 grey levels), so a small CNN can learn them.

    Not flip-invariant, so flips are off by default: the control points are drawn independently,
    so a class pattern is not mirror-symmetric, and a mirrored image is that pattern's mirror
    image plus noise, which no class generates (no validation image is ever mirrored)."""
    n, k = cfg.synthetic_samples, cfg.synthetic_classes
    c, s = cfg.synthetic_channels, cfg.synthetic_image_size
    params = {"v": _SYNTHETIC_VERSION, "n": n, "k": k, "c": c, "s": cfg.image_size or s}
    content = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    rng = np.random.default_rng(SYNTHETIC_SEED)
    labels = rng.permutation(np.arange(n) % k).astype(np.int64)  # balanced classes
    control = rng.uniform(0.0, 1.0, size=(k, c, 4, 4)).astype(np.float32)
    pattern = np.stack([[_resize_float(control[i, j], s) for j in range(c)] for i in range(k)])
    images = np.empty((n, c, s, s), dtype=np.uint8)
    for start in range(0, n, 4096):  # bounded float memory for large n
        lab = labels[start : start + 4096]
        noise = rng.standard_normal((len(lab), c, s, s), dtype=np.float32)
        x = 40.0 + 175.0 * pattern[lab] + 30.0 * noise
        images[start : start + len(lab)] = np.clip(np.rint(x), 0, 255)
    if cfg.image_size is not None and cfg.image_size != s:
        images = _resize_uint8_chw(images, cfg.image_size)
    return RawData(images, labels, None, None, tuple(f"class{i}" for i in range(k)), content)


SOURCES.register(
    "synthetic",
    Source(
        _load_synthetic,
        description="deterministic learnable random images (tests)",
        flip_reason="random class patterns are not mirror-symmetric",
    ),
)


# ---- cifar10 -----------------------------------------------------------------------------

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
DOWNLOAD_TIMEOUT_S = 15.0  # per socket operation; offline machines fail fast, not hang
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_PASS_A_PATH = (
    "pass a local copy instead, e.g. --data cifar10:/path/to/cifar-10-python.tar.gz (the "
    "official python version, or its extracted folder) or an image-folder tarball such as "
    "--data cifar10:/path/to/cifar10-jpeg.tar.gz"
)


def _download_cifar10(cache_dir: Path) -> Path:
    """The official tarball under ``<cache>/downloads``, downloading it (md5-checked) if absent."""
    target = cache_dir / "downloads" / CIFAR10_TARBALL
    if target.is_file():
        return target
    log.info("data: downloading %s -> %s", CIFAR10_URL, target)
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        md5 = hashlib.md5()
        with (
            os.fdopen(fd, "wb") as f,
            urllib.request.urlopen(CIFAR10_URL, timeout=DOWNLOAD_TIMEOUT_S) as response,
        ):
            while block := response.read(1 << 20):
                md5.update(block)
                f.write(block)
        if md5.hexdigest() != CIFAR10_MD5:
            raise DataError(
                f"downloaded {CIFAR10_URL} has md5 {md5.hexdigest()}, expected {CIFAR10_MD5}; "
                f"{_PASS_A_PATH}"
            )
        os.replace(tmp, target)
        tmp = None
    except DataError:
        raise
    except (OSError, ValueError) as exc:  # URLError, timeouts and HTTP errors are OSErrors
        raise DataError(
            f"cifar10: no path given and downloading {CIFAR10_URL} failed "
            f"({type(exc).__name__}: {exc}); {_PASS_A_PATH}"
        ) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return target


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of lists and numpy arrays) and nothing else: a
    pickle naming any other callable is refused instead of executed."""

    _allowed: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray((0,)).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray((0,)).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how Python 3 pickles bytes with protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _read_batch(tree: FileTree, rel: str) -> tuple[np.ndarray, np.ndarray]:
    where = tree.display(rel)
    try:
        batch = _ArrayUnpickler(io.BytesIO(tree.files[rel]), encoding="bytes").load()
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:
        raise DataError(
            f"cannot read CIFAR-10 batch {where}: {type(exc).__name__}: {exc}"
        ) from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: expected uint8 data of shape [N, 3072], got {data.shape}")
    if labels.shape != (len(data),) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataError(f"{where}: expected {len(data)} labels in 0..9")
    return data.reshape(-1, 3, 32, 32), labels  # rows are R(1024) G(1024) B(1024), row-major


def _decode_cifar_pickles(
    tree: FileTree, image_size: int | None
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    by_name = {posixpath.basename(rel): rel for rel in tree.files}
    missing = [n for n in (*_TRAIN_BATCHES, "test_batch") if n not in by_name]
    if missing:
        raise DataError(
            f"{tree.label} looks like the official CIFAR-10 python version but lacks "
            f"{', '.join(missing)}"
        )
    train = [_read_batch(tree, by_name[n]) for n in _TRAIN_BATCHES]
    test_images, test_labels = _read_batch(tree, by_name["test_batch"])
    out = {
        "train_images": np.concatenate([b[0] for b in train]),
        "train_labels": np.concatenate([b[1] for b in train]),
        "test_images": np.ascontiguousarray(test_images),
        "test_labels": test_labels,
    }
    if image_size is not None and image_size != 32:
        for split in ("train", "test"):
            out[f"{split}_images"] = _resize_uint8_chw(out[f"{split}_images"], image_size)
    return out, CIFAR10_CLASSES


def _decode_cifar10(
    src: SourceInput, image_size: int | None
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    tree = src.tree()
    if any(posixpath.basename(rel) == "data_batch_1" for rel in tree.files):
        return _decode_cifar_pickles(tree, image_size)
    arrays, class_names = decode_tree(tree, image_size)
    if class_names != CIFAR10_CLASSES:
        raise DataError(
            f"{src.label} is an image folder whose classes ({', '.join(class_names)}) are not "
            f"the CIFAR-10 classes ({', '.join(CIFAR10_CLASSES)}); use --data imagefolder:"
            f"{src.label} for other data"
        )
    return arrays, class_names


def _load_cifar10(cfg: DataConfig) -> RawData:
    path = cfg.path if cfg.path is not None else _download_cifar10(resolve_cache_dir(cfg.cache_dir))
    src = SourceInput(path, "cifar10")
    return cached(
        cfg,
        "cifar10",
        src.content_hash,
        {"image_size": cfg.image_size},
        lambda: _decode_cifar10(src, cfg.image_size),
    )


SOURCES.register(
    "cifar10",
    Source(
        _load_cifar10,
        uses_path=True,
        description="CIFAR-10: official python tarball/folder or an image-folder tree/tarball",
        flip=True,
        flip_reason="natural photographs: a mirror image shows the same object",
    ),
)


# ---- imagefolder -------------------------------------------------------------------------


def _load_imagefolder(cfg: DataConfig) -> RawData:
    if cfg.path is None:  # DataConfig already refuses this; kept for direct callers
        raise ConfigError("data.path is required for the 'imagefolder' source")
    src = SourceInput(cfg.path, "imagefolder")
    return cached(
        cfg,
        "imagefolder",
        src.content_hash,
        {"image_size": cfg.image_size},
        lambda: decode_tree(src.tree(), cfg.image_size),
    )


SOURCES.register(
    "imagefolder",
    Source(
        _load_imagefolder,
        uses_path=True,
        requires_path=True,
        description="class-per-folder images (dir or tarball), optional train/ test/ splits",
        flip_reason="not known to be flip-invariant; data.flip=true for photographs",
    ),
)
