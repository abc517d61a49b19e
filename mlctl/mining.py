"""BUCC-style bitext mining F1 of an encoder on aligned pairs.

The pairs are shuffled (fixed seed) and cut into a dev and a test half. Inside each half, half of
the pairs stay gold pairs; the other pairs are cut again in two, and the English side keeps only the
English sentences of the first part, the xx side only the xx sentences of the second. Those are
distractors whose translation is absent from the other side, as in BUCC. Candidates are the forward
(en -> best xx) and backward (xx -> best en) nearest neighbours by ratio margin (Artetxe & Schwenk
2019, k=4), taking the union of both directions; the margin threshold that maximises F1 on the dev
half is applied to the test half.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from mlctl.retrieval import normalise

MIN_MINING_PAIRS = 10  # below this a half holds too few gold pairs for a threshold to mean anything
MARGIN_K = 4


def ratio_margin(src: torch.Tensor, tgt: torch.Tensor, k: int = MARGIN_K) -> torch.Tensor:
    """Ratio margin [S, T]: cos(x, y) / (mean cos of x's k nearest targets / 2 + mean cos of y's
    k nearest sources / 2), which is Artetxe & Schwenk's sum over k neighbours divided by 2k."""
    sim = normalise(src) @ normalise(tgt).T
    k_src = min(k, sim.shape[1])
    k_tgt = min(k, sim.shape[0])
    src_knn = sim.topk(k_src, dim=1).values.mean(dim=1)  # [S]
    tgt_knn = sim.topk(k_tgt, dim=0).values.mean(dim=0)  # [T]
    return sim / (src_knn.unsqueeze(1) / 2 + tgt_knn.unsqueeze(0) / 2)


def mine_candidates(en: torch.Tensor, xx: torch.Tensor, k: int = MARGIN_K) -> dict[tuple[int, int], float]:
    """Union of forward and backward best-margin pairs: {(en index, xx index): margin}."""
    margin = ratio_margin(en, xx, k)
    out: dict[tuple[int, int], float] = {}
    fwd = margin.max(dim=1)
    for i, (j, s) in enumerate(zip(fwd.indices.tolist(), fwd.values.tolist(), strict=True)):
        out[(i, j)] = s
    bwd = margin.max(dim=0)
    for j, (i, s) in enumerate(zip(bwd.indices.tolist(), bwd.values.tolist(), strict=True)):
        out[(i, j)] = s
    return out


def prf(predicted: set, gold: set) -> dict[str, float]:
    tp = len(predicted & gold)
    p = tp / len(predicted) if predicted else 0.0
    r = tp / len(gold) if gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f}


def best_threshold(candidates: dict[tuple[int, int], float], gold: set) -> float:
    """The margin threshold (accept score >= t) with the highest F1 against ``gold``."""
    ranked = sorted(candidates.items(), key=lambda kv: -kv[1])
    best_f1, best_t, tp = -1.0, float("inf"), 0
    for n, (pair, score) in enumerate(ranked, start=1):
        tp += pair in gold
        p, r = tp / n, tp / len(gold)
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        if f1 > best_f1:
            best_f1, best_t = f1, score
    return best_t


@dataclass
class MiningSplit:
    """One half of the pairs laid out as two monolingual sides with gold links between them."""

    en_rows: list[int]  # pair index whose English sentence sits at each en position
    xx_rows: list[int]  # pair index whose xx sentence sits at each xx position
    gold: set[tuple[int, int]]  # (en position, xx position)


def mining_splits(n: int, seed: int = 0, gold_fraction: float = 0.5) -> tuple[MiningSplit, MiningSplit]:
    """Deterministic dev and test layouts over ``n`` pairs (see the module docstring)."""
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    halves = (order[: n // 2], order[n // 2 :])
    splits = []
    for half in halves:
        n_gold = max(1, round(len(half) * gold_fraction))
        gold_ids, rest = half[:n_gold], half[n_gold:]
        en_only, xx_only = rest[: len(rest) // 2], rest[len(rest) // 2 :]
        en_rows = gold_ids + en_only
        xx_rows = gold_ids + xx_only
        rng.shuffle(en_rows)
        rng.shuffle(xx_rows)
        gold_set = set(gold_ids)
        en_pos = {pid: i for i, pid in enumerate(en_rows) if pid in gold_set}
        xx_pos = {pid: j for j, pid in enumerate(xx_rows) if pid in gold_set}
        splits.append(MiningSplit(en_rows, xx_rows, {(en_pos[g], xx_pos[g]) for g in gold_ids}))
    return splits[0], splits[1]


def bitext_mining(en: torch.Tensor, xx: torch.Tensor, seed: int = 0, k: int = MARGIN_K) -> dict[str, Any]:
    """BUCC-style P/R/F1 on the test half, threshold from the dev half. en[i] translates xx[i]."""
    n = en.shape[0]
    if n < MIN_MINING_PAIRS:
        raise ValueError(f"bitext mining needs at least {MIN_MINING_PAIRS} pairs, got {n}")
    dev, test = mining_splits(n, seed)

    def candidates(split: MiningSplit) -> dict[tuple[int, int], float]:
        return mine_candidates(en[split.en_rows], xx[split.xx_rows], k)

    threshold = best_threshold(candidates(dev), dev.gold)
    test_cands = candidates(test)
    accepted = {pair for pair, score in test_cands.items() if score >= threshold}
    return {
        **prf(accepted, test.gold),
        "threshold": threshold,
        "dev_f1": prf({p for p, s in candidates(dev).items() if s >= threshold}, dev.gold)["f1"],
        "test_gold": len(test.gold),
        "test_en": len(test.en_rows),
        "test_xx": len(test.xx_rows),
        "k": k,
    }
