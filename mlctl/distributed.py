"""Small named collectives. Everything here also works with world size 1 (or no process group)."""

from __future__ import annotations

import os
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


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (equal shapes) along dim 0, differentiably: each row's
    gradient flows back to the rank that produced it, summed over every rank's use of it."""
    if not is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor, group=group if group is not None else dist.group.WORLD), dim=0)


def all_gather_rows(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``tensor`` (equal shapes) concatenated along dim 0, no gradient; identity on
    one process."""
    if not is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=0)
