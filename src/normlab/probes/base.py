"""The probe base class, probe specs (``shift:batches=8``) and fixed data samples.

A probe adds metric keys to each epoch's row. It reads the training it observes through a
:class:`~normlab.probes.context.ProbeContext` (model, seed, batch sizes, autocast, learning
rate, fixed samples) in two methods, :meth:`Probe.start` (once, before training) and
:meth:`Probe.measure` (at each epoch's end); it is also a :class:`~normlab.train.Callback`,
whose ``on_fit_start`` / ``on_epoch_end`` call those with a
:class:`~normlab.probes.context.FitContext`, so normlab's ``fit`` and anyone's loop
(:class:`normlab.probes.Instruments`) run the same code. Every probe guarantees, and the tests
check, that it

* leaves the model as it found it: parameters, running buffers (restored bit for bit),
  train/eval flags, and no hooks left behind (removed in ``finally``);
* draws no random numbers from the global generators or the training loaders' generator: the
  data samples it looks at are chosen once, in :meth:`Probe.start`, with its own
  ``torch.Generator`` seeded from the run's seed, and are the same every epoch and on resume;
  and every call runs inside :func:`~normlab.probes.rng.preserved_random_state`, so even a
  model that draws in eval mode leaves them as they were. So a run with probes trains exactly
  like the same run without them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from normlab.engine.callbacks import Callback
from normlab.errors import ConfigError
from normlab.probes.context import Batches, FitContext, ProbeContext, probe_generator
from normlab.probes.rng import preserved_random_state

if TYPE_CHECKING:
    from normlab.engine.state import FitState

__all__ = [
    "Option",
    "Probe",
    "parse_probe_spec",
    "probe_generator",
    "sample_loader",
    "training_batches",
]

Option = tuple[type, object, int | None, str]
"""An option declaration: (type: int | float | bool | str, default, minimum or None, help)."""

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class Probe(Callback):
    """Base class of the probes: a callback with a registered ``name`` and typed options.

    Subclasses declare ``OPTIONS = {"batches": (int, 16, 1, "help"), ...}``; the constructor
    takes them as keyword arguments (``ShiftProbe(batches=8)``) and validates them, raising
    :class:`ConfigError` that names the probe and the option.
    """

    name: ClassVar[str] = ""
    OPTIONS: ClassVar[dict[str, Option]] = {}
    observes_only: ClassVar[bool] = True  # start() records references; it changes nothing
    NEEDS_DATA: ClassVar[bool] = True
    """Whether the probe forwards samples of the data (all but ``bn`` do)."""
    VALIDATES: ClassVar[bool] = False
    """Whether the probe evaluates on the validation split (``shift``): then it measures only
    at the epochs that validate (``TrainConfig.eval_every``), the others every epoch."""

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            known = ", ".join(sorted(self.OPTIONS)) or "(none)"
            raise ConfigError(
                f"probes: probe '{self.name}' has no option {', '.join(map(repr, unknown))}; "
                f"known options: {known}"
            )
        self.options: dict[str, Any] = {}
        for key, (tp, default, minimum, _help) in self.OPTIONS.items():
            value = options.get(key, default)
            self.options[key] = self._check(key, value, tp, default, minimum)

    def _check(
        self, key: str, value: object, tp: type, default: object, minimum: int | None
    ) -> Any:
        where = f"probes: option {key} of probe '{self.name}'"
        if value is None and default is None:
            return None
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where} must be an integer, got {value!r}")
        elif tp is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{where} must be a number, got {value!r}")
            value = float(value)
        elif tp is str and (not isinstance(value, str) or not value):
            raise ConfigError(f"{where} must be a non-empty string, got {value!r}")
        if minimum is not None and isinstance(value, int | float) and value < minimum:
            raise ConfigError(f"{where} must be >= {minimum}, got {value!r}")
        return value

    def start(self, ctx: ProbeContext) -> None:
        """Once, before the first training step: choose the fixed samples, record references
        (e.g. the starting weights). Default: nothing."""

    def measure(self, ctx: ProbeContext, epoch: int, row: Mapping[str, Any]) -> dict[str, Any]:
        """The probe's keys at the end of ``epoch``; ``row`` holds the epoch's other metrics
        (normlab's ``fit``: ``lr``, ``val/acc``...; may be empty)."""
        return {}

    def on_fit_start(self, state: FitState) -> None:
        with preserved_random_state(state.train_loader.generator):
            self.start(FitContext(state))

    def on_epoch_end(self, state: FitState, epoch: int, row: Mapping[str, Any]) -> dict[str, Any]:
        if self.VALIDATES and not state.config.evaluates(epoch):
            return {}
        with preserved_random_state(state.train_loader.generator):
            return self.measure(FitContext(state), epoch, row)

    @classmethod
    def describe(cls) -> str:
        """One line per option: ``name=default  help``."""
        return "\n".join(
            f"{key}={default}  {help_}" for key, (_tp, default, _min, help_) in cls.OPTIONS.items()
        )


def _convert(text: str, tp: type) -> object:
    """A spec value as the option's type (the constructor then validates it)."""
    if tp is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        return text
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            return text
    return text


def parse_probe_spec(spec: str, options: dict[str, Option]) -> tuple[str, dict[str, object]]:
    """Split ``NAME[:KEY=VALUE[:KEY=VALUE...]]`` into the name and typed options.

    ``:`` separates options (``,`` separates probes on the command line, ``--probe
    weights,shift:batches=8:val_samples=0``). Values are converted to the option's declared
    type; the probe's constructor validates them.
    """
    name, *parts = spec.split(":")
    name = name.strip()
    out: dict[str, object] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"probes: bad option {part!r} in probe spec {spec!r}; write NAME:KEY=VALUE "
                "(e.g. shift:batches=8)"
            )
        if key in out:
            raise ConfigError(f"probes: option {key} given twice in probe spec {spec!r}")
        tp = options[key][0] if key in options else str
        out[key] = _convert(value.strip(), tp)
    return name, out


def sample_loader(
    ctx: ProbeContext,
    *,
    split: str,
    samples: int | None,
    batch_size: int,
    salt: str,
    drop_last: bool,
) -> Batches | None:
    """Batches over a fixed random sample of ``split`` ("train" or "val"): ``samples`` images
    (None or more than there are: all of them), chosen with
    :func:`~normlab.probes.context.probe_generator` (``salt`` names the probe), in a random
    order that is the same on every pass and on resume. With ``drop_last`` the sample is cut
    to whole batches (at least one batch, which holds all images when there are fewer than
    ``batch_size``). None when the split is empty. In normlab's ``fit``: without augmentation,
    normalised like the training data, on the run's device and memory format
    (:class:`~normlab.probes.context.FitContext`).
    """
    return ctx.sample(split, samples=samples, batch_size=batch_size, salt=salt, drop_last=drop_last)


IMAGES_OPTION: Option = (
    int,
    0,
    0,
    "a fixed number of training images instead (cut to whole batches; 0: use batches)",
)
"""The ``images`` option of the probes that sample with :func:`training_batches`."""


def training_batches(
    ctx: ProbeContext, batches: int, *, salt: str, images: int = 0
) -> Batches | None:
    """Whole batches of the training batch size from a fixed sample of the training split
    (:func:`sample_loader` with ``drop_last``): what a probe forwards in training mode to see
    the statistics training sees, without augmentation.

    The sample is ``batches`` batches, or, when ``images`` > 0, ``images`` images cut to whole
    batches (so the sample's size does not shrink with the batch size: at batch size 2,
    ``batches=8`` is only 16 images)."""
    bs = ctx.batch_size
    samples = images if images > 0 else batches * bs
    return sample_loader(
        ctx, split="train", samples=samples, batch_size=bs, salt=salt, drop_last=True
    )
