"""Contrastive batches beyond memory: the cached micro-step (GradCache), ``loss.cache_chunk``.

The contrastive loss couples every row of the global batch, but only through the embeddings. So
the step can be cut in three (Gao, Zhang, Han and Callan, "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup", RepL4NLP 2021):

1. embed the rank's pairs in chunks of ``cache_chunk`` pairs without keeping activations (no
   grad); the MLM copy of a chunk's rows rides in the same encoder call;
2. compute the full gathered loss on leaf copies of the embeddings (exactly
   :func:`~mlctl.losses.contrastive_terms`, as the plain step) and its gradient with respect to
   them;
3. run each chunk again with grad, from the random state its first pass started with (the same
   dropout), and back-propagate ``(embedding * cached gradient).sum()`` plus the chunk's share of
   the MLM term.

By the chain rule and linearity the parameter gradient is the plain step's; activations are held
for one chunk at a time, and the cost is one extra forward. The contrastive batch is then
``data.batch_size x world_size`` whatever fits in memory (docs/gradcache.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from mlctl.config import Config
from mlctl.losses import contrastive_terms, inbatch_accuracy
from mlctl.model import EncoderInputs, EncoderOutput


class StepHost(Protocol):
    """What the cached step needs of the trainer running it (:class:`mlctl.engine.Trainer`)."""

    cfg: Config
    engine: Any
    rank: int
    world_size: int

    def mlm_copy(self, batch: dict[str, Any], micro: int) -> tuple[Any, Any]: ...

    def to_device(self, x: Any) -> Any: ...


Terms = Callable[[EncoderOutput], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class CachedResult:
    """The micro-step's figures, detached, on the device (the plain step's meaning)."""

    cl: torch.Tensor  # the contrastive loss of this rank's rows (gathered form)
    mlm: torch.Tensor  # 0.5 * (MLM(x) + MLM(y)) over the whole micro-batch; 0 without MLM
    x: torch.Tensor  # the rows the in-batch accuracy is read from
    y: torch.Tensor


def split_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    chunk: int,
    spans: torch.Tensor | None = None,
    mlm_ids: torch.Tensor | None = None,
    mlm_labels: torch.Tensor | None = None,
) -> list[EncoderInputs]:
    """The encoder calls of a micro-batch in chunks of ``chunk`` pairs, built on the host.

    ``input_ids`` [2B, L] holds the B source rows, then the B target rows (collate's layout). Chunk
    c holds pairs a..b: source rows a..b, then target rows a..b, cut to the chunk's longest row,
    with their masked copy (taken from the whole micro-batch's masking, so it is the plain step's)
    and the MLM weights that make the chunks' MLM losses add up to the micro-batch's."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 pairs, got {chunk}")
    b = input_ids.shape[0] // 2
    calls = []
    for a in range(0, b, chunk):
        e = min(a + chunk, b)
        rows = torch.cat([torch.arange(a, e), torch.arange(b + a, b + e)])
        mask = attention_mask[rows]
        width = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else 1
        mask = mask[:, :width]
        calls.append(
            EncoderInputs.build(
                input_ids[rows, :width],
                mask,
                spans[rows] if spans is not None else None,
                mlm_ids[rows, :width] if mlm_ids is not None else None,
                mlm_labels[rows, :width] if mlm_labels is not None else None,
            )
        )
    return _share_mlm(calls)


def _share_mlm(calls: list[EncoderInputs]) -> list[EncoderInputs]:
    """Weigh each chunk's per-side MLM mean by its share of the micro-batch's masked tokens on that
    side: sum_c mean_c * n_c / N = the micro-batch's mean."""
    masked = [c.masked for c in calls]
    if any(m is None for m in masked):
        return calls
    xs = [m.x_count for m in masked if m is not None]
    ys = [m.labels.shape[0] - m.x_count for m in masked if m is not None]
    total_x, total_y = sum(xs), sum(ys)
    out = []
    for call, x, y in zip(calls, xs, ys, strict=True):
        assert call.masked is not None
        x_weight = x / total_x if total_x else 0.0
        y_weight = y / total_y if total_y else 0.0
        out.append(replace(call, masked=replace(call.masked, x_weight=x_weight, y_weight=y_weight)))
    return out


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The random state dropout draws from: the CPU generator's and, on CUDA, the device's (its seed
    and offset live on the host, so reading them does not wait for the GPU)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _leaf(parts: list[torch.Tensor]) -> torch.Tensor:
    """The chunks' [2n, D] embeddings as the micro-batch's [2B, D] (every source row, then every
    target row), detached, in at least float32 (what the loss computes in: the same values, and
    the gradient the plain step would send back before its cast to the model's dtype)."""
    sizes = [p.shape[0] // 2 for p in parts]
    rows = [p[:n] for p, n in zip(parts, sizes, strict=True)] + [
        p[n:] for p, n in zip(parts, sizes, strict=True)
    ]
    whole = torch.cat(rows).detach()
    return whole.to(torch.promote_types(whole.dtype, torch.float32)).requires_grad_()


def _chunk_grad(grad: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Rows of chunk (start, n) of a [2B, D] gradient, in the chunk's layout."""
    b = grad.shape[0] // 2
    return torch.cat([grad[start : start + n], grad[b + start : b + start + n]])


def cached_backward(
    forward: Callable[[EncoderInputs], EncoderOutput],
    backward: Callable[[torch.Tensor, bool], Any],
    calls: list[EncoderInputs],
    terms: Terms,
    mlm_weight: float,
) -> CachedResult:
    """The cached step's three passes over ``calls`` (on the device, from :func:`split_batch`).

    ``forward`` runs the encoder; ``terms`` is the contrastive part of the loss on a whole
    micro-batch's output (what the plain step applies to its one forward); ``backward(surrogate,
    last)`` back-propagates one chunk's surrogate, ``last`` for the micro-step's final call. The
    parameter gradient it leaves is that of ``cl + mlm_weight * mlm`` on the whole micro-batch."""
    if not calls:
        raise ValueError("no chunks to run")
    device = calls[0].input_ids.device
    # 1. every chunk's embeddings, no activations kept; the random state each call starts from
    states, sentence, fused = [], [], []
    with torch.no_grad():
        for inputs in calls:
            states.append(rng_state(device))
            out = forward(inputs)
            sentence.append(out.sentence)
            fused.append(out.fused)
    # 2. the whole loss on leaves, and its gradient with respect to them
    s = _leaf(sentence)
    f = _leaf([t for t in fused if t is not None]) if fused[0] is not None else None
    cl, x, y = terms(EncoderOutput(sentence=s, fused=f, mlm_loss=None))
    leaves = [s] if f is None else [s, f]
    # NOTE: plain autograd, not engine.backward: these gradients reach no parameter and must not be
    # divided by the accumulation steps (the chunks' engine.backward divides once). Collective:
    # the gather's backward runs here, on every rank.
    grads = torch.autograd.grad(cl, leaves, allow_unused=True)
    gs, gf = grads[0], grads[1] if f is not None else None
    # 3. each chunk again, with grad and the same dropout, back-propagating the cached gradient
    mlm = torch.zeros((), device=cl.device)
    start = 0
    for i, (inputs, state) in enumerate(zip(calls, states, strict=True)):
        n = inputs.rows // 2
        set_rng_state(state, device)
        out = forward(inputs)
        surrogate = torch.zeros((), device=cl.device, dtype=cl.dtype)
        for emb, grad in ((out.sentence, gs), (out.fused, gf)):
            if emb is not None and grad is not None:
                g = _chunk_grad(grad, start, n)
                surrogate = surrogate + (emb.to(g.dtype) * g).sum()
        if out.mlm_loss is not None:
            part = out.mlm_loss.to(torch.promote_types(out.mlm_loss.dtype, torch.float32))
            surrogate = surrogate + mlm_weight * part
            mlm = mlm + part.detach()
        backward(surrogate, i == len(calls) - 1)
        start += n
    return CachedResult(cl=cl.detach(), mlm=mlm, x=x.detach(), y=y.detach())


@contextmanager
def chunk_backwards(engine: Any) -> Iterator[Callable[[torch.Tensor, bool], None]]:
    """Yields ``backward(surrogate, last)`` for :func:`cached_backward`: ``engine.backward`` with
    only the micro-step's final backward at DeepSpeed's gradient-accumulation boundary, and only
    when the micro-step is at one.

    NOTE: every chunk backward looks to DeepSpeed like one more micro-batch of the same
    accumulation window, which is what each stage already handles:
    * ZeRO-0 all-reduces ``param.grad`` in the backward epilogue at the boundary, and ZeRO-1
      reduces its partitions there (or from the gradient hooks, with ``overlap_comm``): left at the
      boundary for every chunk, the first chunk's backward would reduce a part of the gradient and
      the later chunks would add to the reduced one. Boundary False until the last chunk: one
      reduction per optimizer step, over the whole sum.
    * ZeRO-2 reduce-scatters the gradient of every backward into its partitions (that is what frees
      the full gradient) and closes the window (``averaged_gradients``) in the boundary's epilogue:
      K chunks cost K reduce-scatters per micro-step, and only the last may close the window.
      ZeRO-3 reduces the same way (and gathers the parameters for each of the 2K encoder calls).
    ``engine.no_sync()`` is not used: DeepSpeed refuses it under ZeRO-2, and under ZeRO-1 with
    ``overlap_comm`` the hooks reduce at a boundary whatever it says. ``coalesce_grad_reduction``
    spans a whole optimizer step with ``engine.step`` outside it (train_step's loop, not a
    micro-step's business) and refuses ZeRO-0 and bf16. ``scale_wrt_gas`` stays True: the chunks
    are parts of one micro-batch's loss, each divided by the accumulation steps once, as the plain
    step's loss is; the gradient with respect to the embeddings is taken outside engine.backward.

    The optimizer's backward prologue (under ZeRO-1 + bf16 it clears the bf16 gradients each backward
    adds to the fp32 ones) runs from the hooks DeepSpeed hangs on the forward's outputs: each
    chunk's grad pass is a forward of its own, so each backward gets it (EncoderOutput is a tuple
    so that DeepSpeed finds those outputs).
    """
    boundary = engine.is_gradient_accumulation_boundary()

    def backward(surrogate: torch.Tensor, last: bool) -> None:
        engine.set_gradient_accumulation_boundary(boundary and last)
        engine.backward(surrogate)

    try:
        yield backward
    finally:
        # NOTE: None hands the boundary back to DeepSpeed's micro-step counter (its value at rest);
        # the ZeRO optimizer's copy is set from the engine's again before it is read.
        engine.set_gradient_accumulation_boundary(None)


def cached_micro_step(trainer: StepHost, batch: dict[str, Any], micro: int) -> dict[str, torch.Tensor]:
    """:meth:`mlctl.engine.Trainer.micro_step` with ``loss.cache_chunk`` > 0: the same loss,
    gradient and figures, activation memory for one chunk of pairs."""
    cfg = trainer.cfg
    engine = trainer.engine
    word_level = cfg.model.word_level
    mlm_ids, mlm_labels = trainer.mlm_copy(batch, micro)
    calls = split_batch(
        batch["input_ids"],
        batch["attention_mask"],
        cfg.loss.cache_chunk,
        batch["spans"] if word_level else None,
        mlm_ids,
        mlm_labels,
    )
    calls = [trainer.to_device(c) for c in calls]
    anchored = trainer.to_device(batch["anchored"]) if word_level else None
    sids = trainer.to_device(batch["source_ids"])
    rank, world = trainer.rank, trainer.world_size

    def terms(out: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Translations of one source sentence (multiway corpora) are never each other's negatives.
        return contrastive_terms(cfg, out, anchored, rank, world, source_ids=sids)

    with chunk_backwards(engine) as backward:
        r = cached_backward(engine, backward, calls, terms, cfg.loss.mlm_weight)
        engine.step()
    return {
        "loss": r.cl + cfg.loss.mlm_weight * r.mlm,
        "cl": r.cl,
        "mlm": r.mlm,
        "acc": inbatch_accuracy(r.x, r.y, rank=rank, world_size=world),
    }
