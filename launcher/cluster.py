"""Start or join Ray for a launch."""

from __future__ import annotations

import logging
import os
import secrets

from mlctl.config import Config

# Variables every worker needs, whatever the cluster's defaults.
WORKER_ENV = (
    "DS_ACCELERATOR",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "OMP_NUM_THREADS",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
)


def worker_env(cfg: Config, code_root: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    # NOTE: set, not defaulted: the accelerator follows what the workers are given, not the
    # driver's environment (a CPU-only head node exporting DS_ACCELERATOR=cpu, as the Makefile does
    # without a GPU, would otherwise put GPU workers on DeepSpeed's CPU accelerator).
    env["DS_ACCELERATOR"] = "cuda" if cfg.ray.gpus_per_worker > 0 else "cpu"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", str(max(1, int(cfg.ray.cpus_per_worker))))
    # NCCL: a collective that times out (ray.collective_timeout_s) fails the worker instead of
    # blocking it; Ray Train then restarts the group from the newest checkpoint.
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [code_root, os.environ.get("PYTHONPATH", "")] if p)
    return env


def connect(cfg: Config, runtime_env: dict, num_cpus: int | None = None) -> bool:
    """Join ``ray.address`` or start an embedded Ray on loopback; True when this call started it
    (then the launch shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, runtime_env=runtime_env, log_to_driver=True)
        return True
    need = int(cfg.ray.max_workers * cfg.ray.cpus_per_worker) + 1
    if need - 1 > (os.cpu_count() or 1) and not num_cpus:
        print(
            f"[mlctl] warning: {cfg.ray.num_workers} workers x {cfg.ray.cpus_per_worker:g} CPU on a "
            f"machine with {os.cpu_count()} CPUs: they will share cores and run slower than fewer "
            "workers would",
            flush=True,
        )
    # NOTE: the embedded Ray stays on loopback; nothing of a local run listens elsewhere.
    ray.init(
        num_cpus=num_cpus or max(need, os.cpu_count() or 1),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=True,
        logging_level=logging.WARNING,  # "Started a local Ray instance" and the like
    )
    return True


def prepare_embedded(cfg: Config) -> None:
    """Before ``ray`` is first imported, for an embedded Ray: loopback only, and token auth."""
    if cfg.ray.address:
        return
    # NOTE: read when ray is first imported: keeps an embedded Ray (GCS, raylet, workers) on
    # 127.0.0.1 instead of the machine's outward address. Joining a cluster leaves it alone.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    embedded_ray_auth()


def embedded_ray_auth() -> None:
    """Token auth for an embedded Ray without a token file.

    NOTE: Ray (2.5x+) turns token auth on for a new local cluster, writes a fresh token to
    ``~/.ray/auth_token`` and warns about it. That file then switches every later Ray on the machine
    (other users' included) to token auth. A token in the environment of this process (inherited by
    the Ray processes it starts) keeps the embedded cluster protected without the file or the
    warning. An explicit RAY_AUTH_MODE or token is left as it is."""
    if "RAY_AUTH_MODE" in os.environ or "RAY_AUTH_TOKEN" in os.environ:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
