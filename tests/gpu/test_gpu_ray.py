"""Ray on one GPU node: 30 steps on up to 2 GPU workers (NCCL, bf16), one worker SIGKILLed after a
checkpoint, the run resumed by Ray and finished. Reuses test_train_ray's configuration and readers."""

from __future__ import annotations

import json
import random

import pytest
from gpu_util import cuda_devices
from test_train_ray import meta, overrides, pair_log, step_losses

from mlctl.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS, EVERY = 30, 10


def test_ray_gpu_run_survives_a_killed_worker(tmp_path, monkeypatch, tiny_model_dir, tiny_shards):
    from launcher.ray_train import launch

    workers = min(2, cuda_devices())
    kill_step = random.Random().randint(EVERY + 1, STEPS - 1)  # after the first checkpoint
    cfg = load_config(
        None,
        overrides(
            tiny_model_dir,
            tiny_shards,
            tmp_path,
            **{
                "ray.name": "gpu-killed",
                "ray.num_workers": workers,
                "ray.gpus_per_worker": 1,
                "deepspeed.precision": "bf16",
                "train.max_steps": STEPS,
                "checkpoint.every_steps": EVERY,
            },
        ),
    )
    spec = {"step": kill_step, "rank": workers - 1, "marker": str(tmp_path / "fired")}
    monkeypatch.setenv("RAY_RUNTIME_ENV_HOOK", "fault_injection.runtime_env_hook")  # tests/fault_injection.py
    monkeypatch.setenv("MLCTL_TEST_FAULT", json.dumps(spec))
    run_dir = launch(cfg)
    assert (tmp_path / "fired").read_text().split() == [str(kill_step)]
    m = meta(run_dir)
    assert m["step"] == STEPS and m["restarts"] == 1

    # Every step is there and the steps redone after the resume saw the same pairs. Losses are not
    # compared bitwise as on the CPU: GPU kernels need not be reproducible run to run.
    last_ckpt = (kill_step // EVERY) * EVERY
    for rank, records in pair_log(run_dir).items():
        by_step: dict[int, list[list[str]]] = {}
        for rec in records:
            by_step.setdefault(rec["step"], []).append(rec["pair_ids"])
        assert sorted(by_step) == list(range(1, STEPS + 1)), rank
        redone = {s for s, seen in by_step.items() if len(seen) > 1}
        assert redone <= set(range(last_ckpt + 1, kill_step + 1)), (rank, redone, kill_step)
        assert all(all(ids == seen[0] for ids in seen) for seen in by_step.values())
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(abs(v) < 1e6 for v in losses.values())
