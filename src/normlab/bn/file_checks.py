"""The doctor's file checks: content that would run code when its framework loads the file.

One registered check per id of :mod:`normlab.bn.scan` (kind ``file``). All of them read one
scan of the target's file, shared through ``ctx.memo``; nothing is unpickled, unmarshalled,
imported or evaluated. Each is an error: such a file must not be loaded by its framework's
unsafe loader (``torch.load(weights_only=False)``, ``keras.models.load_model(...,
safe_mode=False)``, onnxruntime on external data it follows) unless its source is trusted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from normlab.bn.checks import CheckContext, check
from normlab.bn.findings import Finding
from normlab.bn.scan import UNSAFE_CHECKS, UnsafeItem, unsafe_findings

__all__ = ["FIX", "items_finding"]

FIX = (
    "do not load this file with its framework's unsafe loader unless you trust its source; "
    "re-export the model as tensors only (a state_dict, .safetensors, or a Keras/ONNX file "
    "without code); pass --unsafe-load to check its model anyway"
)
_SHOWN = 8  # items quoted in one finding's message


def items_finding(check_id: str, items: list[UnsafeItem]) -> Finding:
    """One error finding for every item of ``check_id`` (the first few quoted, all in the
    evidence)."""
    shown = "; ".join(f"{i.message} (at {i.location})" for i in items[:_SHOWN])
    more = f"; and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return Finding(
        check_id,
        "error",
        None,
        shown + more,
        FIX,
        False,
        {"items": [{"message": i.message, "location": i.location} for i in items]},
    )


_WHAT = {
    "unsafe-pickle-global": "a pickle in the file (a raw or zip-based torch file, each .pkl "
    "inside) imports a global outside torch's weights-only allowlist: torch.load with "
    "weights_only=False would call it",
    "keras-lambda": "a Keras Lambda layer: Keras runs its function when the model is loaded "
    "with safe_mode=False",
    "keras-marshalled-code": "marshalled Python bytecode in a Keras config (a Lambda's "
    "function): it runs when the model is loaded with safe_mode=False",
    "keras-foreign-object": "a Keras config names a layer, function or object from outside "
    "Keras (e.g. os.system), which Keras imports on loading",
    "onnx-external-data-outside": "an ONNX tensor's external data lies outside the model's "
    "folder (an absolute path, '..', or a symlink leading out), which a runtime would read",
    "scan-limit-exceeded": "part of the file is too large to scan within bounded memory (a "
    "zip bomb, a huge header or pickle): it could not be shown safe",
}


def _register(check_id: str) -> None:
    def run(ctx: CheckContext) -> Iterator[Finding]:
        path = ctx.path
        if path is None:
            return
        items: list[UnsafeItem] = ctx.memo("unsafe", lambda: unsafe_findings(path))
        mine = [i for i in items if i.id == check_id]
        if mine:
            yield items_finding(check_id, mine)

    decorate: Callable[..., object] = check(
        check_id, "error", UNSAFE_CHECKS[check_id], _WHAT[check_id], kind="file"
    )
    decorate(run)


for _id in UNSAFE_CHECKS:
    _register(_id)
