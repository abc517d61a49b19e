"""`mlctl train --address`: join a Ray cluster started separately with `ray start` (on loopback)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ranks import free_port
from tiny_models import kill_marked

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"


@pytest.fixture
def ray_cluster():
    """A standalone Ray head (its own processes, not the test's), stopped afterwards.

    Its temp dir is short on purpose: Ray puts AF_UNIX sockets under it and those paths may not
    exceed 107 bytes, which pytest's deep tmp_path easily does. Teardown kills only the processes
    that carry this fixture's marker in their environment (never `ray stop`, which would stop
    every Ray on the machine).
    """
    port = free_port()
    marker = f"{os.getpid()}-{time.time_ns()}"
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": str(ROOT),
        "MLCTL_TEST_MARKER": marker,
    }
    temp = Path(tempfile.mkdtemp(prefix="mlctl-ray-", dir="/tmp"))
    start = [
        str(RAY),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=3",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    try:
        out = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            pytest.fail("ray start failed:\n" + out.stdout[-2000:] + out.stderr[-2000:])
        yield f"127.0.0.1:{port}", env
    finally:
        kill_marked("MLCTL_TEST_MARKER", marker)
        shutil.rmtree(temp, ignore_errors=True)


def test_train_joins_an_existing_cluster(tmp_path, ray_cluster, tiny_model_dir, tiny_shards):
    address, env = ray_cluster
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        "train",
        "--address",
        address,
        "--num-workers",
        "2",
        "--cpus-per-worker",
        "1",
        "--storage",
        str(tmp_path),
        "--name",
        "joined",
        f"model.name_or_path={tiny_model_dir}",
        f"data.shards={tiny_shards}",
        "data.batch_size=4",
        "train.max_steps=6",
        "checkpoint.every_steps=3",
        "metrics.port=19600",
    ]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert f"Connecting to existing Ray cluster at address: {address}" in text
    run = tmp_path / "joined"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    endpoints = [json.loads(p.read_text()) for p in sorted((run / "endpoints").glob("rank*.json"))]
    assert [e["rank"] for e in endpoints] == [0, 1]
    assert "metrics at http://127.0.0.1:" in text


def test_mlctl_stop_from_another_process_saves_and_stops_the_run(
    tmp_path, ray_cluster, tiny_model_dir, tiny_shards
):
    """`mlctl stop NAME --wait` (what a draining pod's preStop hook runs) reaches the run through
    the cluster: the run saves at the step it reached and the driver exits 143."""
    address, env = ray_cluster
    env = {
        **env,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "RAY_RUNTIME_ENV_HOOK": "fault_injection.runtime_env_hook",
        "MLCTL_TEST_FAULT": json.dumps({"sleep": 0.5}),
    }
    cmd = [
        sys.executable, "-m", "launcher.cli", "train", "--address", address, "--num-workers", "2",
        "--cpus-per-worker", "1", "--storage", str(tmp_path), "--name", "stopme",
        f"model.name_or_path={tiny_model_dir}", f"data.shards={tiny_shards}", "data.batch_size=4",
        "train.max_steps=200", "checkpoint.every_steps=0", "metrics.port=19650",
    ]  # fmt: skip
    log = tmp_path / "driver.log"
    with open(log, "w") as f:
        driver = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    metrics = tmp_path / "stopme" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count('"event": "train"') >= 3):
        if driver.poll() is not None or time.time() > deadline:
            pytest.fail("the run did not reach step 3:\n" + log.read_text()[-3000:])
        time.sleep(0.2)
    stop = [sys.executable, "-m", "launcher.cli", "stop", "--address", address]
    listed = subprocess.run(
        [*stop, "--all", "--wait", "0"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert "asked run stopme to stop" in listed.stdout, listed.stdout + listed.stderr
    waited = subprocess.run(
        [*stop, "stopme", "--wait", "120"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert waited.returncode == 0 and "run stopme saved" in waited.stdout, waited.stdout + waited.stderr
    assert driver.wait(timeout=120) == 143, log.read_text()[-3000:]
    text = log.read_text()
    step = int((tmp_path / "stopme" / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 3 <= step < 200
    assert f"stopped by mlctl stop at step {step}: checkpoint step_{step:08d} saved" in text, text[-3000:]
    missing = subprocess.run(
        [*stop, "nosuchrun"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 1 and "no run 'nosuchrun' is training on this cluster" in missing.stderr
