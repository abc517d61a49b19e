"""Fault tolerance end to end: real Ray, 2 CPU workers, DeepSpeed ZeRO-1, gloo, real shards."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from ray_runs import ROOT, fault_env, final_weights, meta, run_overrides, slow_steps
from tiny_models import kill_marked, processes_marked

from mlctl.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MAX_STEPS = 12
EVERY = 4


# This module's runs: 12 steps, checkpoints every 4 (5 kept), pair ids logged for the replay checks.
RUN = {
    "train.max_steps": MAX_STEPS,
    "train.log_every": 4,
    "train.log_pair_ids": True,
    "checkpoint.every_steps": EVERY,
    "checkpoint.keep_last": 5,
    "metrics.port": 19400,
}


def overrides(model_dir: Path, shards: Path, storage: Path, **extra) -> list[str]:
    return run_overrides(model_dir, shards, **{**RUN, "ray.storage_path": str(storage), **extra})


@pytest.fixture
def faults(monkeypatch):
    """``faults(spec)``: the next ``launch`` in this test runs its workers with that fault spec
    (tests/fault_injection.py, through Ray's RAY_RUNTIME_ENV_HOOK)."""

    def arm(spec: dict) -> None:
        monkeypatch.setenv("RAY_RUNTIME_ENV_HOOK", "fault_injection.runtime_env_hook")
        monkeypatch.setenv("MLCTL_TEST_FAULT", json.dumps(spec))

    return arm


def pair_log(run_dir: Path) -> dict[int, list[dict]]:
    """rank -> records in the order they were written (several attempts interleave by time)."""
    out = {}
    for f in sorted((run_dir / "pair_ids").glob("rank*.jsonl")):
        out[int(f.stem[4:])] = [json.loads(line) for line in f.read_text().splitlines()]
    return out


def step_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of the surviving timeline (the last record of a redone step)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "train":
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_model_dir, tiny_shards):
    """An uninterrupted run, scraped over HTTP while it trains (steps slowed to be scrapeable)."""
    from launcher.ray_train import launch
    from mlctl.metrics import scrape

    storage = tmp_path_factory.mktemp("clean")
    cfg = load_config(None, overrides(tiny_model_dir, tiny_shards, storage, **{"ray.name": "clean"}))
    scrapes: list[dict] = []
    errors: list[BaseException] = []

    def scraper():
        ep_dir = storage / "clean" / "endpoints"
        deadline = time.time() + 240
        try:
            while time.time() < deadline and len(scrapes) < 2:
                eps = sorted(ep_dir.glob("rank*.json")) if ep_dir.is_dir() else []
                if len(eps) == 2:
                    urls = [json.loads(e.read_text())["url"] for e in eps]
                    try:
                        snap = {u: scrape(u) for u in urls}
                    except OSError:
                        time.sleep(0.2)
                        continue
                    if all(s.get("mlctl_train_steps_total") for s in snap.values()):
                        scrapes.append(snap)
                        time.sleep(1.5)
                        continue
                time.sleep(0.2)
        except BaseException as e:  # surfaced by the test
            errors.append(e)

    t = threading.Thread(target=scraper, daemon=True)
    t.start()
    with pytest.MonkeyPatch.context() as mp:  # module scope: no function-scoped monkeypatch
        for k, v in slow_steps(0.4).items():
            mp.setenv(k, v)
        run_dir = launch(cfg)
    t.join(timeout=5)
    return {"run_dir": run_dir, "scrapes": scrapes, "errors": errors}


def test_uninterrupted_run_exports_metrics(clean_run):
    assert not clean_run["errors"], clean_run["errors"]
    scrapes = clean_run["scrapes"]
    assert len(scrapes) == 2, "could not scrape both workers twice during the run"
    first, second = scrapes
    assert len(first) == 2
    expected = {
        "mlctl_train_loss",
        "mlctl_train_contrastive_loss",
        "mlctl_train_mlm_loss",
        "mlctl_train_steps_total",
        "mlctl_train_samples_total",
        "mlctl_train_tokens_total",
        "mlctl_train_samples_per_second",
        "mlctl_train_step_seconds",
        "mlctl_data_wait_seconds",
        "mlctl_train_lr",
        "mlctl_train_grad_norm",
        "mlctl_train_global_batch_size",
        "mlctl_train_inbatch_accuracy",
        "mlctl_restarts_total",
    }
    for url, families in first.items():
        assert expected <= set(families), f"{url} lacks {expected - set(families)}"
        steps1 = sum(v for _, v in families["mlctl_train_steps_total"])
        steps2 = sum(v for _, v in second[url]["mlctl_train_steps_total"])
        samples1 = sum(v for _, v in families["mlctl_train_samples_total"])
        samples2 = sum(v for _, v in second[url]["mlctl_train_samples_total"])
        assert steps2 > steps1 and samples2 > samples1, "counters did not grow between scrapes"
        for labels, value in second[url]["mlctl_train_loss"]:
            assert {"run", "rank", "node"} <= set(labels)
            assert "step" not in labels
            assert value == value and abs(value) < 1e6  # finite
    m = meta(clean_run["run_dir"])
    assert m["step"] == MAX_STEPS and m["restarts"] == 0
    sd = json.loads((clean_run["run_dir"] / "prometheus_sd.json").read_text())
    assert len(sd) == 2 and all(e["labels"]["run"] == "clean" for e in sd)


def test_worker_sigkill_resumes_without_losing_pairs_and_matches_bitwise(
    tmp_path, clean_run, tiny_model_dir, tiny_shards, faults, capsys
):
    from launcher.ray_train import launch

    kill_step = random.Random().randint(EVERY + 1, MAX_STEPS - 1)  # after the first checkpoint
    cfg = load_config(None, overrides(tiny_model_dir, tiny_shards, tmp_path, **{"ray.name": "killed"}))
    faults({"step": kill_step, "rank": 1, "marker": str(tmp_path / "fired")})
    run_dir = launch(cfg)
    assert (tmp_path / "fired").read_text().split() == [str(kill_step)]
    assert "finished; 1 worker failure(s) recovered" in capsys.readouterr().out

    m = meta(run_dir)
    assert m["step"] == MAX_STEPS
    assert m["restarts"] == 1, "the restart was not counted"

    # Pair ids: the surviving timeline (last record per step) equals the clean run's, so none is
    # lost; the only repeats are the steps redone after the checkpoint before the kill.
    last_ckpt = (kill_step // EVERY) * EVERY
    clean_log = pair_log(clean_run["run_dir"])
    for rank, records in pair_log(run_dir).items():
        by_step: dict[int, list[list[str]]] = {}
        for rec in records:
            by_step.setdefault(rec["step"], []).append(rec["pair_ids"])
        assert sorted(by_step) == list(range(1, MAX_STEPS + 1))
        redone = {s for s, seen in by_step.items() if len(seen) > 1}
        assert redone <= set(range(last_ckpt + 1, kill_step + 1)), (rank, redone, kill_step)
        for s, seen in by_step.items():
            assert all(ids == seen[0] for ids in seen), f"step {s} redone with other pairs"
        clean_by_step = {rec["step"]: rec["pair_ids"] for rec in clean_log[rank]}
        assert {s: seen[-1] for s, seen in by_step.items()} == clean_by_step

    # Same losses step by step and the same final weights as the uninterrupted run, bitwise (CPU,
    # fixed seeds, same world size).
    clean_losses, losses = step_losses(clean_run["run_dir"]), step_losses(run_dir)
    assert losses == clean_losses, f"kill at {kill_step}: per-step losses differ {clean_losses} vs {losses}"
    a, b = final_weights(clean_run["run_dir"]), final_weights(run_dir)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"kill at {kill_step}: weights differ after kill+resume: {different[:5]}"


def _train_cmd(model_dir, shards, storage, name, *extra):
    return [
        sys.executable,
        "-m",
        "launcher.cli",
        "train",
        *overrides(model_dir, shards, storage, **{"ray.name": name, "train.max_steps": 16}),
        *extra,
    ]


def test_driver_killed_and_rerun_resumes(tmp_path, tiny_model_dir, tiny_shards):
    marker = f"{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, **slow_steps(0.5), "MLCTL_TEST_MARKER": marker}
    cmd = _train_cmd(tiny_model_dir, tiny_shards, tmp_path, "driver") + ["train.log_every=1"]
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    latest = tmp_path / "driver" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not latest.exists():
        if proc.poll() is not None:
            pytest.fail("driver finished before it could be killed:\n" + proc.stdout.read().decode()[-3000:])
        time.sleep(0.3)
    assert latest.exists(), "no checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded Ray it started
    proc.wait(timeout=30)
    # Ray's own processes notice the dead driver within seconds; workers may still finish a save
    # meanwhile. Wait until the processes this command spawned are gone (found by the marker in their
    # environment, so other Ray instances on the machine do not count), then the newest checkpoint
    # is where a re-run must start.
    deadline = time.time() + 90
    while time.time() < deadline and processes_marked("MLCTL_TEST_MARKER", marker):
        time.sleep(0.5)
    left = processes_marked("MLCTL_TEST_MARKER", marker)
    kill_marked("MLCTL_TEST_MARKER", marker)
    assert not left, f"Ray processes outlived the killed driver: {left}"
    first = int(latest.read_text().strip().split("_")[1])
    assert first < 16

    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    log_text = out.stdout + out.stderr
    (tmp_path / "rerun.log").write_text(log_text)  # the whole log, for a failure's post-mortem
    assert out.returncode == 0, log_text[-4000:]
    assert "resumed from" in log_text, log_text[-4000:]
    m = meta(tmp_path / "driver")
    assert m["step"] == 16 and m["restarts"] >= 1
    # The second run started at a checkpoint, not at step 1.
    records = pair_log(tmp_path / "driver")[0]
    second_attempt = [r["step"] for r in records if r["restarts"] >= 1]
    assert second_attempt and second_attempt[0] == first + 1


def test_more_failures_than_allowed_reports_count_and_checkpoint(
    tmp_path, tiny_model_dir, tiny_shards, faults
):
    from launcher.ray_train import launch

    cfg = load_config(
        None,
        overrides(tiny_model_dir, tiny_shards, tmp_path, **{"ray.name": "doomed", "ray.max_failures": 1}),
    )
    faults({"step": 6, "rank": 0, "marker": str(tmp_path / "fired"), "always": True})
    with pytest.raises(RuntimeError) as info:
        launch(cfg)
    msg = str(info.value)
    assert "2 worker failure(s)" in msg and "max_failures=1" in msg
    assert str(tmp_path / "doomed" / "checkpoints" / "step_00000004") in msg
    assert (tmp_path / "fired").read_text().split() == ["6", "6"]


def test_object_store_checkpoints_survive_a_killed_worker(
    tmp_path, clean_run, tiny_model_dir, tiny_shards, faults, s3_bucket, capfd
):
    """No shared filesystem: checkpoints go to S3 through Ray's persistence, a SIGKILLed worker's
    replacement downloads the newest one, and the run ends with the uninterrupted run's weights."""
    import io
    import shutil
    import uuid

    from launcher.ray_train import launch

    name = f"s3-{uuid.uuid4().hex[:8]}"  # the local working folder lives in the temp dir
    kill_step = 6
    cfg = load_config(
        None,
        overrides(
            tiny_model_dir,
            tiny_shards,
            tmp_path,
            **{"ray.name": name, "ray.storage_path": s3_bucket.uri("runs")},
        ),
    )
    faults({"step": kill_step, "rank": 1, "marker": str(tmp_path / "fired")})
    run_dir = launch(cfg)
    try:
        assert (tmp_path / "fired").read_text().split() == [str(kill_step)]
        # The replacement workers resumed from the copy they downloaded, not from a local folder,
        # and the node keeps neither that copy nor its staged checkpoints once Ray has them.
        out = capfd.readouterr()
        assert f"resumed from {run_dir}/restored/step_{EVERY:08d} at step {EVERY}" in out.out + out.err
        assert not any((run_dir / "restored").iterdir())
        assert not [p.name for p in (run_dir / "checkpoints").iterdir() if "step_" in p.name]
        fs, base = s3_bucket.filesystem(), f"{s3_bucket.name}/runs/{name}/step_{MAX_STEPS:08d}"
        with fs.open_input_file(f"{base}/meta.json") as f:
            m = json.loads(f.read())
        assert m["step"] == MAX_STEPS and m["restarts"] == 1
        with fs.open_input_file(f"{base}/engine/state/mp_rank_00_model_states.pt") as f:
            weights = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)["module"]
        for r in range(2):  # every rank uploaded its own shard and data state
            assert fs.get_file_info(f"{base}/data_state_rank{r:05d}.json").size > 0
        a = final_weights(clean_run["run_dir"])
        different = [k for k in a if not torch.equal(a[k], weights[k])]
        assert not different, f"weights differ after kill + resume through S3: {different[:5]}"
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _driver(cmd: list[str], log: Path, fault: dict | None = None) -> subprocess.Popen:
    full = {**os.environ, **fault_env(fault or {})}
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd, env=full, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def _steps_done(run_dir: Path) -> int:
    path = run_dir / "pair_ids" / "rank00000.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _wait_steps(proc, run_dir: Path, n: int, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and _steps_done(run_dir) < n:
        if proc.poll() is not None:
            pytest.fail(f"driver exited ({proc.returncode}) before step {n}:\n" + log.read_text()[-3000:])
        time.sleep(0.2)


def test_sigterm_saves_at_the_step_it_stopped_on_and_the_rerun_ends_where_a_clean_run_ends(
    tmp_path, clean_run, tiny_model_dir, tiny_shards
):
    """A stop is a save: SIGTERM mid-run -> every rank finishes its step, the run saves there and
    exits 143; the same command resumes from that step and ends with the uninterrupted run's weights."""
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        "train",
        *overrides(tiny_model_dir, tiny_shards, tmp_path, **{"ray.name": "stopped"}),
    ]
    run_dir = tmp_path / "stopped"
    log = tmp_path / "driver.log"
    proc = _driver(cmd, log, {"sleep": 0.5})
    _wait_steps(proc, run_dir, EVERY + 2, log)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    stop_seconds = time.monotonic() - t0
    text = log.read_text()
    assert proc.returncode == 143, text[-3000:]
    stopped_at = _steps_done(run_dir)
    assert EVERY + 2 <= stopped_at < MAX_STEPS
    # the newest checkpoint is the step the run stopped on, not the periodic one before it
    assert meta(run_dir)["step"] == stopped_at, text[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    assert f"stopped by SIGTERM at step {stopped_at}: checkpoint step_{stopped_at:08d} saved" in text
    assert "stopping after the current step and saving a checkpoint" in text
    print(f"\nmeasured: SIGTERM -> driver exit 143 after the save: {stop_seconds:.1f} s")

    again = _driver(cmd, tmp_path / "rerun.log")
    again.wait(timeout=400)
    rerun = (tmp_path / "rerun.log").read_text()
    assert again.returncode == 0, rerun[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in rerun
    a, b = final_weights(clean_run["run_dir"]), final_weights(run_dir)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after a stop at {stopped_at} and a resume: {different[:5]}"


def test_ctrl_c_twice_aborts_without_waiting(tmp_path, tiny_model_dir, tiny_shards):
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli",
        "train",
        *overrides(tiny_model_dir, tiny_shards, tmp_path, **{"ray.name": "twice"}),
    ]
    run_dir = tmp_path / "twice"
    log = tmp_path / "driver.log"
    # slow steps: the first Ctrl-C cannot be honoured before the second arrives
    proc = _driver(cmd, log, {"sleep": 5.0})
    _wait_steps(proc, run_dir, 1, log)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    text = log.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert "SIGINT: stopping after the current step" in text
    assert "SIGINT again: aborting now, without waiting for the save" in text
    assert (
        "aborted (second signal (SIGINT) during the stop); the same command resumes it from the start" in text
    )
    assert "Traceback" not in text, text[-3000:]
