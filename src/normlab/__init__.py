"""normlab: rigorous experiments on normalization in CNNs, and a BatchNorm toolbox.

The Python API mirrors the command line: ``build_model`` builds any registered network with
any normalization and placement, ``fit`` trains a :class:`TrainConfig` into a run directory,
``compare`` judges a long table of runs from any framework by a study report's rule,
``Instruments`` attaches the probes to any model in any training loop.
Submodules are imported lazily so that ``import normlab`` stays cheap.

Layout, from the ground up; a package imports only those below it (enforced, function-level
imports included, by the import-linter contracts in ``pyproject.toml``, run by
``tests/test_layers.py``):

* ``errors``, then ``registry`` and ``yamlio`` — the ground: user-facing exceptions; name ->
  object registries; YAML read and written the one way (``1e-3`` is a number).
* ``norms`` — normalization layers and the norm factory (``NormSpec``).
* ``data`` — data sources, decoding, the cache, in-memory batched loading.
* ``models`` — the architectures, built from a norm and a placement; LSUV.
* ``config`` — the typed, frozen ``TrainConfig`` (it stores names; it resolves none above it).
* ``store`` — a run directory and its formats: config.yaml with provenance, the checkpoint
  schema, summary/status, per-rank buffers; rebuilding a run's model; the resume check.
* ``engine`` — the training loop's parts: runtime, distributed, optimizer/schedule, the
  callback contract and ``FitState``, evaluation.
* ``probes`` — instruments; they are callbacks, so they sit on the engine, below the loop.
* ``train`` — the loop (``fit``), its setup, and ``resolve_names`` (names checked at the edge).
* ``bn`` — the BatchNorm toolbox (doctor, fold, recalibrate, convert, export); it reads run
  directories through ``store`` and uses the probes' statistics.
* ``study`` — specs, plans, executors, the runner (it trains through ``train``).
* ``report`` — reads study directories and judges them; the runner never imports it.
* ``integrations`` — the instruments inside other frameworks (the Lightning callback); each
  needs its optional extra; above the toolbox, whose doctor the callback runs.
* ``cli`` — every command; the only place that composes "run a study, then report".

Why this order: data flows config -> data -> model -> fit (callbacks/probes) -> run store ->
report, and each arrow's consumer sits above its producer. The two places that invert the
obvious order are deliberate: ``store`` sits above ``config``/``models`` because it rebuilds a
run's model from its config, and the probes sit below ``train`` because the loop builds them
from the config's names while they only need the engine's callback contract.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "build_model": ("normlab.models", "build_model"),
    "fit": ("normlab.train", "fit"),
    "TrainConfig": ("normlab.config", "TrainConfig"),
    "compare": ("normlab.report.compare", "compare_table"),
    "Instruments": ("normlab.probes", "Instruments"),
}

__all__ = ["Instruments", "TrainConfig", "__version__", "build_model", "compare", "fit"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'normlab' has no attribute {name!r}")
