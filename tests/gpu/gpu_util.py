"""Helpers of the GPU suite (a module of its own: ``conftest`` is a name tests/ has twice)."""

from __future__ import annotations

import pytest
import torch

NO_CUDA = "no CUDA device (torch.cuda.is_available() is False); run `make test-gpu` on a GPU node"


def cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def needs_gpus(n: int):
    """Skip unless this node has at least ``n`` CUDA devices (NCCL allows one rank per GPU)."""
    have = cuda_devices()
    return pytest.mark.skipif(have < n, reason=f"needs {n} CUDA devices on this node, found {have}")
