"""InfoNCE and CZ-NCE against an independent float64 reference written out anchor by anchor."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch

from mlctl.losses import contrastive_loss

# The two losses of mlctl.losses.contrastive_loss (InfoNCE and the paper's CZ-NCE).
info_nce = partial(contrastive_loss, cross_zero=False)
cz_nce = partial(contrastive_loss, cross_zero=True)


def reference_loss(
    x,
    y,
    temperature: float,
    cross_zero: bool,
    same_language_negatives: bool = True,
    margin: float = 0.0,
) -> float:
    """The method.md formulas, one anchor at a time, in float64 numpy (no shared code with losses.py).

    ``margin`` is taken off the positive's cosine.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.shape[0]

    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    total = 0.0
    for anchors, others in ((x, y), (y, x)):
        for i in range(n):
            p = (cos(anchors[i], others[i]) - margin) / temperature
            terms = [cos(anchors[i], others[j]) / temperature for j in range(n) if j != i]
            if same_language_negatives:
                terms += [cos(anchors[i], anchors[j]) / temperature for j in range(n) if j != i]
            if not cross_zero:
                terms.append(p)
            m = max(terms)
            lse = m + math.log(sum(math.exp(t - m) for t in terms))
            total += lse - p
    return total / (2 * n)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


LOSSES = [(info_nce, False), (cz_nce, True)]


@pytest.mark.parametrize("fn,cross_zero", LOSSES, ids=["info_nce", "cz_nce"])
@pytest.mark.parametrize("same_lang", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float64_matches_reference(fn, cross_zero, same_lang, seed):
    g = torch.Generator().manual_seed(seed)
    b, d = 3 + seed * 4, 16
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = x + 0.8 * torch.randn(b, d, generator=g, dtype=torch.float64)
    got = fn(x, y, 0.07, same_language_negatives=same_lang)
    assert got.dtype == torch.float64
    want = reference_loss(x.numpy(), y.numpy(), 0.07, cross_zero, same_lang)
    assert _rel(got.item(), want) < 1e-9


@pytest.mark.parametrize("fn,cross_zero", LOSSES, ids=["info_nce", "cz_nce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_float32(fn, cross_zero, dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 32, generator=g).to(dtype)
    y = (x.float() + 0.5 * torch.randn(16, 32, generator=g)).to(dtype)
    got = fn(x, y, 0.05)
    # NOTE: these pairs are close enough that InfoNCE saturates (~1e-4); a logsumexp(all) - p
    # form misses the 1e-4 bound by 10x here in float32, which is why losses.py uses softplus.
    assert got.dtype == torch.float32
    # The reference sees exactly the (rounded) values the loss received.
    want = reference_loss(x.double().numpy(), y.double().numpy(), 0.05, cross_zero)
    assert _rel(got.item(), want) < 1e-4


def test_cz_nce_crosses_zero_and_info_nce_does_not():
    g = torch.Generator().manual_seed(3)
    # Well separated: orthogonal rows, translations a small perturbation away.
    x = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))[0][:8]
    y = x + 0.01 * torch.randn(8, 32, generator=g, dtype=torch.float64)
    cz = cz_nce(x, y, 0.07).item()
    assert cz < -5  # p ~ 14.3, log(14 negatives at ~0) ~ 2.6
    assert _rel(cz, reference_loss(x.numpy(), y.numpy(), 0.07, True)) < 1e-9
    info = info_nce(x, y, 0.07).item()
    assert 0 <= info < 1e-3
    # InfoNCE stays >= 0 on arbitrary inputs too, including identical pairs and random ones.
    for seed in range(20):
        gg = torch.Generator().manual_seed(100 + seed)
        a = torch.randn(5, 8, generator=gg)
        bb = a if seed % 4 == 0 else torch.randn(5, 8, generator=gg)
        assert info_nce(a, bb, 0.07).item() >= 0
        assert info_nce(a, bb, 0.07, same_language_negatives=False).item() >= 0


def test_info_nce_exceeds_cz_nce_by_log1p():
    # Per anchor, InfoNCE = log(e^p + S) - p and CZ-NCE = log(S) - p: their difference is
    # log(1 + e^p / S) > 0; on identical inputs every anchor gives the same value.
    x = torch.eye(4, dtype=torch.float64)
    info, cz = info_nce(x, x, 1.0).item(), cz_nce(x, x, 1.0).item()
    # p = 1; S = 3 * e^0 (translations) + 3 * e^0 (same language) = 6
    assert info == pytest.approx(math.log(math.e + 6) - 1, rel=1e-12)
    assert cz == pytest.approx(math.log(6) - 1, rel=1e-12)


@pytest.mark.parametrize("fn", [info_nce, cz_nce], ids=["info_nce", "cz_nce"])
@pytest.mark.parametrize("same_lang", [True, False])
def test_gradcheck_float64(fn, same_lang):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, 0.1, same_language_negatives=same_lang), (x, y))


def test_gradient_scale_matches_reference_finite_difference():
    # gradcheck compares the backward with the forward; this pins the forward's gradient to the
    # independent reference (central differences in float64), so a consistent scaling bug in both
    # forward and backward cannot pass.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 4, generator=g, dtype=torch.float64)
    cz_nce(x, y, 0.1).backward()
    h = 1e-6
    num = np.zeros((3, 4))
    for i in range(3):
        for j in range(4):
            xp, xm = x.detach().numpy().copy(), x.detach().numpy().copy()
            xp[i, j] += h
            xm[i, j] -= h
            num[i, j] = (
                reference_loss(xp, y.numpy(), 0.1, True) - reference_loss(xm, y.numpy(), 0.1, True)
            ) / (2 * h)
    np.testing.assert_allclose(x.grad.numpy(), num, rtol=1e-6, atol=1e-9)


def test_bad_shapes_and_batches_raise():
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        cz_nce(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        cz_nce(torch.randn(1, 4), torch.randn(1, 4))
    # A world size without a process group would silently use the wrong rows.
    with pytest.raises(ValueError, match="initialised"):
        contrastive_loss(torch.randn(3, 4), torch.randn(3, 4), rank=1, world_size=2)


@pytest.mark.parametrize("cross_zero", [False, True], ids=["info_nce", "cz_nce"])
@pytest.mark.parametrize("margin", [0.1, 0.3])
def test_additive_margin_matches_reference(cross_zero, margin):
    g = torch.Generator().manual_seed(21)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64)
    y = x + 0.5 * torch.randn(6, 8, generator=g, dtype=torch.float64)
    got = contrastive_loss(x, y, 0.05, cross_zero=cross_zero, margin=margin).item()
    want = reference_loss(x.numpy(), y.numpy(), 0.05, cross_zero, margin=margin)
    assert _rel(got, want) < 1e-9
    # The margin makes the task harder: a strictly larger loss than without it.
    assert got > contrastive_loss(x, y, 0.05, cross_zero=cross_zero).item() + 1e-6
