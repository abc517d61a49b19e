"""A process group that rejects tensors off the step's device, for CPU machines (tests only).

On a GPU node the step's device is ``cuda:N`` and Ray's process group is NCCL-only: a tensor that
a collective gets from the CPU (allocated without ``device=``, or moved back with ``.cpu()``) makes
the step fail. On a CPU machine the step's device and the default device are both the CPU, so the
same mistake goes unnoticed. ``StrictDevice`` restores the difference while the real step runs:

* every tensor handed to a ``torch.distributed`` collective (the step's own, the loss's gather and
  DeepSpeed's gradient reduction alike) must be on ``device``; anything else raises at once, as
  NCCL would;
* a factory call (``torch.zeros``, ``torch.tensor``, ...) without ``device=`` made directly by the
  step's own code (``mlctl.engine``, ``mlctl.distributed``, ``mlctl.losses``) allocates on the
  ``meta`` device, the stand-in for "the default device, which is not the step's device". Code
  elsewhere (transformers, DeepSpeed, the loader, the CPU-side MLM masking) is left alone.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

STEP_MODULES = ("mlctl.engine", "mlctl.distributed", "mlctl.losses")
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
)
FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.tensor,
    torch.as_tensor,
    torch.arange,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.eye,
    torch.linspace,
}


class OffDeviceCollective(RuntimeError):
    pass


class _DefaultIsElsewhere(TorchFunctionMode):
    def __init__(self, modules: tuple[str, ...]):
        super().__init__()
        self.modules = modules
        self.redirected: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1)
            if caller.f_globals.get("__name__") in self.modules:
                self.redirected.append(f"{func.__name__} in {caller.f_code.co_name}")
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


class StrictDevice:
    """Context manager: collectives reject tensors not on ``device``; see the module docstring."""

    def __init__(self, device: torch.device | str, modules: tuple[str, ...] = STEP_MODULES):
        self.device = torch.device(device)
        self.modules = modules
        self.seen: list[tuple[str, str, torch.dtype]] = []  # (collective, device, dtype)
        self._stack = ExitStack()
        self.mode = _DefaultIsElsewhere(modules)

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
        self._stack.enter_context(self.mode)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
