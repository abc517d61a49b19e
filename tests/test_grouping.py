"""Batches of lexically similar pairs (mlctl.data.grouping) and the loader's ``similar_batches``."""

from __future__ import annotations

import numpy as np
import pytest

from mlctl.data.dataset import ShardLoader
from mlctl.data.grouping import similar_batches, token_vectors

CLS, SEP = 101, 102


def _topic_rows(topics: int, per_topic: int, seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """Rows drawing their words from disjoint vocabularies per topic, shuffled together."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for t in range(topics):
        words = np.arange(1000 + 100 * t, 1000 + 100 * t + 8)  # any two rows of a topic share a word
        for _ in range(per_topic):
            rows.append(np.concatenate([[CLS], rng.choice(words, size=6, replace=False), [SEP]]))
            labels.append(t)
    order = rng.permutation(len(rows))
    return [rows[i] for i in order], [labels[i] for i in order]


def test_groups_follow_shared_words_and_use_every_row_once():
    rows, labels = _topic_rows(topics=4, per_topic=8)
    groups = similar_batches(rows, 8, np.random.default_rng(0))
    assert sorted(i for g in groups for i in g) == list(range(32))
    assert [len(g) for g in groups] == [8, 8, 8, 8]
    for g in groups:  # every batch is one topic: its negatives share words with the positive
        assert len({labels[i] for i in g}) == 1
    # A random cut of the same rows almost never does that (the check is not vacuous).
    rnd = np.random.default_rng(0).permutation(32).reshape(4, 8)
    assert sum(len({labels[i] for i in g}) == 1 for g in rnd) < 4


def test_deterministic_and_seed_dependent():
    rows, _ = _topic_rows(topics=6, per_topic=8, seed=1)
    a = similar_batches(rows, 8, np.random.default_rng(5))
    assert a == similar_batches(rows, 8, np.random.default_rng(5))
    assert a != similar_batches(rows, 8, np.random.default_rng(6))  # the group leaders are drawn


def test_large_blocks_are_grouped_in_pools(monkeypatch):
    import mlctl.data.grouping as grouping

    monkeypatch.setattr(grouping, "MAX_POOL", 16)
    rows, labels = _topic_rows(topics=5, per_topic=8, seed=3)
    groups = grouping.similar_batches(rows, 8, np.random.default_rng(0))
    assert sorted(i for g in groups for i in g) == list(range(40))
    assert all(max(g) // 16 == min(g) // 16 for g in groups)  # no group spans two pools


def test_tokens_in_every_row_weigh_nothing_and_odd_rows_still_placed():
    rows = [
        np.array([CLS, 5, SEP]),
        np.array([CLS, 5, 6, SEP]),
        np.array([CLS, SEP]),
        np.array([CLS, 9, SEP]),
    ]
    x = token_vectors(rows).to_dense()
    assert x.shape[0] == 4
    assert float(x[2].abs().sum()) == 0.0  # only [CLS]/[SEP]: nothing to compare on
    groups = similar_batches(rows, 2, np.random.default_rng(0))
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3]
    # Without the empty row, whichever row leads: the rows sharing token 5 meet, and those sharing 9.
    rows2 = [*rows[:2], rows[3], np.array([CLS, 9, 7, SEP])]
    for seed in range(4):
        got = sorted(sorted(g) for g in similar_batches(rows2, 2, np.random.default_rng(seed)))
        assert got == [[0, 1], [2, 3]]
    # A short tail takes what is left.
    assert [len(g) for g in similar_batches(rows[:3], 2, np.random.default_rng(0))] == [2, 1]
    assert similar_batches([], 4, np.random.default_rng(0)) == []
    with pytest.raises(ValueError, match="batch_size"):
        similar_batches(rows, 0, np.random.default_rng(0))


def _pairs(lo: ShardLoader, n: int) -> list[list[str]]:
    it = iter(lo)
    out = [next(it)["pair_ids"] for _ in range(n)]
    lo.close()
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_loader_similar_batches_once_per_epoch_and_exact_resume(tiny_shards, world):
    kw = dict(batch_size=4, world_size=world, seed=2, shuffle_buffer=16, similar_batches=True)
    los = [ShardLoader(tiny_shards, rank=r, **kw) for r in range(world)]
    n = los[0].batches_per_epoch
    epoch = [p for lo in los for b in _pairs(lo, n) for p in b]
    assert len(epoch) == len(set(epoch)) == n * 4 * world  # every pair at most once, none lost
    plain = _pairs(ShardLoader(tiny_shards, batch_size=4, seed=2, shuffle_buffer=16), n)
    assert _pairs(ShardLoader(tiny_shards, **{**kw, "world_size": 1}), n) != plain
    for r in range(world):
        ref = _pairs(ShardLoader(tiny_shards, rank=r, **kw), n + 3)
        lo = ShardLoader(tiny_shards, rank=r, **kw)
        lo.load_state_dict({**lo.state_dict(), "batch_in_epoch": n - 2})
        assert _pairs(lo, 5) == ref[n - 2 :]  # across the epoch boundary too
