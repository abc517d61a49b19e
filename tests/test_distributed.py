"""The gathered loss on real gloo process groups (spawned processes, world sizes 2 and 4) against the
single-process loss on the concatenated batch.

Gradient semantics being pinned down: ``all_gather_with_grad``'s backward all-reduces (sums) the
incoming gradient and keeps this rank's slice. After every rank calls ``loss_r.backward()``, the
gradient on rank r's inputs is therefore d(sum_r' L_r')/dx_r = N * d(mean_r' L_r')/dx_r, i.e. N times
the single-process gradient of the mean loss. The data-parallel step (DeepSpeed all-reduces the
parameter gradients and divides by N) turns that into exactly the single-process parameter gradient.
Each check also asserts that a gradient N times too large or too small would fail it.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist
from ranks import run_ranks

from mlctl.distributed import all_gather_with_grad
from mlctl.losses import contrastive_loss

# The two losses of mlctl.losses.contrastive_loss (InfoNCE and the paper's CZ-NCE).
info_nce = partial(contrastive_loss, cross_zero=False)
cz_nce = partial(contrastive_loss, cross_zero=True)

B, D, D_IN, TEMP = 3, 8, 5, 0.1
LOSSES = {"info_nce": info_nce, "cz_nce": cz_nce}


def _global_data(world_size: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """The same global batch in every process (fixed seed)."""
    g = torch.Generator().manual_seed(1234)
    n = world_size * B
    x = torch.randn(n, D, generator=g, dtype=dtype)
    return {
        "x": x,
        "y": x + 0.7 * torch.randn(n, D, generator=g, dtype=dtype),
        "a": torch.randn(n, D_IN, generator=g, dtype=dtype),
        "b": torch.randn(n, D_IN, generator=g, dtype=dtype),
    }


def _small_model(dtype=torch.float64) -> torch.nn.Linear:
    torch.manual_seed(0)  # same init on every rank, as DeepSpeed broadcasts it
    return torch.nn.Linear(D_IN, D).to(dtype)


def _rank(rank: int, world_size: int) -> dict[str, object]:
    data = _global_data(world_size)
    rows = slice(rank * B, (rank + 1) * B)
    res: dict[str, object] = {}

    # The gather itself: rows in rank order, contiguous, autograd-aware.
    local = data["x"][rows].clone().requires_grad_(True)
    gathered = all_gather_with_grad(local.t().contiguous().t())  # a non-contiguous view in
    res["gathered"] = gathered.detach().clone()
    gathered.sum().backward()
    res["gather_grad"] = local.grad.clone()  # every rank's ones summed: world_size

    for name, fn in LOSSES.items():
        for same_lang in (True, False):
            x = data["x"][rows].clone().requires_grad_(True)
            y = data["y"][rows].clone().requires_grad_(True)
            loss = fn(x, y, TEMP, same_language_negatives=same_lang, rank=rank, world_size=world_size)
            loss.backward()
            res[f"{name}/{same_lang}"] = (loss.detach(), x.grad.clone(), y.grad.clone())

        # A small model producing x and y: the data-parallel parameter gradient, in float64
        # and in float32 (the training dtype of the loss).
        for dtype in (torch.float64, torch.float32):
            model = _small_model(dtype)
            a, b = data["a"][rows].to(dtype), data["b"][rows].to(dtype)
            loss = fn(model(a), model(b), TEMP, rank=rank, world_size=world_size)
            loss.backward()
            grads = []
            for p in model.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                grads.append(p.grad / world_size)
            res[f"{name}/model/{dtype}"] = (loss.detach(), grads)
    return res


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _assert_equal_and_discriminating(got: torch.Tensor, want: torch.Tensor, world_size: int) -> None:
    assert _rel(got, want) < 1e-5
    # The same check rejects a gradient world_size times too large or too small.
    assert _rel(got * world_size, want) > 1e-5
    assert _rel(got / world_size, want) > 1e-5


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)], ids=["ws2", "ws4"])
def spawned(request):
    ws = request.param
    return ws, run_ranks(_rank, ws)


def test_all_gather_with_grad(spawned):
    ws, results = spawned
    data = _global_data(ws)
    for res in results:
        assert torch.equal(res["gathered"], data["x"])
        # d(sum over ranks of sum(gathered))/d local row = world_size
        assert torch.equal(res["gather_grad"], torch.full((B, D), float(ws), dtype=torch.float64))


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("same_lang", [True, False])
def test_gathered_loss_and_input_grads_equal_single_process(spawned, name, same_lang):
    ws, results = spawned
    data = _global_data(ws)
    x = data["x"].clone().requires_grad_(True)
    y = data["y"].clone().requires_grad_(True)
    single = LOSSES[name](x, y, TEMP, same_language_negatives=same_lang)
    single.backward()

    losses = torch.stack([res[f"{name}/{same_lang}"][0] for res in results])
    assert _rel(losses.mean(), single.detach()) < 1e-9  # float64 throughout
    # The ranks' losses differ (each covers its own rows): the mean is not a trivial identity.
    assert losses.std() > 0
    for r, res in enumerate(results):
        rows = slice(r * B, (r + 1) * B)
        _, gx, gy = res[f"{name}/{same_lang}"]
        _assert_equal_and_discriminating(gx / ws, x.grad[rows], ws)
        _assert_equal_and_discriminating(gy / ws, y.grad[rows], ws)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_data_parallel_param_grads_equal_single_process(spawned, name, dtype):
    ws, results = spawned
    data = _global_data(ws)
    model = _small_model(dtype)
    single = LOSSES[name](model(data["a"].to(dtype)), model(data["b"].to(dtype)), TEMP)
    single.backward()
    key = f"{name}/model/{dtype}"
    losses = torch.stack([res[key][0] for res in results])
    assert _rel(losses.mean(), single.detach()) < (1e-9 if dtype == torch.float64 else 1e-5)
    for res in results:
        for got, p in zip(res[key][1], model.parameters(), strict=True):
            _assert_equal_and_discriminating(got, p.grad, ws)


def test_single_process_helpers_are_identities():
    assert not dist.is_initialized()
    t = torch.randn(3, 2)
    assert all_gather_with_grad(t) is t
