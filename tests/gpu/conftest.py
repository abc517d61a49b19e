"""The GPU suite: everything under tests/gpu is marked ``gpu`` and skipped, with the reason, where
torch sees no CUDA device (CPU CI collects it and skips it). ``make test-gpu`` runs it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# The CPU suite's helpers (device_check, test_distributed's data) are reused, not copied.
sys.path[:0] = [str(HERE), str(HERE.parent)]

from gpu_util import NO_CUDA, cuda_devices  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not cuda_devices():
                item.add_marker(pytest.mark.skip(reason=NO_CUDA))
