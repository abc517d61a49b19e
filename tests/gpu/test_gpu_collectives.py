"""NCCL on one GPU node, 1 and 2 processes: the gathered CZ-NCE / InfoNCE loss and the data-parallel
gradients equal the single-process float64 CPU reference (test_distributed's data and model),
to float32 and bf16 tolerance."""

from __future__ import annotations

import pytest
import torch
from gpu_util import needs_gpus
from ranks import run_ranks
from test_distributed import LOSSES, TEMP, B, _global_data, _rel, _small_model

# Relative error against the float64 reference. float32 on CUDA (TF32 off) is ~1e-6 here; bf16
# keeps 8 bits of mantissa, so a few 1e-3 per op and ~1e-2 through a forward and backward.
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def _rank(rank: int, world: int) -> dict:
    import torch.distributed as dist

    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda", rank)
    data = _global_data(world)
    rows = slice(rank * B, (rank + 1) * B)
    res = {}
    for name, fn in LOSSES.items():
        for dtype in TOL:
            model = _small_model(torch.float64).to(device=device, dtype=dtype)
            a = data["a"][rows].to(device=device, dtype=dtype)
            b = data["b"][rows].to(device=device, dtype=dtype)
            loss = fn(model(a), model(b), TEMP, rank=rank, world_size=world)
            assert loss.dtype == torch.float32  # the loss is computed in float32 whatever the input
            loss.backward()
            grads = []
            for p in model.parameters():
                g = p.grad.float()
                dist.all_reduce(g)
                grads.append((g / world).cpu())
            res[f"{name}/{dtype}"] = (loss.detach().cpu(), grads)
    return res


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=needs_gpus(2))])
def test_nccl_gathered_loss_and_grads_equal_single_process(world):
    results = run_ranks(_rank, world, backend="nccl")
    data = _global_data(world)
    for name, fn in LOSSES.items():
        model = _small_model(torch.float64)
        ref = fn(model(data["a"]), model(data["b"]), TEMP)
        ref.backward()
        for dtype, tol in TOL.items():
            key = f"{name}/{dtype}"
            loss = torch.stack([r[key][0] for r in results]).double().mean()
            assert _rel(loss, ref.detach()) < tol, (key, float(loss), float(ref))
            for res in results:
                for got, p in zip(res[key][1], model.parameters(), strict=True):
                    assert _rel(got.double(), p.grad) < tol, (key, _rel(got.double(), p.grad))
