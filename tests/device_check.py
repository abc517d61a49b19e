"""A process group that rejects tensors off the step's device, for CPU machines (tests only).

On a GPU node the step's device is ``cuda:N`` and Ray's process group is NCCL-only: a tensor that
a collective gets from the CPU makes the step fail. ``StrictDevice`` restores that rule while the
real step runs with the real DeepSpeed engine: every tensor handed to a ``torch.distributed``
collective (the step's own, the loss's gather and DeepSpeed's gradient reduction alike) must be on
``device``; anything else raises at once, as NCCL would.

The device rules of every other op, and the host reads, are checked by tests/cuda_rules.py (the
step on ``meta``); this module keeps the real engine's collectives honest.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
import torch.distributed as dist

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
)


class OffDeviceCollective(RuntimeError):
    pass


class StrictDevice:
    """Context manager: collectives reject tensors not on ``device``; see the module docstring."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.seen: list[tuple[str, str, torch.dtype]] = []  # (collective, device, dtype)
        self._stack = ExitStack()

    def _check(self, name: str, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.seen.append((name, str(t.device), t.dtype))
                if t.device != self.device:
                    raise OffDeviceCollective(
                        f"dist.{name} got a {t.dtype} tensor {tuple(t.shape)} on {t.device}; "
                        f"this process group serves {self.device} only"
                    )

    def _wrap(self, name: str):
        real = getattr(dist, name)

        def wrapped(*args, **kwargs):
            flat = list(args) + list(kwargs.values())
            self._check(name, [x for a in flat for x in (a if isinstance(a, (list, tuple)) else [a])])
            return real(*args, **kwargs)

        return real, wrapped

    def __enter__(self) -> StrictDevice:
        for name in COLLECTIVES:
            real, wrapped = self._wrap(name)
            setattr(dist, name, wrapped)
            self._stack.callback(setattr, dist, name, real)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
