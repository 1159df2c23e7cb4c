"""Data: whole data sets in memory as uint8, decoded once, augmented in batches.

``build_data(DataConfig(...), seed)`` returns a :class:`DataBundle` (uint8 train/val tensors,
class names, per-channel mean/std); :class:`BatchLoader` turns one split into normalised,
augmented float batches. There is no per-epoch decoding and there are no worker processes.

Sources (:data:`SOURCES`): ``digits`` (default, offline), ``cifar10``, ``imagefolder``,
``synthetic``; see :mod:`normlab.data.sources`. Decoded arrays are cached outside the
repository (``$NORMLAB_CACHE``, default ``~/.cache/normlab``), keyed by the content of the
source; see :mod:`normlab.data.cache` for the key and the file format.

Measured on the 2-core CPU development machine (shared, so timings vary by ~30%), for the
CIFAR-10 JPEG tarball (60,000 images): cold decode 8.4-11 s with 2 forked decode workers
(10.5-14.5 s in one process; ~2-4 s of it is reading the tar), warm load from the cache
0.45-0.9 s (hash the 20 MB tarball, read and checksum 184 MB, split, statistics); from an
extracted folder a warm load takes ~2 s (every file is read to hash it). Augmentation +
normalisation of a 50k-image epoch at batch 128: ~0.22 s (``benchmarks/data_augment.py``).
"""

from normlab.data.bundle import DEFAULT_HOLDOUT, DataBundle, build_data, channel_stats
from normlab.data.config import SPLIT_SEED_RUN, DataConfig, parse_data_spec, split_data_spec
from normlab.data.loader import BatchLoader
from normlab.data.sources import CIFAR10_CLASSES, SOURCES, RawData, Source, describe_flip

__all__ = [
    "CIFAR10_CLASSES",
    "DEFAULT_HOLDOUT",
    "SOURCES",
    "SPLIT_SEED_RUN",
    "BatchLoader",
    "DataBundle",
    "DataConfig",
    "RawData",
    "Source",
    "build_data",
    "channel_stats",
    "describe_flip",
    "parse_data_spec",
    "split_data_spec",
]
