"""Fault injection for the tests; production code has no fault hooks.

A fault spec (JSON in ``MLCTL_TEST_FAULT``):

- ``{"step": N, "rank": R, "marker": PATH}``: rank R's process SIGKILLs itself when it has done the
  micro-batches of step N (before the step's all-reduce), once per run (the marker file remembers
  that it fired); ``"always": true`` fires on every attempt.
- ``{"event": "save", "step": N}``: die after the DeepSpeed engine state of step N is written,
  before the data state and the publication (an interrupted save).
- ``"sleep": S``: every step takes S seconds longer (so a test can scrape or kill mid-run).

Standalone workers (tests/engine_worker.py) call :func:`install` themselves. Under Ray, the driver
sets ``RAY_RUNTIME_ENV_HOOK=fault_injection.runtime_env_hook`` (Ray's own hook for editing the job's
runtime environment in ``ray.init``), which makes every Ray worker process run :func:`setup_worker`
at start-up.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

ENV = "MLCTL_TEST_FAULT"
HERE = str(Path(__file__).resolve().parent)


def spec_from_env() -> dict[str, Any] | None:
    return json.loads(os.environ.get(ENV) or "null")


def _die(spec: dict[str, Any], step: int) -> None:
    if "marker" in spec:
        with open(spec["marker"], "a") as f:
            f.write(f"{step}\n")
    os.kill(os.getpid(), 9)


def _armed(spec: dict[str, Any], event: str, rank: int, step: int) -> bool:
    if "step" not in spec or spec.get("event", "step") != event:
        return False
    if rank != spec.get("rank", 0) or step != spec["step"]:
        return False
    return bool(spec.get("always")) or "marker" not in spec or not Path(spec["marker"]).exists()


def install(spec: dict[str, Any] | None) -> None:
    """Patch :class:`mlctl.engine.Trainer` in this process according to ``spec``."""
    if not spec:
        return
    from mlctl.engine import Trainer

    micro_step, setup = Trainer.micro_step, Trainer.setup

    def faulty_micro_step(self, batch, micro):
        out = micro_step(self, batch, micro)
        if micro == self.cfg.train.grad_accum - 1:
            if spec.get("sleep"):
                time.sleep(float(spec["sleep"]))
            if _armed(spec, "step", self.rank, self.state.step):
                _die(spec, self.state.step)
        return out

    def faulty_setup(self):
        setup(self)
        engine_save = self.engine.save_checkpoint

        def save_checkpoint(*args, **kwargs):
            out = engine_save(*args, **kwargs)
            if _armed(spec, "save", self.rank, self.state.step):
                _die(spec, self.state.step)
            return out

        self.engine.save_checkpoint = save_checkpoint

    Trainer.micro_step, Trainer.setup = faulty_micro_step, faulty_setup


def setup_worker() -> None:
    """Ray ``worker_process_setup_hook``: the launcher's own hook, then the faults."""
    from launcher.worker import quiet_ray_logs

    quiet_ray_logs()
    install(spec_from_env())


def runtime_env_hook(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """``RAY_RUNTIME_ENV_HOOK``: run :func:`setup_worker` in every worker, with this folder on the
    workers' path and the fault spec in their environment."""
    env = dict(runtime_env or {})
    env_vars = dict(env.get("env_vars") or {})
    env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env_vars.get("PYTHONPATH", "")) if p)
    if os.environ.get(ENV):
        env_vars[ENV] = os.environ[ENV]
    env["env_vars"] = env_vars
    env["worker_process_setup_hook"] = "fault_injection.setup_worker"
    return env
