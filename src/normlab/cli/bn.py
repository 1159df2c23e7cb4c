"""``normlab doctor | fold | recalibrate | convert | export``: the BN toolbox on the command line.

Each subcommand is a thin shell over the Python functions of :mod:`normlab.bn`; TARGET is
anything :func:`normlab.bn.load.load_target` reads. ``doctor`` exits 0 (clean), 1 (warnings) or
2 (errors), so it can gate CI; bad input is a one-line error with exit status 2 as well.

Multi-process runs: ``doctor A B [C ...]`` takes one TARGET per rank (per-rank checkpoints or
state_dicts): the first is checked as usual and all are compared by
:func:`normlab.bn.diagnose.diagnose_rank_set`; ``doctor RUN`` does the same comparison on the
``bn_buffers.rank<R>.pt`` files a ``dist_bn: none`` run writes. ``convert A B ... OUT --op
reduce-ranks`` (or ``convert RUN OUT --op reduce-ranks``) writes the checkpoint with the BN
statistics averaged over ranks.

Models written by ``fold`` and ``convert`` have a different structure from the architecture they
came from (folded BNs are gone, convs gained biases), so they are saved as whole pickled modules
(``torch.save(model)``); loading one back needs ``--unsafe-load`` here, or
``torch.load(path, weights_only=False)``, since unpickling runs code. ``convert --state-dict``
saves tensors only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normlab.cli.args import add_data_argument, int_in, number_in, output_file
from normlab.errors import ConfigError, NormlabError

Handler = Callable[[argparse.Namespace], int]

CONVERT_OPS = ("keras-momentum", "sync-to-bn", "frozen-bn", "remove-bias", "reduce-ranks")


# ---- shared arguments ------------------------------------------------------------------------


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--arch",
        metavar="MODULE:CALLABLE",
        help="architecture for a bare state_dict (e.g. torchvision.models:resnet50, normlab:resnet20)",
    )
    p.add_argument(
        "--weights", metavar="FILE", help="state_dict to load into a module:callable TARGET"
    )
    p.add_argument(
        "--num-classes", type=int_in(1), help="passed to --arch / module:callable builders"
    )
    p.add_argument(
        "--unsafe-load",
        action="store_true",
        help="allow unpickling whole modules (runs code from the file: only for files you trust)",
    )
    p.add_argument(
        "--input-shape",
        metavar="C,H,W",
        help="per-sample input shape for dynamic checks and verification (default: from the run, "
        "else guessed from the first layer)",
    )


def _add_data_arg(p: argparse.ArgumentParser, help_: str) -> None:
    add_data_argument(p, help_)
    p.add_argument("--batch-size", type=int_in(1), help="batch size (default: the run's, else 64)")


MAX_SAMPLE_VALUES = 2**26
"""Most values one synthetic input sample may have (256 MiB in float32)."""

MAX_BATCH = 4096
"""Largest synthetic batch for verification and timing."""


def _add_batch_arg(p: argparse.ArgumentParser, default: int, help_: str) -> None:
    """``--batch``: the size of the synthetic batch a command verifies (and times) on."""
    p.add_argument(
        "--batch", type=int_in(1, MAX_BATCH), default=default, help=f"{help_} (at most {MAX_BATCH})"
    )


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"3,32,32"`` or ``"3x32x32"`` -> (3, 32, 32)."""
    if text is None:
        return None
    parts = text.replace("x", ",").split(",")
    if not parts or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--input-shape must be positive integers like 3,32,32, got {text!r}")
    shape = tuple(int(p) for p in parts)
    if math.prod(shape) > MAX_SAMPLE_VALUES:
        raise ConfigError(
            f"--input-shape {text}: {math.prod(shape)} values per sample, more than the "
            f"{MAX_SAMPLE_VALUES} this tool allocates"
        )
    return shape


def _load(args: argparse.Namespace, spec: str) -> Any:
    from normlab.bn.load import load_target

    return load_target(
        spec,
        arch=args.arch,
        weights=getattr(args, "weights", None),
        unsafe_load=args.unsafe_load,
        num_classes=args.num_classes,
    )


def _guess_shape(model: nn.Module) -> tuple[int, ...] | None:
    """A plausible per-sample input shape from the first conv/linear layer."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (m.in_channels, 64, 64)
        if isinstance(m, nn.Conv1d):
            return (m.in_channels, 64)
        if isinstance(m, nn.Conv3d):
            return (m.in_channels, 16, 32, 32)
        if isinstance(m, nn.Linear):
            return (m.in_features,)
    return None


def _input_shape(args: argparse.Namespace, target: Any) -> tuple[tuple[int, ...] | None, bool]:
    """(shape, guessed)."""
    given = _parse_shape(getattr(args, "input_shape", None))
    if given is not None:
        return given, False
    if target.input_shape is not None:
        shape = tuple(target.input_shape)
        if math.prod(shape) > MAX_SAMPLE_VALUES:
            raise ConfigError(
                f"{target.description}: it records an input shape {shape}, {math.prod(shape)} "
                f"values per sample, more than the {MAX_SAMPLE_VALUES} this tool allocates; "
                "pass --input-shape C,H,W"
            )
        return shape, False
    if target.model is not None:
        return _guess_shape(target.model), True
    return None, True


def _example(
    shape: tuple[int, ...], batch: int = 8, seed: int = 0, model: nn.Module | None = None
) -> Tensor:
    """A standard-normal batch, in the floating dtype of ``model``'s parameters (float32 when
    it has none), so that half-precision models get half-precision inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g)
    return x if model is None else x.to(_dtype(model))


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _check_forward(model: nn.Module, x: Tensor, what: str, hint: str) -> Any:
    """Run ``model`` once on ``x`` (eval mode, no grad) and return its output: ConfigError
    ``"{what} (the error); {hint}"`` when the model does not accept it, before any real work
    starts."""
    from normlab.bn.graph import eval_mode

    try:
        with eval_mode(model), torch.no_grad():
            return model(x)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"{what} ({type(exc).__name__}: {detail}); {hint}") from exc


def _check_example(model: nn.Module, x: Tensor, context: str = "", *, guessed: bool) -> None:
    """The synthetic batch ``x`` (from ``--input-shape``, the run, or a guess) fits ``model``."""
    shape = ",".join(map(str, x.shape[1:]))
    _check_forward(
        model,
        x,
        f"{context + ': ' if context else ''}the model fails on a batch of "
        f"{'guessed ' if guessed else ''}input shape {shape}",
        "pass --input-shape C,H,W with a shape the model accepts",
    )


def _check_data(model: nn.Module, bundle: Any, cfg: Any) -> Any:
    """Two training images of ``bundle`` (as the loaders prepare them) fit ``model``; returns
    the model's output on them (None without training images)."""
    from normlab.data import BatchLoader

    if bundle.train_labels.numel() == 0:
        return None
    probe = BatchLoader.evaluation(
        bundle.train_images[:2], bundle.train_labels[:2], 2, mean=bundle.mean, std=bundle.std
    )
    x, _ = next(iter(probe))
    shape = "x".join(map(str, x.shape[1:]))
    return _check_forward(
        model,
        x,
        f"the model does not accept the {shape} images of data source {cfg.name!r}",
        "choose the model's data with --data (or --arch / --num-classes for the model)",
    )


def _pickled(model: nn.Module) -> tuple[bytes | None, str]:
    """``torch.save(model)`` as bytes, or ``(None, why)`` when the module cannot be pickled
    (a class defined inside a function, a lambda attribute, an open handle)."""
    buffer = io.BytesIO()
    try:
        torch.save(model, buffer)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"the module cannot be pickled ({type(exc).__name__}: {detail})"
    return buffer.getvalue(), ""


def _not_class_scores(output: Any, num_classes: int) -> str | None:
    """Why ``output`` (the model's on a batch of 2) cannot be scored as classification logits
    of ``num_classes`` classes, or None when it can: a tensor [N, C] with C >= num_classes."""
    if not isinstance(output, Tensor):
        return f"the model returns {type(output).__name__}, not a tensor of class scores"
    if output.ndim != 2 or output.shape[1] < num_classes:
        shape = "x".join(map(str, output.shape))
        return (
            f"the model's output is {shape}, not class scores [N, >= {num_classes}] for the "
            f"{num_classes} classes of the data"
        )
    return None


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block (nothing when ``n`` is None)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _data(args: argparse.Namespace, target: Any, *, required: bool) -> tuple[Any, Any] | None:
    """(bundle, data_config) for ``--data`` (or the run's own data), None if not asked."""
    from normlab.data import build_data, parse_data_spec

    spec = getattr(args, "data", None)
    if spec is None:
        if target.data_config is None:
            if required:
                raise ConfigError(
                    f"{target.spec}: --data is needed (the target records no data set), e.g. "
                    "--data cifar10:/path or --data imagefolder:/path"
                )
            return None
        cfg = target.data_config
    elif spec == "run":
        if target.data_config is None:
            raise ConfigError(f"--data run: {target.spec} is not a normlab run or checkpoint")
        cfg = target.data_config
    else:
        given = parse_data_spec(spec)
        base = target.data_config
        if base is not None and base.name == given.name:
            cfg = dataclasses.replace(base, path=given.path or base.path)
        else:
            cfg = given
    # the split the run itself trained and validated on (data.split_seed), not a redraw with
    # the run's seed, which would put training images in the validation set
    bundle = build_data(cfg, seed=cfg.split_seed_for(target.seed))
    return bundle, cfg


def _loaders(bundle: Any, cfg: Any, batch_size: int, seed: int) -> tuple[Any, Any]:
    from normlab.data import BatchLoader

    common = {"mean": bundle.mean, "std": bundle.std}
    train = BatchLoader(
        bundle.train_images,
        bundle.train_labels,
        batch_size,
        shuffle=True,
        drop_last=bundle.train_labels.numel() >= batch_size,
        augment=cfg.augment,
        crop_padding=cfg.crop_padding,
        flip=cfg.flip,
        generator=torch.Generator().manual_seed(seed),
        **common,
    )
    val = BatchLoader.evaluation(bundle.val_images, bundle.val_labels, 256, **common)
    return train, val


def _save_module(model: nn.Module, out: str, command: str, hint: str) -> None:
    """The whole module (``torch.save(model)``) at ``out``, atomically; NormlabError naming
    ``command``, why and ``hint`` (and nothing written) when it cannot be pickled."""
    from normlab.store import atomic_write_bytes

    data, why = _pickled(model)
    if data is None:
        raise NormlabError(f"{command}: {why}; nothing written ({hint})")
    atomic_write_bytes(out, data)


def _require_model(target: Any, command: str) -> nn.Module:
    if target.model is None:
        raise NormlabError(
            f"{command} needs a PyTorch model, but {target.description} gives only layer records"
            + (
                "; pass --arch module:callable to rebuild it"
                if target.kind == "tensors"
                else " (ONNX/Keras files are checked by `normlab doctor` only)"
            )
        )
    return target.model


def _emit(args: argparse.Namespace, payload: dict[str, Any], lines: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, default=str))
    else:
        print("\n".join(lines))


# ---- doctor ----------------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from normlab.bn.diagnose import Report
    from normlab.bn.scan import UnsafeFileError

    specs = list(args.target)
    if len(specs) > 1 and getattr(args, "weights", None):
        raise ConfigError(
            "doctor: --weights loads one file into a module:callable TARGET; for one model per "
            "rank pass the per-rank files as TARGETs (with --arch if they are bare state_dicts)"
        )
    try:
        target = _load(args, specs[0])
    except UnsafeFileError as exc:
        return _print_report(args, _unsafe_report(exc, specs[0]))
    report = _doctor_one(args, target, specs[0])
    if target.unsafe:
        report.notes.append(
            f"loaded despite {len(target.unsafe)} unsafe item(s) because --unsafe-load was "
            f"given ({', '.join(sorted({i.id for i in target.unsafe}))}; the first: "
            f"{target.unsafe[0].message} at {target.unsafe[0].location})"
        )
    ranks: Report | None = None
    if len(specs) > 1:
        ranks = _rank_targets(args, target, specs)
        report.target = f"{target.description} + {len(specs) - 1} more rank(s)"
    elif target.kind == "run":
        ranks = _rank_files(args, target, report)
    if ranks is not None:
        report.findings.extend(ranks.findings)
        report.checks.append("ranks")
        report.notes.extend(ranks.notes)
    return _print_report(args, report)


def _print_report(args: argparse.Namespace, report: Any) -> int:
    if args.json:
        print(report.to_json(), end="")
    else:
        print(report.format_text(), end="")
    return int(report.exit_code)


def _unsafe_report(exc: Any, spec: str) -> Any:
    """The doctor's report on a file refused for unsafe content: the doctor's file checks
    (:mod:`normlab.bn.file_checks`) on the items the loader's scan found, nothing loaded, and
    a line on stderr saying the model itself was not checked."""
    import sys

    from normlab.bn.diagnose import Report
    from normlab.bn.file_checks import items_finding

    by_id: dict[str, list[Any]] = {}
    for item in exc.items:
        by_id.setdefault(item.id, []).append(item)
    findings = [items_finding(fid, items) for fid, items in by_id.items()]
    print(
        f"normlab doctor: {exc.path} was not loaded (it holds content that would run code); its "
        "normalization layers were not checked. Pass --unsafe-load to load it if you trust it.",
        file=sys.stderr,
    )
    return Report(findings, target=f"{spec} (not loaded)", checks=["file-scan"])


def _rank_targets(args: argparse.Namespace, first: Any, specs: list[str]) -> Any:
    """The rank-set check over several TARGETs (one per rank)."""
    from normlab.bn.diagnose import diagnose_rank_set
    from normlab.bn.load import target_state_dict

    states = [target_state_dict(first)]
    states += [target_state_dict(_load(args, spec)) for spec in specs[1:]]
    return diagnose_rank_set(
        states,
        specs,
        rtol=args.rank_rtol,
        atol=args.rank_atol,
        target_hint=" ".join(specs),
    )


def _rank_files(args: argparse.Namespace, target: Any, report: Any) -> Any:
    """The rank-set check over a run's ``bn_buffers.rank<R>.pt`` files (None when < 2)."""
    from normlab.bn.diagnose import diagnose_rank_set
    from normlab.bn.load import rank_buffer_files, read_rank_buffers, target_state_dict

    files = rank_buffer_files(target.spec)
    if len(files) == 1:
        report.notes.append(f"only one rank's BN buffers ({files[0][1].name}): nothing to compare")
    if len(files) < 2:
        return None
    ranks = [r for r, _ in files]
    states = [read_rank_buffers(path) for _, path in files]
    result = diagnose_rank_set(
        states,
        [path.name for _, path in files],
        rtol=args.rank_rtol,
        atol=args.rank_atol,
        target_hint=target.spec,
    )
    missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
    if missing:
        result.notes.append(
            f"bn_buffers files for ranks {', '.join(map(str, ranks))}; none for rank(s) "
            f"{', '.join(map(str, missing))}"
        )
    stale = _stale_counters(states[0], target_state_dict(target))
    if stale:
        result.notes.append(
            f"{files[0][1].name} was written at another step than checkpoint.pt "
            f"({stale}): the bn_buffers files may be left from an earlier dist_bn=none run"
        )
    return result


def _stale_counters(buffers: dict[str, Tensor], state: dict[str, Tensor]) -> str | None:
    """The first ``num_batches_tracked`` that differs between a rank file and the checkpoint."""
    for key, value in buffers.items():
        if (
            key.endswith("num_batches_tracked")
            and key in state
            and not torch.equal(value, state[key])
        ):
            return f"{key}: {int(value)} vs {int(state[key])}"
    return None


def _doctor_one(args: argparse.Namespace, target: Any, spec: str) -> Any:
    """The single-model doctor on one loaded TARGET."""
    from normlab.bn.diagnose import diagnose, diagnose_layers
    from normlab.bn.evidence import target_evidence

    # the user's word; what the file records (epoch, optimizer, Keras iterations) is evidence
    trained = True if args.trained else False if args.untrained else None
    evidence = target_evidence(target)
    notes = list(target.notes)
    if target.model is None:
        return diagnose_layers(
            target.layers or [],
            target=target.description,
            trained=trained,
            context=args.context,
            mode_recorded=target.mode_recorded,
            batch_size=args.batch_size or target.batch_size,
            min_count=args.min_count,
            graph_method=target.graph_method,
            notes=notes,
            target_hint=spec,
            evidence=evidence,
            path=target.path,
        )
    model = target.model
    if not target.mode_recorded:
        model.eval()  # a rebuilt model's mode is the constructor's default, not a fact
    shape, guessed = _input_shape(args, target)
    data = None
    if args.data is not None:
        got = _data(args, target, required=True)
        assert got is not None
        bundle, cfg = got
        bs = args.batch_size or target.batch_size or 64
        data, _ = _loaders(bundle, cfg, bs, target.seed)
    example = None
    if not args.static and shape is not None and data is None:
        example = _example(shape, 4, model=model)
        if guessed:
            notes.append(f"dynamic checks on a synthetic batch of guessed shape {shape}")
        else:
            notes.append(f"dynamic checks on a synthetic batch of shape {shape}")
    batch_size = args.batch_size or target.batch_size
    return diagnose(
        model,
        data,
        example_input=example,
        trained=trained,
        context=args.context,
        mode_recorded=target.mode_recorded,
        batch_size=batch_size if not guessed or args.batch_size else None,
        min_count=args.min_count,
        dynamic=not args.static,
        max_batches=args.max_batches,
        target=target.description,
        target_hint=spec,
        notes=notes,
        evidence=evidence,
        path=target.path,
    )


# ---- fold ------------------------------------------------------------------------------------


def cmd_fold(args: argparse.Namespace) -> int:
    from normlab.bn.fold import fold_batchnorm_report

    target = _load(args, args.input)
    model = _require_model(target, "fold")
    shape, guessed = _input_shape(args, target)
    if shape is None:
        raise ConfigError("fold: cannot tell the input shape; pass --input-shape C,H,W")
    x = _example(shape, args.batch, model=model)
    _check_example(model, x, guessed=guessed)
    output_file(args.output, "OUT")
    with _threads(args.threads):
        result = fold_batchnorm_report(
            model,
            x,
            post=not args.no_post,
            padded="refuse" if args.refuse_padded else "exact",
            measure_speed=not args.no_timing,
            speed_repeats=args.repeats,
        )
        threads = torch.get_num_threads()
    if not result.exact:
        raise NormlabError(
            f"fold: the folded model differs from the original by {result.max_abs_error:.3g} "
            f"(outputs up to {result.output_scale:.3g}; float rounding in "
            f"{str(_dtype(model)).removeprefix('torch.')} allows {result.tolerance:.3g}); "
            "nothing written"
        )
    _save_module(
        result.model, args.output, "fold", "the folded model is saved as a whole module only"
    )
    lines = [
        f"folded {len(result.folded)} BN layer(s) of {target.description} -> {args.output}",
        f"  verified on a batch of {args.batch} x {shape}: max abs error {result.max_abs_error:.3g} "
        f"(outputs up to {result.output_scale:.3g})",
    ]
    if result.speedup is not None:
        lines.append(
            f"  eval images/s: {result.images_per_s_before:.1f} -> {result.images_per_s_after:.1f} "
            f"(x{result.speedup:.2f}; median of {args.repeats} interleaved rounds, "
            f"{threads} thread(s), same run)"
        )
    for step in result.folded:
        if step.placement == "post" or step.note:
            lines.append(
                f"  {step.norm} -> {step.into} ({step.placement}{'; ' + step.note if step.note else ''})"
            )
    for name, reason in result.skipped:
        lines.append(f"  left {name}: {reason}")
    _emit(args, {"input": target.description, "output": args.output, **result.summary()}, lines)
    return 0


# ---- recalibrate -----------------------------------------------------------------------------


def _default_out(target: Any) -> Path:
    if target.kind == "run":
        return Path(target.spec) / "checkpoint-recalibrated.pt"
    if target.path is not None and target.path.suffix.lower() == ".json":  # a sharded index
        return target.path.with_name(f"{target.path.name.split('.')[0]}-recalibrated.pt")
    if target.path is not None:
        return target.path.with_name(
            f"{target.path.stem}-recalibrated{target.path.suffix or '.pt'}"
        )
    raise ConfigError("recalibrate: pass --out PATH for the recalibrated model")


def cmd_recalibrate(args: argparse.Namespace) -> int:
    from normlab.bn.recalibrate import recalibrate_batchnorm
    from normlab.store import atomic_write_bytes
    from normlab.train import evaluate

    target = _load(args, args.target)
    model = _require_model(target, "recalibrate")
    got = _data(args, target, required=True)
    assert got is not None
    bundle, cfg = got
    output = _check_data(model, bundle, cfg)
    if args.out:
        out = output_file(args.out, "--out")
    else:
        out = output_file(_default_out(target), "--out (default)")
    bs = args.batch_size or target.batch_size or 64
    train, val = _loaders(bundle, cfg, bs, target.seed)
    not_scored = None if output is None else _not_class_scores(output, bundle.num_classes)
    has_val = bundle.val_labels.numel() > 0 and not_scored is None
    before = evaluate(model, val) if has_val else None
    result = recalibrate_batchnorm(model, train, num_batches=args.batches)
    after = evaluate(model, val) if has_val else None
    state = model.state_dict()
    buffer = io.BytesIO()
    saved_as = None  # why the state_dict was written instead of the module
    if target.kind == "module" or (target.kind == "callable" and target.path is None):
        data, why = _pickled(model)
        if data is None:  # the recalibrated statistics still fit the target's architecture
            saved_as = f"{why}; load it into the model with load_state_dict"
            torch.save(state, buffer)
        else:
            buffer.write(data)
    elif target.checkpoint is not None and target.state_key is not None:
        ckpt = dict(target.checkpoint)
        ckpt[target.state_key] = state
        ckpt["recalibrated"] = {"batches": result.batches, "samples": result.samples}
        torch.save(ckpt, buffer)
    else:
        torch.save(state, buffer)
    atomic_write_bytes(out, buffer.getvalue())
    payload = {
        "target": target.description,
        "output": str(out),
        "layers": len(result.layers),
        "batches": result.batches,
        "samples": result.samples,
        "val_before": before,
        "val_after": after,
        "val_not_measured": not_scored,
    }
    lines = [
        f"recalibrated {len(result.layers)} BN layer(s) of {target.description} on "
        f"{result.batches} batch(es) ({result.samples} images of {cfg.name}) -> {out}"
    ]
    if before is not None and after is not None:
        lines.append(
            f"  val acc {before['acc']:.4f} -> {after['acc']:.4f}   "
            f"val loss {before['loss']:.4f} -> {after['loss']:.4f}"
        )
    if not_scored is not None:
        lines.append(f"  validation accuracy not measured: {not_scored}")
    if saved_as is not None:
        payload["saved"] = "state_dict"
        lines.append(f"  saved the state_dict: {saved_as}")
    for name, reason in result.skipped:
        lines.append(f"  left {name}: {reason}")
    _emit(args, payload, lines)
    return 0


# ---- convert ---------------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    from normlab.bn.convert import (
        keras_to_torch_conventions,
        remove_bias_before_bn,
        sync_to_batchnorm,
        to_frozen_batchnorm,
    )
    from normlab.store import atomic_write_bytes

    ops = args.op or []
    if not ops:
        raise ConfigError(f"convert: name at least one --op ({', '.join(CONVERT_OPS)})")
    inputs = list(args.input)
    if "reduce-ranks" in ops:
        if len(ops) > 1:
            raise ConfigError(
                "convert: --op reduce-ranks cannot be combined with other ops (run convert again "
                "on its output)"
            )
        return _reduce_ranks(args, inputs)
    if len(inputs) > 1:
        raise ConfigError(
            f"convert: one IN expected, got {len(inputs)} (several are for --op reduce-ranks)"
        )
    target = _load(args, inputs[0])
    model = _require_model(target, "convert")
    output_file(args.output, "OUT")
    report: list[str] = []
    for op in ops:
        if op == "keras-momentum":
            model = keras_to_torch_conventions(model, report=report)
        elif op == "sync-to-bn":
            shape, guessed = _input_shape(args, target)
            example = _example(shape, 2, model=model) if shape is not None and not guessed else None
            if example is not None:
                _check_example(model, example, "--op sync-to-bn", guessed=False)
            model = sync_to_batchnorm(model, example, report=report)
        elif op == "frozen-bn":
            model = to_frozen_batchnorm(model, report=report)
        elif op == "remove-bias":
            model = remove_bias_before_bn(model, report=report)
    if args.state_dict:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        atomic_write_bytes(args.output, buffer.getvalue())
    else:
        _save_module(model, args.output, "convert", "pass --state-dict to save its state_dict")
    lines = [f"converted {target.description} -> {args.output} ({', '.join(ops)})"]
    lines += [f"  {line}" for line in report] or ["  nothing to change"]
    _emit(args, {"input": target.description, "output": args.output, "changes": report}, lines)
    return 0


def _reduce_ranks(args: argparse.Namespace, inputs: list[str]) -> int:
    """``convert --op reduce-ranks``: one IN per rank, or a run directory with rank files."""
    from normlab.bn.convert import reduce_ranks
    from normlab.bn.load import rank_buffer_files, read_rank_buffers, target_state_dict
    from normlab.errors import DataError
    from normlab.store import atomic_write_bytes

    if len(inputs) == 1:
        target = _load(args, inputs[0])
        files = rank_buffer_files(inputs[0]) if target.kind == "run" else []
        if len(files) < 2:
            raise ConfigError(
                "convert --op reduce-ranks: give one IN per rank (at least 2), or a run directory "
                f"holding bn_buffers.rank<R>.pt files ({inputs[0]} has {len(files)})"
            )
        names = [str(path) for _, path in files]
        buffers = reduce_ranks([read_rank_buffers(path) for _, path in files], names=names)
        base = target_state_dict(target)
        for key, value in buffers.items():
            if key not in base:
                raise DataError(f"{names[0]}: key {key!r} is not in the run's checkpoint.pt")
            if not key.endswith(("running_mean", "running_var")) and not torch.equal(
                value, base[key]
            ):
                raise DataError(
                    f"{names[0]}: {key} differs from checkpoint.pt (the bn_buffers files were "
                    "written at another step; left from an earlier run?)"
                )
        state = {k: buffers.get(k, v) for k, v in base.items()}
        ranks = len(files)
        source = f"{ranks} rank files of {target.spec}"
        rest = "the other {} tensor(s) are checkpoint.pt's (DDP keeps them equal on every rank)"
    else:
        targets = [_load(args, spec) for spec in inputs]
        state = reduce_ranks([target_state_dict(t) for t in targets], names=inputs)
        target, ranks = targets[0], len(inputs)
        source = f"{ranks} ranks ({', '.join(inputs)})"
        rest = "the other {} tensor(s) are equal on every rank"
    averaged = [k for k in state if k.endswith(("running_mean", "running_var"))]
    output_file(args.output, "OUT")
    buffer = io.BytesIO()
    if not args.state_dict and target.checkpoint is not None and target.state_key is not None:
        ckpt = dict(target.checkpoint)
        ckpt[target.state_key] = state
        ckpt["reduced_ranks"] = ranks
        torch.save(ckpt, buffer)
    elif not args.state_dict and target.kind == "module" and target.model is not None:
        target.model.load_state_dict(state)
        torch.save(target.model, buffer)
    else:
        torch.save(state, buffer)
    atomic_write_bytes(args.output, buffer.getvalue())
    lines = [
        f"averaged the BN running statistics of {source} -> {args.output}",
        f"  {len(averaged)} running_mean/running_var tensor(s) averaged; "
        + rest.format(len(state) - len(averaged)),
    ]
    payload = {"inputs": inputs, "output": args.output, "ranks": ranks, "averaged": averaged}
    _emit(args, payload, lines)
    return 0


# ---- export ----------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from normlab.bn.export import check_opset, export_onnx

    check_opset(args.opset)
    target = _load(args, args.target)
    model = _require_model(target, "export").eval()
    shape, guessed = _input_shape(args, target)
    if shape is None:
        raise ConfigError("export: cannot tell the input shape; pass --input-shape C,H,W")
    x = _example(shape, args.batch, model=model)
    _check_example(model, x, guessed=guessed)
    output_file(args.onnx, "--onnx")
    result = export_onnx(model, x, args.onnx, fold=not args.no_fold, opset=args.opset)
    lines = [
        f"exported {target.description} -> {result.path} (opset {result.opset}, "
        f"{len(result.fold.folded) if result.fold else 0} BN folded, {result.bn_nodes} BN node(s) left)",
        f"  onnxruntime vs PyTorch on a batch of {args.batch} x {shape}: max abs error "
        f"{result.max_abs_error:.3g} (outputs up to {result.output_scale:.3g})",
    ]
    _emit(args, {"target": target.description, **result.summary()}, lines)
    return 0


# ---- registration ----------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, Handler]:
    """Add the BN toolbox's subcommands to ``sub``; return name -> handler."""
    p = sub.add_parser(
        "doctor",
        help="find BatchNorm/GroupNorm defects in a model (exit 0 clean, 1 warnings, 2 errors)",
        description="Check the normalization layers of TARGET: a run directory, checkpoint, "
        "state_dict or model file, module:callable, .onnx, or .keras/.h5 file. Several TARGETs "
        "are one model per rank of a multi-process run (per-rank checkpoints or state_dicts): "
        "the first is checked and all are compared (BN statistics or parameters that differ "
        "between ranks); a run directory with bn_buffers.rank<R>.pt files is compared the same way.",
    )
    p.add_argument("target", metavar="TARGET", nargs="+")
    _add_target_args(p)
    _add_data_arg(p, "real data for the dynamic checks (estimation shift); 'run' = the run's data")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--static", action="store_true", help="static checks only (no forward pass)")
    p.add_argument(
        "--trained",
        action="store_true",
        help="the model was trained (default: judged from evidence: the file's optimizer and "
        "step counters, num_batches_tracked, the affine parameters; the report names it)",
    )
    p.add_argument("--untrained", action="store_true", help="the model is freshly initialised")
    p.add_argument(
        "--context",
        choices=["inference", "training"],
        default="inference",
        help="inference: train mode is a defect (default); training: about to be (fine-)tuned",
    )
    p.add_argument(
        "--min-count", type=int_in(0), default=16, help="values per channel below which to warn"
    )
    p.add_argument(
        "--max-batches", type=int_in(1), default=8, help="batches for the estimation shift"
    )
    p.add_argument(
        "--rank-rtol",
        type=number_in(0),
        default=1e-3,
        help="ranks agree when max-min over ranks <= rank-atol + rank-rtol * |value| (1e-3)",
    )
    p.add_argument("--rank-atol", type=number_in(0), default=1e-6, help="see --rank-rtol (1e-6)")

    p = sub.add_parser(
        "fold",
        help="fold BatchNorm into neighbouring conv/linear layers, verified, with the speedup",
        description="Fold every BN of IN that folds exactly (pre: into the preceding layer; post: "
        "into the next one) and save the folded eval model to OUT (a pickled module).",
    )
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    _add_target_args(p)
    _add_batch_arg(p, 8, "verification/timing batch size")
    p.add_argument(
        "--repeats", type=int_in(1, 1000), default=5, help="timed rounds (median; at most 1000)"
    )
    p.add_argument("--no-timing", action="store_true", help="skip the speed measurement")
    p.add_argument(
        "--threads",
        type=int_in(1, 1024),
        help="torch threads for the timing (1 is steadiest on a busy machine)",
    )
    p.add_argument("--no-post", action="store_true", help="fold only BNs that follow their layer")
    p.add_argument(
        "--refuse-padded",
        action="store_true",
        help="leave BNs before zero-padded convs instead of adding the exact border correction",
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "recalibrate",
        help="precise BN: recompute running statistics as population statistics",
        description="Recompute every BN's running statistics over the training data, report "
        "validation accuracy before and after, and write the recalibrated model.",
    )
    p.add_argument("target", metavar="CHECKPOINT")
    _add_target_args(p)
    _add_data_arg(p, "data to recalibrate on (default: the run's own data)")
    p.add_argument("--batches", type=int_in(1), help="use at most this many batches (default: all)")
    p.add_argument("--out", metavar="PATH", help="output file (default: beside the input)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "convert",
        help="exact BN conversions: Keras momentum, SyncBN->BN, BN->frozen BN, drop bias before BN, "
        "average per-rank BN statistics",
        description="Convert IN and write OUT. --op reduce-ranks takes one IN per rank (per-rank "
        "checkpoints or state_dicts, or one run directory with bn_buffers.rank<R>.pt files) and "
        "writes IN's checkpoint with BN running statistics averaged over ranks; everything else "
        "must be equal on all ranks.",
    )
    p.add_argument("input", metavar="IN", nargs="+")
    p.add_argument("output", metavar="OUT")
    _add_target_args(p)
    p.add_argument("--op", action="append", choices=CONVERT_OPS, help="conversion (repeatable)")
    p.add_argument("--state-dict", action="store_true", help="save only the state_dict")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "export",
        help="ONNX export of the folded eval model, checked against onnxruntime",
    )
    p.add_argument("target", metavar="CHECKPOINT")
    _add_target_args(p)
    p.add_argument("--onnx", metavar="OUT", required=True, help="the .onnx file to write")
    _add_batch_arg(p, 4, "batch used for tracing and the check")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--no-fold", action="store_true", help="export without folding")
    p.add_argument("--json", action="store_true")
    return {
        "doctor": cmd_doctor,
        "fold": cmd_fold,
        "recalibrate": cmd_recalibrate,
        "convert": cmd_convert,
        "export": cmd_export,
    }


__all__ = ["register"]
