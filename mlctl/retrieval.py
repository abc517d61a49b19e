"""Sentence vectors and Tatoeba-style retrieval accuracy.

Sentence vectors are the model's own pooling (:meth:`MLCTLModel.encode`: masked mean over real
tokens, averaged over ``pool_layers``), compared by cosine similarity.

Retrieval: for each xx sentence, is the nearest English sentence its translation (xx2en), and back
(en2xx). A hit is judged by text, so when the same English sentence occurs twice either copy counts.
The engine calls :func:`retrieval_accuracy_on_pairs` during training, every rank encoding a share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def encode_texts(
    model,
    tokenizer,
    texts: list[str],
    batch_size: int = 128,
    layers: list[int] | None = None,
    max_length: int = 128,
    progress: bool = False,
    desc: str = "encode",
    on_device: bool = False,
) -> torch.Tensor:
    """Sentence vectors [N, H] (float32) in the order of ``texts``: on the CPU, or left on the
    model's device with ``on_device`` (one copy back at the end instead of one per batch).

    Texts are batched by length so little compute goes to padding; the pooling ignores padding,
    so the vectors do not depend on the batching.
    """
    from tqdm.auto import tqdm

    from mlctl.model import EncoderInputs

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    chunks = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        # built on the CPU, so the device is never read back batch by batch
        inputs = EncoderInputs.build(enc["input_ids"], enc["attention_mask"]).to(device)
        chunks.append(model.encode_inputs(inputs, layers).float())
    if not chunks:
        return torch.empty(0, model.hidden_size, device=device if on_device else "cpu")
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))  # sorted position of each text
    out = torch.cat(chunks).index_select(0, back.to(device))
    return out if on_device else out.cpu()


def encode_sharded(
    model, tokenizer, texts: list[str], batch_size: int, rank: int, world_size: int, max_length: int = 128
) -> torch.Tensor:
    """:func:`encode_texts` split across ranks: each encodes an equal share and the shares are
    gathered on the device; every rank gets all [N, H] vectors (on the device).

    NOTE: the shares are padded to the same length (repeating a text) so every rank runs the same
    number of forward passes; under ZeRO-3 each forward is collective and a rank with one batch
    fewer would leave the others waiting."""
    from mlctl.distributed import all_gather_rows

    if world_size == 1:
        return encode_texts(model, tokenizer, texts, batch_size, None, max_length, on_device=True)
    per = -(-len(texts) // world_size)
    share = texts[rank * per : (rank + 1) * per]
    share = share + [texts[-1]] * (per - len(share))
    mine = encode_texts(model, tokenizer, share, batch_size, None, max_length, on_device=True)
    return all_gather_rows(mine)[: len(texts)]


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (float32), so a matrix product is cosine similarity."""
    return F.normalize(x.float(), dim=-1)


def _hits(sim: torch.Tensor, query_side: list[str], target_side: list[str]) -> float:
    """Share of rows whose best column holds the same text as their own column."""
    best = sim.argmax(dim=1).tolist()
    return sum(target_side[j] == target_side[i] for i, j in enumerate(best)) / max(1, len(query_side))


def retrieval_accuracy(en: torch.Tensor, xx: torch.Tensor, pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Tatoeba-style accuracy from vectors of aligned rows: en[i] translates xx[i]."""
    if en.shape != xx.shape or en.shape[0] != len(pairs):
        raise ValueError(f"shapes differ: en {tuple(en.shape)}, xx {tuple(xx.shape)}, {len(pairs)} pairs")
    sim = normalise(xx) @ normalise(en).T  # [xx, en]
    en_texts = [p[0] for p in pairs]
    xx_texts = [p[1] for p in pairs]
    xx2en = _hits(sim, xx_texts, en_texts)
    en2xx = _hits(sim.T, en_texts, xx_texts)
    return {"xx2en": xx2en, "en2xx": en2xx, "mean": (xx2en + en2xx) / 2}


def retrieval_accuracy_on_pairs(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    batch_size: int = 128,
    max_length: int = 128,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Encode both sides of ``pairs`` and return {"xx2en", "en2xx", "mean", "pairs"}.

    With ``world_size`` > 1 (during training) every rank must call it with the same pairs: the
    encoding is shared out (:func:`encode_sharded`) and rank 0 scores; the other ranks get {}.
    """
    if not pairs:
        raise ValueError("no pairs to evaluate")
    was_training = model.training
    model.eval()
    try:
        en, xx = (
            encode_sharded(
                model, tokenizer, [p[side] for p in pairs], batch_size, rank, world_size, max_length
            )
            for side in (0, 1)
        )
    finally:
        model.train(was_training)
    if rank != 0:
        return {}
    return {**retrieval_accuracy(en.cpu(), xx.cpu(), pairs), "pairs": len(pairs)}
