"""Several processes on CPU (gloo): DDP equals one process on the same global batch, SyncBN,
dist_bn reconciliation, and a rank that dies ends the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import subprocess_env
from torch import nn

from normlab.bn.convert import sync_to_batchnorm
from normlab.cli import main
from normlab.config import config_from_dict
from normlab.engine.distributed import reconcile_batchnorm, wrap_ddp
from normlab.errors import ConfigError
from normlab.models import build_model
from normlab.norms.sync import SyncBatchNorm, convert_sync_batchnorm
from normlab.store import RunDir
from normlab.train import fit


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model_and_batch():
    torch.manual_seed(0)
    model = build_model("resnet20", 4, in_channels=3, input_size=16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 16, 16, generator=g)
    y = torch.randint(0, 4, (16,), generator=g)
    return model, x, y


def _grad_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, x, y = _model_and_batch()
        model = convert_sync_batchnorm(model, torch.device("cpu"))
        ddp = wrap_ddp(model, torch.device("cpu"))
        xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
        nn.functional.cross_entropy(ddp(xs), ys).backward()
        state = {f"grad/{n}": p.grad for n, p in model.named_parameters()}
        state.update({f"buf/{n}": b for n, b in model.named_buffers()})
        torch.save(state, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _spawn(target, world: int, *args) -> None:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"


def test_syncbn_ddp_gradients_equal_single_process_on_the_global_batch(tmp_path):
    _spawn(_grad_worker, 2, str(tmp_path / "g"))
    model, x, y = _model_and_batch()
    nn.functional.cross_entropy(model(x), y).backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"g.{rank}")
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[f"grad/{name}"], p.grad, rtol=1e-4, atol=1e-6)
        for name, b in model.named_buffers():  # running stats of the global batch
            torch.testing.assert_close(got[f"buf/{name}"], b, rtol=1e-5, atol=1e-6)


def _reconcile_worker(rank: int, world: int, port: int, mode: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        bn = nn.BatchNorm2d(3)
        bn(torch.randn(4, 3, 5, 5) * (rank + 1) + rank)  # different statistics per rank
        before = (bn.running_mean.clone(), bn.running_var.clone())
        reconcile_batchnorm(bn, mode)
        torch.save({"before": before, "after": (bn.running_mean, bn.running_var)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["reduce", "broadcast", "none"])
def test_dist_bn_reconciles_running_statistics(tmp_path, mode):
    _spawn(_reconcile_worker, 2, mode, str(tmp_path / "r"))
    r0, r1 = (torch.load(tmp_path / f"r.{k}") for k in range(2))
    if mode == "none":
        for k in range(2):
            assert not torch.equal(r0["after"][k], r1["after"][k])
        return
    for k in range(2):
        assert torch.equal(r0["after"][k], r1["after"][k])  # identical on all ranks
        expected = (r0["before"][k] + r1["before"][k]) / 2 if mode == "reduce" else r0["before"][k]
        torch.testing.assert_close(r0["after"][k], expected)


# Flips on (synthetic's default is off): the processes must also agree on every flip draw.
FAST = [
    "--data", "synthetic", "--set", "data.synthetic_samples=128",
    "--set", "data.synthetic_image_size=16", "--set", "data.synthetic_classes=4",
    "--set", "data.val_split=0.25", "--set", "data.flip=true", "--batch-size", "16",
    "--set", "runtime.progress=off", "--set", "runtime.precision=fp32", "--quiet",
]  # fmt: skip


def _why(proc: subprocess.CompletedProcess) -> str:
    """A failed job's stderr: a rank's own error comes first, torchrun's summary last."""
    err = proc.stderr
    return err if len(err) <= 6000 else f"{err[:4000]}\n[...]\n{err[-2000:]}"


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["gn", "syncbn"])
def test_two_processes_train_like_one_on_the_same_global_batch(tmp_path, norm):
    extra = (
        ["--norm", "gn", "--set", "norm.gn_groups=4"] if norm == "gn" else ["--set", "sync_bn=true"]
    )
    env = subprocess_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "normlab", "train", *FAST, "--epochs", "2", *extra]
    two = subprocess.run(
        [*cmd, "--devices", "2", "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, _why(two)
    single = [a for a in extra if a != "sync_bn=true"]
    single = single[:-1] if single and single[-1] == "--set" else single
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "normlab",
            "train",
            *FAST,
            "--epochs",
            "2",
            *single,
            "--out",
            str(tmp_path / "one"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, _why(one)
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["epoch"] for r in b] == [1, 2]
    # GN: no cross-sample coupling, the only difference is summation order -> tight, every
    # epoch. SyncBN: the same math with another reduction order; one step agrees to 1e-6
    # (test above), but BN at lr 0.05 amplifies rounding chaotically over steps, so only the
    # first epoch is compared.
    tol = 1e-4 if norm == "gn" else 1e-3
    for ra, rb in zip(a if norm == "gn" else a[:1], b, strict=False):
        for key in ("train/loss", "train/acc"):
            assert rb[key] == pytest.approx(ra[key], rel=tol, abs=tol), (key, ra, rb)
    cfg = (tmp_path / "two" / "config.yaml").read_text()
    assert "world_size: 2" in cfg
    # rank 0 keeps every validation image's prediction, gathered from both ranks' shards
    kept = RunDir(tmp_path / "two").read_predictions()
    assert kept is not None and kept.n == RunDir(tmp_path / "one").read_predictions().n
    assert kept.accuracy("final") == b[-1]["val/acc"]


def test_sync_bn_without_a_process_group_is_refused(tmp_path):
    cfg = config_from_dict({
        "data": {"name": "synthetic", "synthetic_samples": 64, "synthetic_image_size": 16},
        "sync_bn": True, "batch_size": 16, "runtime": {"progress": "off"},
    })  # fmt: skip
    with pytest.raises(ConfigError, match="sync_bn=true needs several processes"):
        fit(cfg, out=tmp_path / "r", verbose=False)


def test_too_many_devices_is_a_clear_error(tmp_path, capsys):
    assert main(["train", *FAST, "--devices", "64", "--out", str(tmp_path / "r")]) == 2
    assert "--devices 64 but this machine has" in capsys.readouterr().err


def test_sync_bn_refuses_renorm_and_reverts_to_the_original_type():
    model = build_model("mlp", 3, norm="bn", in_channels=1, input_size=4, hidden=(8,))
    synced = convert_sync_batchnorm(model, torch.device("cpu"))
    assert any(isinstance(m, SyncBatchNorm) for m in synced.modules())
    reverted = sync_to_batchnorm(synced)
    assert [
        type(m) for m in reverted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ] == [nn.BatchNorm1d]
    reverted.eval()
    assert reverted(torch.randn(2, 1, 4, 4)).shape == (2, 3)
    brn = build_model("resnet20", 3, norm="brn", input_size=16)
    with pytest.raises(ConfigError, match="sync_bn supports plain BatchNorm"):
        convert_sync_batchnorm(brn, torch.device("cpu"))


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _rank_of(pid: int) -> str | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return item[5:].decode()
    return None


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_with_a_clear_error(tmp_path):
    env = subprocess_env(OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "normlab", "train", *FAST, "--epochs", "50", "--devices", "2",
         "--set", "runtime.dist_timeout=30", "--out", str(tmp_path / "r")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        victim = None
        while time.time() < deadline and victim is None:
            if (tmp_path / "r" / "metrics.jsonl").exists():  # training is under way
                workers = [k for c in _children(proc.pid) for k in _children(c)]
                victim = next((w for w in workers if _rank_of(w) == "1"), None)
            time.sleep(0.2)
        assert victim is not None, "rank 1 never started training"
        os.kill(victim, signal.SIGKILL)
        t0 = time.time()
        _, err = proc.communicate(timeout=90)
        assert proc.returncode != 0
        assert time.time() - t0 < 90
        assert "process job failed" in err and "a rank that stops ends the others" in err
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] in ("running", "failed")  # resumable: checkpoints are intact
    assert (tmp_path / "r" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_dist_bn_none_keeps_every_ranks_statistics(tmp_path):
    env = subprocess_env(OMP_NUM_THREADS="1")
    out = tmp_path / "r"
    proc = subprocess.run(
        [sys.executable, "-m", "normlab", "train", *FAST, "--epochs", "1", "--devices", "2",
         "--set", "dist_bn=none", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, _why(proc)
    r0, r1 = (torch.load(out / f"bn_buffers.rank{r}.pt", weights_only=True) for r in range(2))
    assert r0.keys() == r1.keys() and "bn1.running_mean" in r0
    # each rank normalised a different half of every batch: its statistics differ
    assert not torch.equal(r0["bn1.running_mean"], r1["bn1.running_mean"])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert torch.equal(ckpt["model"]["bn1.running_mean"], r0["bn1.running_mean"])


def test_sync_bn_conversion_keeps_frozen_parameters_frozen():
    model = build_model("resnet20", 3, norm="bn", input_size=16)
    model.bn1.weight.requires_grad_(False)
    synced = convert_sync_batchnorm(model, torch.device("cpu"))
    assert synced.bn1.weight.requires_grad is False and synced.bn1.bias.requires_grad is True
    assert sync_to_batchnorm(synced).bn1.weight.requires_grad is False
