"""Per-image validation predictions: ``predictions.npz`` holds exactly what the recorded
accuracies count, survives resume, costs the metrics nothing, and is gathered in order from the
ranks of a multi-process job."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import InterruptAt, stable, tiny_base, tiny_config
from torch import nn

from normlab.data import BatchLoader, build_data
from normlab.engine.distributed import all_reduce_sum, gather_strided
from normlab.engine.evaluate import Evaluation, evaluate_with_predictions
from normlab.errors import NormlabError
from normlab.models import build_model
from normlab.store import Predictions, RunDir
from normlab.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides: Any):
    """resnet20 on 128 synthetic 16x16 images (32 held out), 3 epochs with warm-up."""
    base = tiny_base(epochs=3, optim={"lr": 0.05, "warmup_epochs": 1})
    base["data"]["synthetic_samples"] = 128
    return tiny_config(base, **overrides)


def _arrays(p: Predictions) -> dict[str, Any]:
    return {
        "labels": p.labels.tolist(),
        "final": p.final.tolist(),
        "best": None if p.best is None else p.best.tolist(),
        "epochs": (p.final_epoch, p.best_epoch),
        "val_id": p.val_id,
    }


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pred") / "full"
    return fit(tiny(), out=out, verbose=False)


def test_the_predictions_are_what_the_recorded_accuracies_count(full_run):
    run = RunDir(full_run.run_dir)
    p = run.read_predictions()
    assert p is not None and run.predictions_path.name == "predictions.npz"
    data = build_data(full_run.config.data, seed=0)
    assert p.labels.dtype == np.uint8 and p.labels.tolist() == data.val_labels.tolist()
    assert p.val_id == data.val_id and p.num_classes == 4
    summary, rows = full_run.summary, full_run.metrics
    assert p.final_epoch == 3 and p.best_epoch == summary["best/epoch"]
    # exactly, not approximately: both count the same argmaxes
    assert p.accuracy("final") == summary["final/val/acc"] == rows[-1]["val/acc"]
    assert p.accuracy("best") == summary["best/val/acc"] == rows[p.best_epoch - 1]["val/acc"]
    # and they are the final model's own predictions, image by image
    model = run.build_model()
    model.load_state_dict(run.load_training_checkpoint().model)
    loader = BatchLoader.evaluation(
        data.val_images, data.val_labels, 7, mean=data.mean, std=data.std
    )
    with torch.no_grad():
        mine = torch.cat([model.eval()(x).argmax(1) for x, _ in loader])
    assert mine.tolist() == p.final.tolist()


def test_resume_keeps_the_predictions_right(full_run, tmp_path):
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(), out=cut, callbacks=[InterruptAt(epoch=3, step=2)], verbose=False)
    # a crash between the checkpoint and the predictions file: the file lags the checkpoint
    RunDir(cut).predictions_path.unlink()
    resumed = fit(None, out=cut, resume=True, verbose=False)
    assert stable(resumed.metrics) == stable(full_run.metrics)
    expected = _arrays(RunDir(full_run.run_dir).read_predictions())
    assert _arrays(RunDir(cut).read_predictions()) == expected
    # a crash after the last epoch's checkpoint, before its predictions: resume rewrites them
    run = RunDir(cut)
    stale = Predictions.build([0, 1], [1, 1], 1, 4)
    run.write_predictions(stale)
    run.write_summary({**run.read_summary(), "status": "running"})
    fit(None, out=cut, resume=True, verbose=False)
    assert _arrays(run.read_predictions()) == expected


def _evaluate_before_predictions(model, loader, autocast=None):
    """``normlab.engine.evaluate.evaluate`` as it was before predictions were kept (commit
    683da9c), verbatim but for this docstring and comments."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    try:
        with torch.no_grad():
            for x, y in loader:
                with autocast if autocast is not None else contextlib.nullcontext():
                    out = model(x)
                loss = nn.functional.cross_entropy(out.float(), y, reduction="sum")
                loss_sum += loss.detach().double()
                correct += (out.argmax(1) == y).sum()
                count += y.numel()
    finally:
        model.train(was_training)
    total_loss, total_correct, total = all_reduce_sum(
        [float(loss_sum), int(correct), count], device
    )
    if total == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    return {"loss": total_loss / total, "acc": total_correct / total}


def test_keeping_predictions_leaves_the_metrics_bit_identical(full_run, tmp_path, monkeypatch):
    """A run whose validation metrics come from the evaluation as it was before predictions
    were kept writes the same metrics.jsonl as a run of today's code, to the last bit."""

    def before(model, loader, autocast=None):
        old = _evaluate_before_predictions(model, loader, autocast)
        new = evaluate_with_predictions(model, loader, autocast)  # its predictions only
        return Evaluation(old["loss"], old["acc"], new.predictions)

    monkeypatch.setattr(sys.modules["normlab.train.fit"], "evaluate_with_predictions", before)
    fit(tiny(), out=tmp_path / "before", verbose=False)

    def rows(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return stable([json.loads(line) for line in lines])

    assert rows(tmp_path / "before") == rows(full_run.run_dir)


def test_a_run_resumed_from_a_checkpoint_older_than_predictions(tmp_path):
    """Final predictions from the first epoch it trains; the best epoch's only once an epoch
    it trained is the best (never another epoch's predictions under the best's name)."""
    old = tmp_path / "old"
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(), out=old, callbacks=[InterruptAt(epoch=2, step=2)], verbose=False)
    run = RunDir(old)  # make it look older: no predictions anywhere
    ckpt = run.load_checkpoint()
    run.save_checkpoint({k: v for k, v in ckpt.items() if k != "predictions"})
    run.predictions_path.unlink()
    fit(None, out=old, resume=True, verbose=False)
    p, summary = run.read_predictions(), run.read_summary()
    assert p is not None and p.final_epoch == 3
    assert p.accuracy("final") == summary["final/val/acc"]
    if summary["best/epoch"] == 1:  # trained by the "old" code
        assert p.best is None and p.best_epoch is None
    else:
        assert p.best_epoch == summary["best/epoch"]
        assert p.accuracy("best") == summary["best/val/acc"]


def test_the_file_round_trips_compactly_and_a_bad_one_is_named(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_predictions() is None
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 2000)
    final = np.where(rng.random(2000) < 0.4, labels, rng.integers(0, 10, 2000))
    p = Predictions.build(labels, torch.from_numpy(final), 30, 10, best=final, best_epoch=28)
    run.write_predictions(p)
    back = run.read_predictions()
    assert _arrays(back) == _arrays(p) and back.final.dtype == np.uint8
    assert os.path.getsize(run.predictions_path) < 6000  # 3 x 2,000 images, compressed
    assert Predictions.build([299], [3], 1, 300).labels.dtype == np.uint16
    assert Predictions.build([70000], [3], 1, 70001).labels.dtype == np.int32
    run.predictions_path.write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(NormlabError, match=r"predictions\.npz: not a readable predictions file"):
        run.read_predictions()
    np.savez(run.predictions_path, labels=labels)  # a .npz, but not one of ours
    with pytest.raises(NormlabError, match=r"predictions\.npz: .*missing final"):
        run.read_predictions()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _eval_model_and_data():
    torch.manual_seed(0)
    model = build_model("mlp", 4, in_channels=1, input_size=4, hidden=[8])
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (7, 1, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (7,), generator=g)
    return model.eval(), images, labels


def _loader(images, labels, batch_size):
    return BatchLoader.evaluation(images, labels, batch_size, mean=[0.5], std=[0.25])


def _shard_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, images, labels = _eval_model_and_data()
        loader = _loader(images[rank::world], labels[rank::world], 2)
        result = evaluate_with_predictions(model, loader)
        one = gather_strided(torch.tensor([5])[rank::world])  # shards of 1 and 0 elements
        if rank == 0:
            torch.save({"pred": result.predictions, "acc": result.acc, "one": one}, out)
    finally:
        dist.destroy_process_group()


def test_ranks_predictions_are_gathered_in_the_validation_sets_order(tmp_path):
    out = str(tmp_path / "rank0.pt")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_shard_worker, args=(r, 2, port, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0, f"worker exited with {proc.exitcode}"
    got = torch.load(out, weights_only=True)
    model, images, labels = _eval_model_and_data()
    whole = evaluate_with_predictions(model, _loader(images, labels, 3))
    assert got["pred"].tolist() == whole.predictions.tolist()  # 7 images: shards of 4 and 3
    assert got["acc"] == whole.acc
    assert got["one"].tolist() == [5]
