"""The one in-batch accuracy (mlctl.losses.inbatch_accuracy): single process against a count by
hand, and gathered over a real gloo group against the single-process figure on the whole batch."""

from __future__ import annotations

import pytest
import torch
from ranks import run_ranks

from mlctl.losses import inbatch_accuracy

B, D = 4, 6


def _batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, D, generator=g)
    y = x + 0.9 * torch.randn(n, D, generator=g)  # noisy enough that some rows miss
    return x, y


def _by_hand(x: torch.Tensor, y: torch.Tensor) -> float:
    xn, yn = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)
    hits = 0
    for i in range(len(x)):
        hits += int(max(range(len(y)), key=lambda j: float(xn[i] @ yn[j])) == i)
        hits += int(max(range(len(x)), key=lambda j: float(yn[i] @ xn[j])) == i)
    return hits / (2 * len(x))


def test_single_process_counts_nearest_neighbours():
    x, y = _batch(3 * B)
    want = _by_hand(x, y)
    assert 0 < want < 1  # the batch has hits and misses, so a wrong target would show
    assert float(inbatch_accuracy(x, y)) == pytest.approx(want)


def _rank(rank: int, world_size: int) -> float:
    x, y = _batch(world_size * B)
    rows = slice(rank * B, (rank + 1) * B)
    return float(inbatch_accuracy(x[rows], y[rows], rank=rank, world_size=world_size))


@pytest.mark.slow
def test_mean_over_ranks_is_the_global_batch_accuracy():
    world_size = 2
    got = run_ranks(_rank, world_size)
    x, y = _batch(world_size * B)
    assert sum(got) / world_size == pytest.approx(_by_hand(x, y))
