"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# The shared data sets sit beside the repository (see ../shared/datasets/README.md); the
# project must work without them, so tests that need them skip when they are absent.
SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
CIFAR10_JPEG_TARBALL = SHARED_DATASETS / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar_jpeg_tarball() -> Path:
    """Path of the shared CIFAR-10 JPEG tarball; skips the test when it is absent."""
    if not CIFAR10_JPEG_TARBALL.is_file():
        pytest.skip(
            f"shared CIFAR-10 JPEG tarball not found at {CIFAR10_JPEG_TARBALL} "
            "(the ../shared/datasets folder is absent on this machine)"
        )
    return CIFAR10_JPEG_TARBALL


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny-tensor tests (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): as fast as two, and immune to the spin-wait
    slowdown OpenMP threads suffer when other processes compete for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
