"""Small named collectives. Everything here also works with world size 1 (or no process group)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

# NOTE: torch 2.13 marks torch.distributed.nn.functional.all_gather deprecated (FutureWarning on
# every call) in favour of the private torch.distributed._functional_collectives. The public
# function is kept: it exists with the same autograd semantics in every torch this project supports
# (>= 2.3), and its backward works on gloo (all_to_all + sum) as well as nccl (reduce_scatter).
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated", category=FutureWarning
)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (equal shapes) along dim 0, differentiably: each row's
    gradient flows back to the rank that produced it, summed over every rank's use of it."""
    if not is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor, group=group if group is not None else dist.group.WORLD), dim=0)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean across ranks (no gradient); identity on one process."""
    if not is_initialized():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()
