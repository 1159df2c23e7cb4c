"""The one training loop and what plugs into it."""

from normlab.engine.callbacks import Callback
from normlab.engine.evaluate import evaluate
from normlab.engine.state import FitState
from normlab.train.fit import RunResult, fit

__all__ = ["Callback", "FitState", "RunResult", "evaluate", "fit"]
