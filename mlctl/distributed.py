"""Small named collectives and rank helpers. Everything here also works with world size 1."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def training_device(
    accelerator: str, local_rank: int, assigned: torch.device | str | None = None
) -> torch.device:
    """The one device this process trains on; every tensor a collective sees lives there.

    ``accelerator`` is DeepSpeed's accelerator name (``get_accelerator().device_name()``, set by
    ``DS_ACCELERATOR``): a CPU accelerator trains on the CPU even where CUDA is present, so the device
    never disagrees with the engine. ``assigned`` is the device the launcher was given (under Ray:
    ``ray.train.torch.get_device()``), the only reliable source there: Ray may give each worker
    exactly one visible GPU (index 0 whatever its local rank) or share the node's GPUs in an order
    that need not follow local ranks. Without it (torchrun-style launch), ``local_rank`` indexes the
    visible devices, and a process that sees exactly one GPU uses it.
    """
    if accelerator == "cpu":
        if assigned is not None and torch.device(assigned).type != "cpu":
            raise RuntimeError(
                f"this worker was assigned {assigned} but DeepSpeed's accelerator is 'cpu'; "
                "set DS_ACCELERATOR=cuda for GPU workers"
            )
        return torch.device("cpu")
    if accelerator != "cuda":
        raise RuntimeError(f"DeepSpeed accelerator {accelerator!r} is not supported (cpu or cuda)")
    if assigned is not None:
        device = torch.device(assigned)
        if device.type != "cuda":
            raise RuntimeError(f"DS_ACCELERATOR=cuda but this worker was assigned {device}; no GPU for it?")
        return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    count = torch.cuda.device_count()
    if count == 0:
        raise RuntimeError("DS_ACCELERATOR=cuda but torch sees no CUDA device")
    if count == 1:
        return torch.device("cuda", 0)  # CUDA_VISIBLE_DEVICES narrowed to this process's GPU
    if not 0 <= local_rank < count:
        raise RuntimeError(
            f"local rank {local_rank} has no GPU: this process sees {count} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    return torch.device("cuda", local_rank)


class _AllGather(torch.autograd.Function):
    """all_gather along dim 0 into one contiguous buffer; backward sums every rank's gradient for
    this rank's rows (all_reduce, then keep our slice), so each row's gradient flows back to the
    rank that produced it."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ws = dist.get_world_size(group)
        ctx.rank = dist.get_rank(group)
        ctx.rows = tensor.shape[0]
        tensor = tensor.contiguous()
        out = torch.empty((ws * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        dist.all_gather_into_tensor(out, tensor, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # A private copy: the all_reduce below is in place, and the incoming gradient may be a
        # buffer autograd still shares with another consumer.
        grad = grad.clone(memory_format=torch.contiguous_format)
        # NOTE: gloo has no reduce_scatter; all_reduce + slice is the same sum on every backend.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (equal shapes) along dim 0, differentiably."""
    if not is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    return _AllGather.apply(tensor, group)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean across ranks (no gradient); identity on one process."""
    if not is_initialized():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()
