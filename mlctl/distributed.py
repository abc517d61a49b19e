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
