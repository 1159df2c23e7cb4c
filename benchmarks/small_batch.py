"""Small-batch training: K seeds stacked (``fit_stacked``) vs one ``fit`` per seed, in one run.

Claim checked (issue 15, item 4): training the K seeds of one configuration as one stacked
module gives at least 2x the training images/s of today's code (``fit`` once per seed, still
the default) at batch 2 and 8, is not slower at batch 128 (``study --stack-seeds`` trains
batches above ``stacked.MAX_BATCH`` separately; the benchmark stacks them anyway, marked
"forced", to show why), and gives the same results up to float32 rounding: one step agrees
as closely as the old path agrees with itself between memory layouts (the old path stays
available: it is plain ``fit``, and ``fit_stacked`` is only used when asked for).

Setting: the batch-size study's (``study/builtin/batch-size.yaml``) at small scale: ResNet-20,
images resized to 16x16, SGD momentum 0.9, weight decay 5e-4, cosine schedule with 1 epoch of
warm-up, lr = 0.1 x batch_size / 128, ``runtime.threads = 1``, no probes. Every batch size
trains the same number of images per run and epoch (``--images``, rounded down to a multiple
of the batch size), 2 epochs, validation on ``limit_val`` images after each epoch. The data
bundle is built once per data config and passed to every run.

What is timed, per batch size, for the K = ``--seeds`` seeds:

* ``job``: wall-clock of the whole K-run job: K calls of ``fit(config, out=...)`` against one
  call of ``fit_stacked(configs, outs)``, both with everything a run does (session setup,
  both epochs, evaluation, checkpoints, predictions; for the stacked path also stacking and
  its float64 verification). Rate = K x 2 x images / seconds. This is what a study waits for.
* ``train``: the training part of epoch 2 only (epoch 1 includes one-off kernel selection),
  from the runs' metrics rows: a row's ``images_per_s`` is the epoch's training images over
  its training seconds (before evaluation is added to ``seconds``). Old path: K x images /
  sum over runs of (images / images_per_s). Stacked path: the K runs share one training loop,
  so their rows hold the same training time (which is counted once) and the row's
  ``images_per_s`` counts one copy's images: rate = K x images_per_s.

Each repeat runs both paths; the order alternates between repeats; the median over repeats of
each rate and of the ratio stacked/old (per repeat) is printed, with every repeat's value.

Agreement (same runs, first repeat): |final val acc stacked - old| per seed. Reference for
what rounding alone does: the old path at ``runtime.threads`` 1 vs 2 (different reduction
splits, also not bit-identical; ``--no-threads-baseline`` skips it). On a one-core pin two
threads share the core, which changes the summation order, not the numbers' meaning.
One step: ``limit_train = batch_size``, 1 epoch, both paths, every state-dict tensor compared
per seed (integer buffers must be equal): ``model rel`` = ||a - b|| / ||b|| over all floating
tensors (parameters and BN buffers) together, and ``update rel`` = ||(a - a0) - (b - b0)|| /
||b - b0|| over the parameters (a0 = b0 the shared init), the disagreement relative to what
the step changed; the largest over the seeds is printed. Tolerance: ``model rel`` <= 1e-5 and
``update rel`` <= 1e-3. ``worst tensor`` (max |a - b| / max |b| of one tensor, not checked)
is printed too: a pre-activation within rounding of 0 can take the other side of a ReLU in
the two paths, which moves one channel of a small tensor (e.g. a BN bias after one step, whose
values are ~1e-6) by a visible fraction while the model as a whole agrees to rounding.

Precision: every run uses ``--precision`` (default fp32, what the findings ladders train in;
``auto``, the config default, is bf16 on CPUs with AMX, where the convolutions are cheaper and
the per-step overhead a larger share).

Large-batch reference (printed per small batch, not checked): the old path's best training
rate at a larger batch of the same run over its rate at the small batch. At a large batch the
per-step overhead is spread over many images, so this is roughly what removing all of it would
give the old path; a target near or above it cannot come from cutting overhead alone.

Usage::

    python benchmarks/small_batch.py [--batch-sizes 2,8,32,128] [--seeds 6] [--repeats 3]
        [--images 128] [--data cifar10:../shared/datasets/cifar10-jpeg.tar.gz] [--quick]
        [--no-threads-baseline] [--precision fp32|bf16|auto]

Measured (``--images 384 --repeats 3 --seeds 6``, training rate stacked / old, median of 3):
2-core AMD EPYC, fp32: 2.55x at batch 2, 1.55x at 8; 2-core AMX Xeon, fp32: 1.92x at 2, 1.42x
at 8 (large-batch reference 4.88x and 2.12x), about 6 minutes; same Xeon, bf16: 1.95x and
1.51x (reference 7.57x and 2.64x).

Defaults: estimated 8-10 minutes on one core of a 2-core EPYC (2 repeats of 96 images took 5);
``--quick`` (batch 2 and 8, 2 seeds, 1 repeat, 64 images) about 45 s. With few images per epoch the job rate includes each
run's fixed setup and evaluation; at batch 128 and 128 images epoch 2 is a single step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from normlab.config import config_from_dict
from normlab.data import DataBundle, build_data
from normlab.train import fit, stacked
from normlab.train.fit import RunLoop
from normlab.train.stacked import fit_stacked

DEFAULT_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
MODEL_TOL = 1e-5
UPDATE_TOL = 1e-3
EPOCHS = 2


def data_spec(data: str, n_train: int, limit_val: int) -> dict[str, Any]:
    name, _, path = data.partition(":")
    spec: dict[str, Any] = {"name": name, "path": path or None, "image_size": 16}
    if name == "synthetic":
        spec.update(synthetic_samples=max(4 * n_train, 1024), synthetic_image_size=16)
    spec.update(limit_train=n_train, limit_val=limit_val)
    return spec


PRECISION = "fp32"  # --precision; module-level so every config of one invocation shares it


def make_config(
    spec: dict[str, Any], batch: int, seed: int, epochs: int, threads: int = 1, layout: str = "auto"
):
    return config_from_dict(
        {
            "model": {"name": "resnet20"},
            "data": spec,
            "epochs": epochs,
            "batch_size": batch,
            "eval_batch_size": 256,
            "seed": seed,
            "optim": {
                "name": "sgd",
                "lr": 0.1 * batch / 128,
                "momentum": 0.9,
                "weight_decay": 5e-4,
                "schedule": "cosine",
                "warmup_epochs": 1,
            },
            "runtime": {
                "threads": threads,
                "progress": "off",
                "memory_format": layout,
                "precision": PRECISION,
            },
        }
    )


class Bundles:
    """One data bundle per data config, built once."""

    def __init__(self) -> None:
        self._cache: dict[str, DataBundle] = {}

    def get(self, spec: dict[str, Any]) -> DataBundle:
        key = repr(sorted(spec.items()))
        if key not in self._cache:
            self._cache[key] = build_data(make_config(spec, 2, 0, 1).data)
        return self._cache[key]


def run_old(configs, bundle: DataBundle, root: Path) -> tuple[float, list]:
    t0 = time.perf_counter()
    results = [fit(c, out=root / f"old-{c.seed}", data=bundle, verbose=False) for c in configs]
    return time.perf_counter() - t0, results


def run_stacked(configs, bundle: DataBundle, root: Path) -> tuple[float, list]:
    """``fit_stacked`` (above ``MAX_BATCH`` with the limit lifted, to measure why it exists)."""
    limit = stacked.MAX_BATCH
    stacked.MAX_BATCH = max(limit, configs[0].batch_size)
    try:
        t0 = time.perf_counter()
        results = fit_stacked(configs, [root / f"stk-{c.seed}" for c in configs], data=bundle)
        return time.perf_counter() - t0, results
    finally:
        stacked.MAX_BATCH = limit


def train_rate_old(results: list, n: int) -> float:
    rows = [r.metrics[-1] for r in results]
    return len(rows) * n / sum(n / row["images_per_s"] for row in rows)


def train_rate_stacked(results: list) -> float:
    rates = {round(r.metrics[-1]["images_per_s"], 6) for r in results}
    if len(rates) != 1:  # they share one training loop: one time
        raise AssertionError(f"stacked runs report different training rates: {rates}")
    return len(results) * results[0].metrics[-1]["images_per_s"]


def final_accs(results: list) -> list[float]:
    for r in results:
        if r.status != "completed":
            raise AssertionError(f"{r.run_dir}: {r.status}")
    return [float(r.metrics[-1]["val/acc"]) for r in results]


def initial_states(configs, bundle: DataBundle, root: Path) -> list[dict[str, torch.Tensor]]:
    """Each seed's initial model, as its run builds it (the run directory is thrown away)."""
    states = []
    for c in configs:
        loop = RunLoop(
            c, out=root / f"init-{c.seed}", resume=False, callbacks=(), data=bundle, verbose=False
        )
        states.append({k: v.detach().clone() for k, v in loop.s.model.state_dict().items()})
    return states


def one_step(
    spec, batch: int, seeds: list[int], bundles: Bundles
) -> tuple[tuple[float, float, float, str], tuple[float, float, float, str]]:
    """:func:`compare_states` of both paths after one training step, and of the old path with
    the other memory layout (NCHW instead of what ``auto`` picks), the reference for what
    float32 rounding alone does to one step."""
    spec1 = {**spec, "limit_train": batch}
    bundle = bundles.get(spec1)
    configs = [make_config(spec1, batch, s, 1) for s in seeds]
    other = [make_config(spec1, batch, s, 1, layout="contiguous") for s in seeds]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inits = initial_states(configs, bundle, root)
        _, old = run_old(configs, bundle, root)
        _, stk = run_stacked(configs, bundle, root)
        _, nchw = run_old(other, bundle, root / "nchw")
    return compare_states(inits, stk, old), compare_states(inits, nchw, old)


@torch.no_grad()
def compare_states(inits, stk: list, old: list) -> tuple[float, float, float, str]:
    """Over the seeds, the largest model rel, update rel and worst single tensor (module docs)."""
    model_rel = update_rel = worst = 0.0
    worst_name = ""
    for init, a_res, b_res in zip(inits, stk, old, strict=True):
        a_state, b_state = a_res.model.state_dict(), b_res.model.state_dict()
        params = {n for n, _ in b_res.model.named_parameters()}
        diff2 = norm2 = udiff2 = unorm2 = 0.0
        for name, b in b_state.items():
            a = a_state[name]
            if not b.is_floating_point():
                if not torch.equal(a, b):
                    raise AssertionError(f"{name}: integer buffers differ")
                continue
            a, b, a0 = a.double(), b.double(), init[name].double()
            diff2 += float((a - b).pow(2).sum())
            norm2 += float(b.pow(2).sum())
            rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
            if rel > worst:
                worst, worst_name = rel, name
            if name in params:
                udiff2 += float(((a - a0) - (b - a0)).pow(2).sum())
                unorm2 += float((b - a0).pow(2).sum())
        model_rel = max(model_rel, (diff2 / max(norm2, 1e-300)) ** 0.5)
        update_rel = max(update_rel, (udiff2 / max(unorm2, 1e-300)) ** 0.5)
    return model_rel, update_rel, worst, worst_name


def large_batch_reference(table: list[dict[str, Any]]) -> list[str]:
    """Per small batch: the old path's best median training rate at a larger batch measured in
    this run, over its rate at that batch (stored in the row as ``large_batch_ref``).

    At a large batch the per-step overhead is spread over many images, so this ratio is
    roughly what removing all of it would give the old path at the small batch. It is a
    reference for how far the target is from the arithmetic, not a bound: the stacked path's
    grouped kernels can be more or less efficient per FLOP than one large plain kernel.
    """
    lines = []
    for row in table:
        larger = [r for r in table if r["batch"] > row["batch"]]
        if not larger:
            continue
        best = max(larger, key=lambda r: r["train_old"])
        ref = best["train_old"] / row["train_old"]
        row["large_batch_ref"] = ref
        lines.append(
            f"large-batch reference at batch {row['batch']}: the old path trains "
            f"{best['train_old']:.1f} img/s at batch {best['batch']}, {ref:.2f}x its "
            f"{row['train_old']:.1f} at batch {row['batch']} (stacked reached "
            f"{row['train_ratio']:.2f}x)"
        )
    return lines


def fmt_list(values: list[float], digits: int = 0) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", default="2,8,32,128")
    ap.add_argument("--seeds", type=int, default=6, help="K: seeds trained together")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=128, help="training images per run and epoch")
    ap.add_argument("--limit-val", type=int, default=200)
    ap.add_argument(
        "--data", default=f"cifar10:{DEFAULT_CIFAR}" if DEFAULT_CIFAR.exists() else "synthetic"
    )
    ap.add_argument("--no-threads-baseline", action="store_true")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: batch 2,8, 2 seeds, 1 repeat, 64 images"
    )
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "auto"],
        help="runtime.precision of every run (default fp32, the findings ladders'; auto is bf16 "
        "on CPUs with AMX)",
    )
    args = ap.parse_args(argv)
    global PRECISION
    PRECISION = args.precision
    if args.quick:
        args.batch_sizes, args.seeds, args.repeats, args.images = "2,8", 2, 1, 64
    seeds = list(range(args.seeds))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    bundles = Bundles()
    print(
        f"data={args.data} seeds={args.seeds} repeats={args.repeats} images/run/epoch~{args.images} "
        f"epochs={EPOCHS} limit_val={args.limit_val} threads={torch.get_num_threads()}->1 "
        f"precision={PRECISION} "
        f"torch={torch.__version__}"
    )
    table = []
    for batch in batch_sizes:
        n = max(batch, args.images // batch * batch)
        spec = data_spec(args.data, n, args.limit_val)
        bundle = bundles.get(spec)
        configs = [make_config(spec, batch, s, EPOCHS) for s in seeds]
        job_old, job_stk, tr_old, tr_stk, accs_old, accs_stk = [], [], [], [], [], []
        for r in range(args.repeats):
            order = ["old", "stacked"] if r % 2 == 0 else ["stacked", "old"]
            for side in order:
                with tempfile.TemporaryDirectory() as tmp:
                    if side == "old":
                        sec, res = run_old(configs, bundle, Path(tmp))
                        job_old.append(len(seeds) * EPOCHS * n / sec)
                        tr_old.append(train_rate_old(res, n))
                        accs_old.append(final_accs(res))
                    else:
                        sec, res = run_stacked(configs, bundle, Path(tmp))
                        job_stk.append(len(seeds) * EPOCHS * n / sec)
                        tr_stk.append(train_rate_stacked(res))
                        accs_stk.append(final_accs(res))
        job_ratio = [s / o for s, o in zip(job_stk, job_old, strict=True)]
        tr_ratio = [s / o for s, o in zip(tr_stk, tr_old, strict=True)]
        acc_diff = [abs(a - b) for a, b in zip(accs_stk[0], accs_old[0], strict=True)]
        # the old path is deterministic: every repeat gives the same accuracies
        repeat_same = all(a == accs_old[0] for a in accs_old) and all(
            a == accs_stk[0] for a in accs_stk
        )
        thr_diff: list[float] | None = None
        if not args.no_threads_baseline:
            configs2 = [make_config(spec, batch, s, EPOCHS, threads=2) for s in seeds]
            with tempfile.TemporaryDirectory() as tmp:
                _, res2 = run_old(configs2, bundle, Path(tmp))
            torch.set_num_threads(1)
            thr_diff = [abs(a - b) for a, b in zip(final_accs(res2), accs_old[0], strict=True)]
        (model_rel, update_rel, worst, worst_name), layout_ref = one_step(
            spec, batch, seeds, bundles
        )
        torch.set_num_threads(1)
        row = {
            "batch": batch,
            "images": n,
            "job_old": statistics.median(job_old),
            "job_stacked": statistics.median(job_stk),
            "job_ratio": statistics.median(job_ratio),
            "train_old": statistics.median(tr_old),
            "train_stacked": statistics.median(tr_stk),
            "train_ratio": statistics.median(tr_ratio),
            "acc_diff_max": max(acc_diff),
            "acc_diff_mean": statistics.mean(acc_diff),
            "threads_diff_max": max(thr_diff) if thr_diff is not None else None,
            "threads_diff_mean": statistics.mean(thr_diff) if thr_diff is not None else None,
            "model_rel": model_rel,
            "update_rel": update_rel,
            "worst_tensor": f"{worst:.1e} ({worst_name})",
            "layout_model_rel": layout_ref[0],
            "layout_update_rel": layout_ref[1],
            "layout_worst_tensor": f"{layout_ref[2]:.1e} ({layout_ref[3]})",
            "forced": batch > stacked.MAX_BATCH,
            "deterministic": repeat_same,
        }
        table.append(row)
        print(
            f"batch {batch:4d} ({n} images/run/epoch)\n"
            f"  job   img/s old {row['job_old']:7.1f} stacked {row['job_stacked']:7.1f} "
            f"ratio {row['job_ratio']:.2f}x  (old {fmt_list(job_old)}, stacked "
            f"{fmt_list(job_stk)}, ratios {fmt_list(job_ratio, 2)})\n"
            f"  train img/s old {row['train_old']:7.1f} stacked {row['train_stacked']:7.1f} "
            f"ratio {row['train_ratio']:.2f}x  (old {fmt_list(tr_old)}, stacked "
            f"{fmt_list(tr_stk)}, ratios {fmt_list(tr_ratio, 2)})\n"
            f"  final val acc old {fmt_list(accs_old[0], 3)} stacked {fmt_list(accs_stk[0], 3)}"
            + (f" old@2threads |diff| {fmt_list(thr_diff, 3)}" if thr_diff is not None else "")
            + f"\n  one step: model rel {model_rel:.2e} update rel {update_rel:.2e} "
            f"worst tensor {row['worst_tensor']}; NCHW vs auto layout (old path): model rel "
            f"{layout_ref[0]:.2e} update rel {layout_ref[1]:.2e} worst {row['layout_worst_tensor']}"
            f"  repeats identical: {repeat_same}",
            flush=True,
        )
    print()
    print(
        "| batch | images/run/epoch | job img/s old | job img/s stacked | job ratio "
        "| train img/s old | train img/s stacked | train ratio | max/mean abs d final acc "
        "(stacked vs old) | same, old 2 vs 1 threads | 1-step model rel | 1-step update rel "
        "| 1-step worst tensor | same 3, old path NCHW vs auto layout |"
    )
    print("|" + "---|" * 14)
    for row in table:
        thr = (
            f"{row['threads_diff_max']:.3f} / {row['threads_diff_mean']:.3f}"
            if row["threads_diff_max"] is not None
            else "skipped"
        )
        forced = " (forced)" if row["forced"] else ""
        print(
            f"| {row['batch']}{forced} | {row['images']} | {row['job_old']:.1f} | {row['job_stacked']:.1f} "
            f"| {row['job_ratio']:.2f}x | {row['train_old']:.1f} | {row['train_stacked']:.1f} "
            f"| {row['train_ratio']:.2f}x | {row['acc_diff_max']:.3f} / "
            f"{row['acc_diff_mean']:.3f} | {thr} | {row['model_rel']:.1e} "
            f"| {row['update_rel']:.1e} | {row['worst_tensor']} "
            f"| {row['layout_model_rel']:.1e} / {row['layout_update_rel']:.1e} / "
            f"{row['layout_worst_tensor']} |"
        )
    bad = [
        r["batch"]
        for r in table
        if r["model_rel"] > max(MODEL_TOL, 10 * r["layout_model_rel"])
        or r["update_rel"] > max(UPDATE_TOL, 10 * r["layout_update_rel"])
    ]
    print(
        f"one-step agreement within tolerance (model rel <= max({MODEL_TOL:g}, 10x the layout "
        f"change's), update rel <= max({UPDATE_TOL:g}, 10x the layout change's)): "
        + ("yes" if not bad else f"NO at batch {bad}")
    )
    for line in large_batch_reference(table):
        print(line)
    if any(r["forced"] for r in table):
        print(
            f"(forced): batch > stacked.MAX_BATCH = {stacked.MAX_BATCH}, stacked here only to "
            "show why the limit is there; `study --stack-seeds` trains these runs separately "
            "(the old path), so it is never slower there"
        )
    return table


if __name__ == "__main__":
    main()
