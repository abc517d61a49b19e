"""CUDA's device rules for the real training code on a machine without a GPU (tests only).

The training step runs with its parameters and batches on ``meta``, a device every PyTorch build
has and that holds no values, under :class:`CudaRules`:

* **One device per op.** A :class:`~torch.utils._python_dispatch.TorchDispatchMode` checks every
  aten op's tensor arguments: they must share one device, except the copy ops that move data
  between devices and 0-dim CPU tensors given to elementwise ops (and ``masked_fill``'s value), as
  CUDA accepts a CPU scalar there; ``stack``/``cat`` and the like refuse one, on CUDA and here. Meta alone is not enough: on torch
  2.13 a meta ``stack`` with a CPU tensor raises, but a meta ``@`` CPU matmul passes.
* **Host reads counted.** ``.item()``, ``bool()``, ``.tolist()`` (``aten._local_scalar_dense``) and
  copies from the device to the CPU (``.cpu()``, ``.to("cpu")``) of a non-CPU tensor are recorded
  with the innermost ``mlctl`` frame that asked for them. Meta has no values to read, so the read
  returns zeros and the code goes on: the test decides how many reads a section may make. An op
  whose output *shape* depends on device values (``nonzero``, boolean-mask indexing, ``unique``)
  cannot go on at all and raises :class:`HostSync`.
* **Collectives as NCCL would take them.** Every ``torch.distributed`` collective must get tensors
  on the step's device (NCCL rejects CPU tensors). Meta tensors cannot travel, so a collective on
  them only keeps its shapes (every rank computes on its own); ``dist.get_backend`` answers
  ``nccl`` so autograd's gather takes its NCCL backward (reduce-scatter).
* The variable-length attention path runs as it would on CUDA: SDPA over nested jagged tensors
  picks the flash kernel when a ``FlopCounterMode`` is active on meta (torch's own "meta + flop
  counting" case), which also gives the step's FLOPs.

DeepSpeed cannot hold meta parameters, so :class:`StandInEngine` plays the engine's surface
(forward, backward with accumulation, step, learning rate, gradient norm on the device, checkpoint
save/load) for the code under test, which is mlctl's.
"""

from __future__ import annotations

import traceback
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MLCTL = str(Path(__file__).resolve().parent.parent / "mlctl")
aten = torch.ops.aten

COPIES = {
    aten._to_copy.default,
    aten.copy_.default,
    aten._copy_from.default,
    aten._copy_from_and_resize.default,
}
SCALAR_READS = {aten._local_scalar_dense.default}
# Not elementwise, but CUDA takes a 0-dim CPU tensor as their value argument.
SCALAR_ARGS = {aten.masked_fill.Tensor, aten.masked_fill_.Tensor, aten.fill_.Tensor, aten.fill.Tensor}
# Ops whose output shape depends on tensor values: on CUDA each one waits for the device.
VALUE_SHAPED = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "broadcast",
    "reduce",
    "scatter",
    "all_to_all",
    "all_to_all_single",
)


class MixedDevices(RuntimeError):
    """An op got tensors on two devices (CUDA raises here)."""


class HostSync(RuntimeError):
    """An op needs device values on the host to know its output shape."""


class OffDeviceCollective(RuntimeError):
    """A collective got a tensor off the process group's device (NCCL raises here)."""


def mlctl_frame() -> str:
    """``file:line in function`` of the innermost frame in mlctl's package, or '?'."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(MLCTL):
            return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    return "?"


def _is_host_scalar(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dim() == 0


def _is_seqlen_holder(t: torch.Tensor) -> bool:
    """A nested tensor's cached min/max sequence length: an empty CPU tensor whose *shape* holds the
    number (torch.nested keeps it on the CPU whatever the data's device; it has no data to move)."""
    return t.device.type == "cpu" and t.numel() == 0


def _zero_scalar(t: torch.Tensor) -> Any:
    if t.dtype == torch.bool:
        return False
    return 0.0 if t.is_floating_point() else 0


class _Rules(TorchDispatchMode):
    def __init__(self, owner: CudaRules):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in SCALAR_READS:
            t = tensors[0]
            if t.device.type != "cpu":
                self.owner.read(f"{func.__name__} of {t.device} {t.dtype}{tuple(t.shape)}")
                if t.device.type == "meta":
                    return _zero_scalar(t)
            return func(*args, **kwargs)
        if func in COPIES:
            return self._copy(func, args, kwargs, tensors)
        if func in VALUE_SHAPED and any(t.device.type != "cpu" for t in tensors):
            self.owner.read(f"{func.__name__} (value-dependent shape)")
            raise HostSync(
                f"{func} on {tensors[0].device} needs device values on the host, at {mlctl_frame()}"
            )
        if func is aten.index.Tensor:
            for idx in args[1]:
                if idx is not None and idx.dtype == torch.bool and idx.device.type != "cpu":
                    self.owner.read("boolean-mask indexing (value-dependent shape)")
                    raise HostSync(f"boolean-mask indexing on {idx.device}, at {mlctl_frame()}")
        scalars_ok = torch.Tag.pointwise in func.tags or func in SCALAR_ARGS
        nested = func.__name__.startswith("_nested_")
        devices = {
            t.device
            for t in tensors
            if not (scalars_ok and _is_host_scalar(t)) and not (nested and _is_seqlen_holder(t))
        }
        if len(devices) > 1:
            shapes = ", ".join(f"{t.device}{tuple(t.shape)}" for t in tensors)
            raise MixedDevices(
                f"{func} got tensors on {sorted(map(str, devices))} ({shapes}), at {mlctl_frame()}"
            )
        self.owner.ops[func.__name__] += 1
        return func(*args, **kwargs)

    def _copy(self, func, args, kwargs, tensors):
        if func is aten._to_copy.default:
            src = args[0]
            dst = torch.device(kwargs.get("device") or src.device)
            if src.device.type != "cpu" and dst.type == "cpu":
                self.owner.read(f"copy of {src.device} {src.dtype}{tuple(src.shape)} to the host")
                if src.device.type == "meta":
                    return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype, device="cpu")
            return func(*args, **kwargs)
        dst, src = args[0], args[1]
        if src.device.type != "cpu" and dst.device.type == "cpu":
            self.owner.read(f"copy of {src.device} {src.dtype}{tuple(src.shape)} into a host tensor")
            if src.device.type == "meta":
                return dst.zero_()
        return func(*args, **kwargs)


class CudaRules:
    """Context manager: the rules above while the real code runs; see the module docstring.

    ``reads`` lists every host read in order (what, where); :meth:`section` marks where a test
    wants to count them."""

    def __init__(self, device: torch.device | str = "meta"):
        self.device = torch.device(device)
        self.reads: list[tuple[str, str, str]] = []  # (section, what, where)
        self.collectives: list[tuple[str, str]] = []  # (name, device)
        self.ops: Counter[str] = Counter()
        self.current = ""
        self._stack = ExitStack()
        self.flops = None

    def section(self, name: str) -> CudaRules:
        self.current = name
        return self

    def read(self, what: str) -> None:
        self.reads.append((self.current, what, mlctl_frame()))

    def reads_in(self, section: str) -> list[tuple[str, str]]:
        return [(what, where) for s, what, where in self.reads if s == section]

    def _collective(self, name: str):
        real = getattr(dist, name)

        def checked(*args, **kwargs):
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            for t in tensors:
                self.collectives.append((name, str(t.device)))
                if t.device != self.device:
                    raise OffDeviceCollective(
                        f"dist.{name} got a {t.dtype} tensor {tuple(t.shape)} on {t.device}; the "
                        f"process group serves {self.device} only (NCCL), at {mlctl_frame()}"
                    )
            if self.device.type == "meta":
                return None  # shapes only: meta tensors hold nothing to exchange
            return real(*args, **kwargs)

        return real, checked

    def __enter__(self) -> CudaRules:
        from torch.utils.flop_counter import FlopCounterMode

        for name in COLLECTIVES:
            real, checked = self._collective(name)
            setattr(dist, name, checked)
            self._stack.callback(setattr, dist, name, real)
        real_backend = dist.get_backend
        dist.get_backend = lambda group=None: dist.Backend.NCCL  # type: ignore[assignment]
        self._stack.callback(setattr, dist, "get_backend", real_backend)
        self.flops = self._stack.enter_context(FlopCounterMode(display=False))
        self._stack.enter_context(_Rules(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


class StandInEngine:
    """The part of a DeepSpeed engine mlctl's code calls, on a module that lives on ``device``.

    ``backward`` divides by the accumulation steps as DeepSpeed does; ``step`` steps the optimizer
    at the accumulation boundary, after clipping, and keeps the gradient norm on the device (as
    ZeRO 1/2 do); the boundary can be read and overridden (the cached step does); the checkpoint
    holds the module state in DeepSpeed's file layout."""

    def __init__(self, module: torch.nn.Module, device: torch.device, cfg: Any, rank: int):
        from mlctl.deepspeed_setup import lr_lambda, param_groups

        self.module = module.to(device)
        self.device = device
        self.rank = rank
        self.grad_accum = cfg.train.grad_accum
        self.clip = cfg.train.grad_clip
        self.optimizer = torch.optim.AdamW(
            param_groups(self.module, cfg.train.weight_decay), lr=cfg.train.lr, foreach=False
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.micro = 0
        self.boundary: bool | None = None  # set_gradient_accumulation_boundary's override
        self.norm: torch.Tensor | None = None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        if self.boundary is not None:
            return self.boundary
        return (self.micro + 1) % self.grad_accum == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool | None) -> None:
        self.boundary = is_boundary

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.grad_accum:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        self.norm = torch.nn.utils.clip_grad_norm_(params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> torch.Tensor | None:
        return self.norm

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = True) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            state = {k: v.detach().to("cpu") for k, v in self.module.state_dict().items()}
            torch.save({"module": state}, folder / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any) -> tuple[str, dict]:
        path = Path(load_dir) / tag / "mp_rank_00_model_states.pt"
        state = torch.load(path, map_location="cpu", weights_only=False)["module"]
        self.module.load_state_dict(state)
        return str(path), {}
