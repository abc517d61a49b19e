"""The contrastive loss composition of a training step (mlctl.losses.contrastive_terms).

word_level=false: CL(s). word_level=true: multilevel_weight * CL(MLP(s, w)) + sentence_weight * CL(s),
where a pair without an anchor (span starting at 0) feeds only the sentence term once there is one.
Checked against mlctl.losses.contrastive_loss on hand-picked rows (its own tests check it against a
reference), on one process and on a real 2-rank gloo group.
"""

from __future__ import annotations

import pytest
import torch
from ranks import run_ranks

from mlctl.config import load_config
from mlctl.losses import contrastive_loss, contrastive_terms
from mlctl.model import EncoderOutput

B, H = 4, 6


def _inputs(seed: int = 0, anchorless: tuple[int, ...] = (2,)):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2 * B, H, dtype=torch.float64, generator=g).requires_grad_()
    f = torch.randn(2 * B, 2 * H, dtype=torch.float64, generator=g).requires_grad_()
    spans = torch.tensor([[1, 2]] * (2 * B))
    for i in anchorless:  # what collate writes for a pair prepared with keep_no_anchor
        spans[i] = torch.tensor([0, 5])
        spans[B + i] = torch.tensor([0, 7])
    return s, f, spans


def _cfg(*overrides: str):
    return load_config(overrides=list(overrides))


def _terms(cfg, s, f, spans, rank=0, world_size=1):
    out = EncoderOutput(sentence=s, fused=f, mlm_loss=None)
    # what collate marks: a pair without an anchor has the whole sides as its spans (start 0)
    anchored = spans[: spans.shape[0] // 2, 0] > 0 if spans is not None else None
    return contrastive_terms(cfg, out, anchored, rank, world_size)[0]


def test_paper_composition_is_the_fused_loss_over_every_pair():
    s, f, spans = _inputs()
    cfg = _cfg()  # the paper: multilevel 1, sentence 0
    got = _terms(cfg, s, f, spans)
    want = contrastive_loss(f[:B], f[B:], cfg.loss.temperature)
    assert torch.equal(got, want)
    got.backward()
    assert s.grad is None  # nothing reaches s but through the MLP (not part of this check)
    assert f.grad[2].abs().sum() > 0  # the anchorless pair keeps the paper code's behaviour


def test_sentence_term_reaches_s_and_anchorless_pairs_feed_only_it():
    s, f, spans = _inputs()
    cfg = _cfg("loss.sentence_weight=0.5", "loss.multilevel_weight=2")
    got = _terms(cfg, s, f, spans)
    keep = torch.tensor([True, True, False, True])
    want = 2 * contrastive_loss(f[:B][keep], f[B:][keep], 0.07) + 0.5 * contrastive_loss(s[:B], s[B:], 0.07)
    assert torch.allclose(got, want, rtol=1e-12)
    got.backward()
    assert s.grad is not None and (s.grad.abs().sum(dim=1) > 0).all()  # every pair, anchored or not
    assert torch.all(f.grad[[2, B + 2]] == 0)  # the anchorless pair is out of the multi-level term
    assert (f.grad[[0, 1, 3, B, B + 1, B + 3]].abs().sum(dim=1) > 0).all()


def test_fewer_than_two_anchored_pairs_leave_only_the_sentence_term():
    s, f, spans = _inputs(anchorless=(0, 1, 2))
    cfg = _cfg("loss.sentence_weight=1")
    got = _terms(cfg, s, f, spans)
    assert torch.allclose(got, contrastive_loss(s[:B], s[B:], 0.07), rtol=1e-12)
    got.backward()
    assert f.grad is not None and torch.all(f.grad == 0)  # zero, but present on every parameter


def test_sentence_level_only():
    s, f, spans = _inputs()
    cfg = _cfg("model.word_level=false")
    got = _terms(cfg, s, None, None)
    assert torch.equal(got, contrastive_loss(s[:B], s[B:], 0.07))


def _rank(rank: int, world_size: int) -> tuple[float, list[torch.Tensor], torch.Tensor]:
    s, f, spans = _inputs()
    b = B // world_size  # this rank's pairs: rows rank*b.. of each side
    rows = torch.cat([torch.arange(rank * b, (rank + 1) * b), B + torch.arange(rank * b, (rank + 1) * b)])
    ls, lf = s.detach()[rows].clone().requires_grad_(), f.detach()[rows].clone().requires_grad_()
    cfg = _cfg("loss.sentence_weight=0.5")
    loss = _terms(cfg, ls, lf, spans[rows], rank, world_size)
    loss.backward()
    # What the data-parallel step does to parameter gradients: mean over ranks.
    return float(loss), [ls.grad / world_size, lf.grad / world_size], rows


@pytest.mark.slow
def test_two_ranks_equal_one_process():
    s, f, spans = _inputs()
    cfg = _cfg("loss.sentence_weight=0.5")
    want = _terms(cfg, s, f, spans)
    want.backward()
    results = run_ranks(_rank, 2)
    # mean over ranks of each rank's loss = the global loss (both terms in the gathered form).
    assert abs(sum(r[0] for r in results) / 2 - float(want.detach())) < 1e-10
    for _loss, (gs, gf), rows in results:
        # each rank's backward sees the sum over ranks through the gather; / world_size = global grad
        assert torch.allclose(gs, s.grad[rows], rtol=1e-9, atol=1e-12)
        assert torch.allclose(gf, f.grad[rows], rtol=1e-9, atol=1e-12)
