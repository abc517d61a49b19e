"""Contrastive losses: InfoNCE and CZ-NCE (positive left out of the denominator).

For ``n`` pairs (x_i, y_i), the anchor x_i has the positive sim(x_i, y_i) and the negatives
sim(x_i, y_j) and, unless switched off, sim(x_i, x_j), j != i (2n - 2 in all); y_i likewise.
sim is cosine / temperature. An additive margin m (``margin``, LaBSE's additive-margin softmax)
scores the positive as (cosine - m) / temperature; 0 is the paper's loss.

Source ids (optional, int64 [n]): pairs that share one are translations of the same source sentence
(a multiway corpus gives every translation of an English line the same id). For an anchor, every
negative whose pair shares its source id is masked (cross- and same-language alike); the positive
stays. With all ids distinct the loss is the unmasked one. An anchor left with no negative at all
contributes 0 (no gradient) but still counts in the mean, so the gathered form stays additive.

The loss is the mean over the 2n anchors, computed with logsumexp in
float32 for float32/bf16/fp16 inputs; float64 inputs stay float64 (needed for gradcheck and exact
reference checks).

The gathered form (``rank``, ``world_size`` > 1) computes the loss of this rank's rows against the
rows of every rank (b x 2Nb logits). Its mean over ranks equals the single-process loss on the
concatenated batch. Gradients: the gather's backward all-reduces (sums) the incoming gradient and
keeps this rank's slice, so after every rank calls ``loss_r.backward()`` the gradient on rank r's
inputs is d(sum_r' L_r')/dx_r = N * d(mean_r' L_r')/dx_r. The usual data-parallel step (all-reduce
the parameter gradients and divide by N, as DeepSpeed does) then yields exactly the single-process
gradient of the mean loss on the concatenated batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mlctl.distributed import all_gather_with_grad

if TYPE_CHECKING:
    from mlctl.config import Config


def _loss_rows(
    anchors: torch.Tensor,
    cands_same: torch.Tensor,
    cands_other: torch.Tensor,
    offset: int,
    temperature: float,
    cross_zero: bool,
    same_language_negatives: bool,
    sid_anchor: torch.Tensor | None = None,
    sid_cands: torch.Tensor | None = None,
    margin: float = 0.0,
    valid_cands: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-anchor loss for ``anchors`` [b, D] (global rows offset..offset+b) against the global
    same-language rows ``cands_same`` [n, D] and translations ``cands_other`` [n, D]; with source
    ids ``sid_anchor`` [b] / ``sid_cands`` [n], negatives sharing the anchor's id are masked; with
    ``valid_cands`` [n] (bool), rows outside the loss are never negatives."""
    b = anchors.shape[0]
    rows = torch.arange(b, device=anchors.device)
    idx = rows + offset
    sim_other = anchors @ cands_other.T / temperature  # [b, n]; the positive is column idx
    sim_same = anchors @ cands_same.T / temperature  # [b, n]; column idx is the anchor itself
    pos = sim_other.gather(1, idx[:, None]).squeeze(1)
    # Additive margin: the positive must beat every negative by ``margin`` in cosine, not just tie.
    pos_m = pos - margin / temperature if margin else pos
    # Columns that are no negative of the anchor: its own pair, pairs of its source sentence, and
    # rows left out of the loss. Masks, not indexing: every shape stays known on the host.
    blocked = torch.zeros(sim_other.shape, dtype=torch.bool, device=anchors.device)
    blocked[rows, idx] = True
    masked = sid_anchor is not None and sid_cands is not None
    if sid_anchor is not None and sid_cands is not None:
        blocked |= sid_anchor[:, None] == sid_cands[None, :]
    if valid_cands is not None:
        blocked |= ~valid_cands[None, :]
        masked = True
    neg_inf = torch.finfo(sim_same.dtype).min
    sim_other = sim_other.masked_fill(blocked, neg_inf)
    sim_same = (
        sim_same.masked_fill(blocked, neg_inf)
        if same_language_negatives
        else torch.full_like(sim_same, neg_inf)
    )
    cz = torch.logsumexp(torch.cat([sim_other, sim_same], dim=1), dim=1) - pos_m
    if masked:
        # NOTE: with every negative masked, logsumexp over finfo.min entries is a huge negative
        # number, not a loss; such an anchor has nothing to contrast, so it contributes 0. (A
        # cross-language negative survives wherever a same-language one does.)
        cz = torch.where((~blocked).any(1), cz, torch.zeros_like(cz))
    if cross_zero:
        return cz
    # InfoNCE = log(e^p + S) - p = log(1 + e^(log S - p)) = softplus(CZ-NCE). Written this way it
    # keeps its relative precision once the positive dominates: logsumexp(all) - p would cancel two
    # numbers ~1/tau large and lose every digit of a loss near 1e-5 in float32.
    return F.softplus(cz)


def contrastive_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    temperature: float = 0.07,
    *,
    cross_zero: bool = True,
    same_language_negatives: bool = True,
    rank: int = 0,
    world_size: int = 1,
    group=None,
    source_ids: torch.Tensor | None = None,
    margin: float = 0.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric contrastive loss of this rank's rows ``x``, ``y`` [b, D] (mean over its 2b anchors).

    With ``world_size`` > 1 the rows of every rank are gathered (autograd-aware) first.
    ``source_ids`` (int64 [b], this rank's pairs) masks the negatives that share the anchor's source
    sentence; every rank must pass them or none (they are gathered too).
    ``valid`` (bool [b]) keeps only those pairs in the loss, as anchors and as negatives: the loss
    is then the mean over the valid anchors of the global batch (in the gathered form: this rank's
    share, so that the mean over ranks is that global mean), and 0 when fewer than 2 pairs of the
    global batch are valid. Every rank must pass it or none.
    """
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"x and y must both be [B, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] * world_size < 2:
        raise ValueError("a contrastive loss needs at least 2 pairs in the global batch")
    # Promote to at least float32: bf16 logits lose the small differences CZ-NCE lives on.
    compute = torch.promote_types(x.dtype, torch.float32)
    xn = F.normalize(x.to(compute), dim=-1)
    yn = F.normalize(y.to(compute), dim=-1)
    if world_size > 1:
        gx = all_gather_with_grad(xn, group)
        gy = all_gather_with_grad(yn, group)
    else:
        gx, gy = xn, yn
    if gx.shape[0] != world_size * x.shape[0] or not 0 <= rank < world_size:
        # Without an initialised process group the gather is the identity: fail loudly rather than
        # compute a loss against the wrong rows.
        raise ValueError(
            f"rank {rank} / world_size {world_size} does not match the gathered batch "
            f"({gx.shape[0]} rows from {x.shape[0]} local rows); is torch.distributed initialised?"
        )
    offset = rank * x.shape[0]
    sid = gsid = None
    if source_ids is not None:
        sid = _ints(source_ids, x.shape[0], "source_ids", x.device)
        gsid = all_gather_with_grad(sid, group) if world_size > 1 else sid  # ints: no gradient flows
    keep = gkeep = None
    if valid is not None:
        keep = _ints(valid, x.shape[0], "valid", x.device).bool()
        # NOTE: gathered as int64: gloo has no bool all_gather
        gkeep = all_gather_with_grad(keep.long(), group).bool() if world_size > 1 else keep
    common = (offset, temperature, cross_zero, same_language_negatives)
    lx = _loss_rows(xn, gx, gy, *common, sid, gsid, margin, gkeep)
    ly = _loss_rows(yn, gy, gx, *common, sid, gsid, margin, gkeep)
    per_anchor = torch.cat([lx, ly])
    if keep is None or gkeep is None:
        return per_anchor.mean()
    n_valid = gkeep.sum()  # stays on the device: no host sync
    weights = torch.cat([keep, keep]).to(per_anchor.dtype)
    loss = (per_anchor * weights).sum() * world_size / (2 * n_valid).clamp_min(1)
    # Fewer than 2 valid pairs: nothing to contrast. 0 * (x, y) keeps a (zero) gradient path to
    # every parameter, so the ranks' gradient buckets stay alike (see MLCTLModel._mlm_loss).
    return torch.where(n_valid >= 2, loss, (x.sum() + y.sum()).to(loss.dtype) * 0.0)


def _ints(values: Any, n: int, name: str, device: torch.device) -> torch.Tensor:
    out = torch.as_tensor(values, device=device).reshape(-1).to(torch.int64)
    if out.shape[0] != n:
        raise ValueError(f"{name} has {out.shape[0]} entries for {n} pairs")
    return out


def inbatch_accuracy(
    x: torch.Tensor, y: torch.Tensor, *, rank: int = 0, world_size: int = 1, group=None
) -> torch.Tensor:
    """Fraction of this rank's rows whose nearest neighbour among the other side's rows of the
    global batch is their translation (both directions averaged). Its mean over ranks is the
    global-batch accuracy; with ``world_size`` 1 it is the accuracy of the batch itself."""
    with torch.no_grad():
        xn = F.normalize(x.float(), dim=-1)
        yn = F.normalize(y.float(), dim=-1)
        gx = all_gather_with_grad(xn, group) if world_size > 1 else xn
        gy = all_gather_with_grad(yn, group) if world_size > 1 else yn
        target = torch.arange(x.shape[0], device=x.device) + rank * x.shape[0]
        a = ((xn @ gy.T).argmax(1) == target).float().mean()
        b = ((yn @ gx.T).argmax(1) == target).float().mean()
        return (a + b) / 2


def contrastive_terms(
    cfg: Config,
    out: Any,
    anchored: torch.Tensor | None,
    rank: int,
    world_size: int,
    source_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contrastive part of the loss, and the (x, y) rows the in-batch accuracy is read from.

    ``model.word_level=false``: CL(s). Otherwise ``multilevel_weight * CL(MLP(s, w)) +
    sentence_weight * CL(s)`` (the paper: 1 and 0). ``anchored`` (bool [B], from the batch) says
    which pairs have an anchor word. With a sentence term, pairs without one are left out of the
    multi-level term and feed the sentence term only; without one they keep the paper code's
    behaviour (the whole side stands in for the word), so no pair is silently dropped.
    """
    lc = cfg.loss
    kw: dict[str, Any] = dict(
        cross_zero=lc.kind == "cz_nce",
        same_language_negatives=lc.same_language_negatives,
        rank=rank,
        world_size=world_size,
        source_ids=source_ids,
        margin=lc.margin,
    )
    b = out.sentence.shape[0] // 2
    s = out.sentence
    if not cfg.model.word_level:
        return contrastive_loss(s[:b], s[b:], lc.temperature, **kw), s[:b], s[b:]
    f = out.fused
    cl = torch.zeros((), device=s.device)
    if lc.multilevel_weight > 0:
        valid = anchored if lc.sentence_weight > 0 else None
        cl = cl + lc.multilevel_weight * contrastive_loss(f[:b], f[b:], lc.temperature, valid=valid, **kw)
    if lc.sentence_weight > 0:
        cl = cl + lc.sentence_weight * contrastive_loss(s[:b], s[b:], lc.temperature, **kw)
    # The accuracy figure follows what retrieval reads once a sentence term trains s.
    rows = s if lc.sentence_weight > 0 else f
    return cl, rows[:b], rows[b:]
