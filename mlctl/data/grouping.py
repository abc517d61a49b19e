"""Batches of lexically similar pairs: in-batch negatives that share words with the positive.

A contrastive batch of random pairs is mostly easy negatives ("Delete file" against "Network
settings"); the same pairs regrouped so that "Delete file", "Delete folder" and "Copy file" meet in
one batch make the loss separate what retrieval has to separate. The similarity is the cosine of
idf-weighted bags of the source side's token ids, computed from the block being batched (no model,
no extra pass over the corpus), so grouping is a pure function of the block: resume stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def token_vectors(rows: Sequence[np.ndarray], ignore: Sequence[int] = ()) -> torch.Tensor:
    """Row-normalised idf-weighted bag-of-tokens vectors [n, V'] (sparse, V' = tokens in ``rows``)."""
    n = len(rows)
    ignored = np.asarray(sorted(set(ignore)), dtype=np.int64)
    uniq = [np.setdiff1d(np.unique(np.asarray(r, dtype=np.int64)), ignored) for r in rows]
    lengths = np.asarray([len(u) for u in uniq], dtype=np.int64)
    flat = np.concatenate(uniq) if n else np.zeros(0, dtype=np.int64)
    vocab, cols, df = np.unique(flat, return_inverse=True, return_counts=True)
    idf = np.log((1.0 + n) / (1.0 + df))  # a token in every row ([CLS], [SEP]) weighs nothing
    vals = idf[cols]
    row_of = np.repeat(np.arange(n), lengths)
    norms = np.sqrt(np.bincount(row_of, weights=vals**2, minlength=n))
    vals = vals / np.maximum(norms[row_of], 1e-12)
    idx = torch.from_numpy(np.stack([row_of, cols]))
    shape = (n, len(vocab))
    return torch.sparse_coo_tensor(
        idx, torch.from_numpy(vals).float(), shape, check_invariants=False
    ).coalesce()


# Rows compared at once: the similarity matrix is pool^2 floats (64 MiB at 4096).
MAX_POOL = 4096


def similar_batches(
    rows: Sequence[np.ndarray], batch_size: int, rng: np.random.Generator, ignore: Sequence[int] = ()
) -> list[list[int]]:
    """Indices of ``rows`` in groups of ``batch_size`` (a multiple of it is expected; a short last
    group takes the rest): a random free row and the free rows most similar to it, greedily.
    Later groups are built from what is left, so they are less alike; every row is used once.
    More than ``MAX_POOL`` rows are grouped in consecutive pools of about that size."""
    n = len(rows)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pool = max(batch_size, MAX_POOL // batch_size * batch_size)
    if n > pool:
        out = []
        for start in range(0, n, pool):
            part = similar_batches(rows[start : start + pool], batch_size, rng, ignore)
            out += [[start + i for i in g] for g in part]
        return out
    if n == 0:
        return []
    x = token_vectors(rows, ignore)
    sims = torch.sparse.mm(x, x.to_dense().T).numpy()  # [n, n]
    free = np.ones(n, dtype=bool)
    groups: list[list[int]] = []
    for seed in rng.permutation(n):
        if not free[seed]:
            continue
        cand = np.flatnonzero(free)
        # Most similar first; ties (rows sharing no token) in index order, so the result is exact.
        take = cand[np.argsort(-sims[seed, cand], kind="stable")[:batch_size]]
        if seed not in take:  # an all-ignored row has similarity 0 to itself: it still leads its group
            take = np.concatenate([[seed], take[: batch_size - 1]])
        free[take] = False
        groups.append(take.tolist())
    return groups
