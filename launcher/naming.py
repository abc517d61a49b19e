"""Run names and run folders.

A run is named by what shapes it (:func:`run_identity`), so re-running the same command, after the
driver died or with more steps or another cadence, resumes the same run instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from mlctl.config import Config


def run_identity(cfg: Config) -> dict[str, Any]:
    """The recipe (:meth:`Config.recipe`), which shards it reads and with how many loader workers,
    and ``ray.num_workers``, which sets the global batch and the data split."""
    out = cfg.recipe()
    out["data"] = {**out["data"], "shards": cfg.data.shards, "num_workers": cfg.data.num_workers}
    out["ray"] = {"num_workers": cfg.ray.num_workers}
    return out


def run_name(cfg: Config) -> str:
    """``ray.name``, or ``mlctl-`` and a digest of :func:`run_identity`."""
    if cfg.ray.name:
        return cfg.ray.name
    digest = hashlib.sha256(json.dumps(run_identity(cfg), sort_keys=True).encode()).hexdigest()[:10]
    return f"mlctl-{digest}"


def is_object_store(storage_path: str) -> bool:
    """``s3://...``, ``gs://...`` and other URIs: checkpoints go through Ray's persistence."""
    return "://" in storage_path


def run_dir_of(cfg: Config) -> Path:
    """The run folder: under the storage path, or, when that is an object store, a working folder
    of this node's own (logs, endpoints, checkpoints staged before upload): :func:`local_run_dir`."""
    if is_object_store(cfg.ray.storage_path):
        return local_run_dir(run_name(cfg))
    return Path(cfg.ray.storage_path).expanduser().resolve() / run_name(cfg)


def local_run_dir(name: str) -> Path:
    """``TMP/mlctl-runs/NAME`` in this process's temp folder: each node computes its own (the
    driver's path need not exist, or be the same, on a worker's node)."""
    return Path(tempfile.gettempdir()) / "mlctl-runs" / name
