"""The ray executor on a local Ray instance that the test starts (``ray start --head``), reached
with ``--ray-address``: same runs, same numbers as the local executor."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from _helpers import stable, subprocess_env, tiny_base

from normlab.store import RunDir
from normlab.study.runner import read_state, run_study
from normlab.study.spec import load_spec

pytest.importorskip("ray", reason="Ray is not installed (pip install 'normlab[ray]')")

pytestmark = pytest.mark.slow

SPEC = {
    "name": "ray-tiny",
    "seeds": 2,
    "base": tiny_base(model={"name": "mlp", "hidden": [64]}),
    "variants": {"bn": {"norm.name": "bn"}, "ln": {"norm.name": "ln"}},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ray_cluster(tmp_path):
    """A one-node Ray cluster in the foreground of a child process (stopped with it), with
    token authentication on a fresh token that the driver is given too."""
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.is_file():
        pytest.skip(f"the ray command line is not next to {sys.executable}")
    port = _free_port()
    env = subprocess_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    # Ray's socket paths must stay under 107 bytes: a short temporary directory of our own
    temp = Path(tempfile.mkdtemp(prefix="nlray-", dir="/tmp"))
    log = (tmp_path / "ray.log").open("w")
    head = subprocess.Popen(
        [
            str(ray_bin),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
            "--block",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (tmp_path / "ray.log").read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ray start failed:\n" + (tmp_path / "ray.log").read_text()[-3000:])
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", env
    finally:
        head.send_signal(signal.SIGTERM)  # ray start --block stops the cluster it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_executor_runs_the_study_on_a_ray_cluster(ray_cluster, tmp_path):
    address, env = ray_cluster
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    out = tmp_path / "on-ray"
    cmd = [sys.executable, "-m", "normlab", "study", str(path), "--out", str(out)]
    cmd += ["--executor", "ray", "--ray-address", address, "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = read_state(out)
    assert state is not None and state["counts"] == {"completed": 4}
    saved = yaml.safe_load((out / "study.yaml").read_text())
    assert saved["meta"]["executor"] == "ray"
    assert (out / "report.html").is_file()
    # the same numbers as this machine's serial executor (1 thread each)
    reference = tmp_path / "serial"
    run_study(load_spec(path), reference, executor="serial", stream=None)
    for key in state["runs"]:
        got = RunDir(out / "runs" / key).read_metrics()
        want = RunDir(reference / "runs" / key).read_metrics()
        assert stable(got) == stable(want)
    # finished runs are skipped on a rerun through Ray as well
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
