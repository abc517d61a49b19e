"""What the tests of whole Ray runs share (one node: tests/test_train_ray.py; network namespaces:
tests/test_multinode.py, and the cluster recipes): the tiny two-worker run's settings, the
environment that arms tests/fault_injection.py in the workers, and reading a run's checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent

# Two one-CPU workers with ZeRO-1 on the tiny model and shards, steps of 4 pairs; each test adds its
# own length, logging, checkpoint cadence and metrics port.
TINY_RUN: dict[str, Any] = {
    "data.batch_size": 4,
    "data.shuffle_buffer": 16,
    "train.lr": 1e-3,
    "train.warmup_steps": 2,
    "ray.num_workers": 2,
    "ray.max_failures": 2,
    "deepspeed.zero_stage": 1,
}


def run_overrides(model_dir: Path | str, shards: Path | str, **settings: Any) -> list[str]:
    """``key=value`` overrides of the tiny run on ``model_dir`` and ``shards``; ``settings`` (dotted
    keys, so passed as ``**{"train.max_steps": 8}``) add to or replace :data:`TINY_RUN`."""
    merged = {"model.name_or_path": str(model_dir), "data.shards": str(shards), **TINY_RUN, **settings}
    return [f"{k}={v}" for k, v in merged.items()]


def tiny_config(path: Path, model_dir: Path, shards: Path, **train: Any) -> Path:
    """The tiny run as a YAML config file (what the cluster recipes are handed; how many workers and
    failures they allow is the recipe's or its command line's): 6 steps, a checkpoint every 3
    (``every_steps``); ``train`` sets more of the ``train`` section."""
    every = train.pop("every_steps", 3)
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(model_dir)},
                "data": {"shards": str(shards), "batch_size": 4, "shuffle_buffer": 16},
                "train": {"max_steps": 6, "warmup_steps": 2, "log_every": 1, **train},
                "checkpoint": {"every_steps": every},
            }
        )
    )
    return path


def fault_env(spec: dict[str, Any]) -> dict[str, str]:
    """Driver environment that gives every Ray worker the fault ``spec`` of tests/fault_injection.py
    (through Ray's RAY_RUNTIME_ENV_HOOK; the workers import the hook from tests/)."""
    return {
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "RAY_RUNTIME_ENV_HOOK": "fault_injection.runtime_env_hook",
        "MLCTL_TEST_FAULT": json.dumps(spec),
    }


def slow_steps(seconds: float) -> dict[str, str]:
    """Driver environment that makes every worker's step ``seconds`` longer, so a test can scrape,
    signal or kill mid-run."""
    return fault_env({"sleep": seconds})


def latest_checkpoint(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    return root / (root / "latest").read_text().strip()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model weights of the run's latest checkpoint (ZeRO-1: rank 0's model states)."""
    path = latest_checkpoint(run_dir) / "engine" / "state" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def meta(run_dir: Path) -> dict:
    """meta.json of the run's latest checkpoint."""
    return json.loads((latest_checkpoint(run_dir) / "meta.json").read_text())
