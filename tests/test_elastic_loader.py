"""Elastic resize of the ShardLoader: a checkpoint written by N ranks resumed by M ranks continues the
epoch without replaying it. The resized epoch yields exactly the old consumers' unread batches, split
evenly (less a documented tail of fewer batches than consumers); it resumes exactly; a second resize
in the same epoch works; the next epoch is the new world's normal one."""

from __future__ import annotations

import json
import shutil

import pytest

from mlctl.data.dataset import ShardLoader

B = 4
KW = dict(batch_size=B, seed=5, shuffle_buffer=12)  # blocks of 3 batches: resizes land mid-block


def world(shards, size: int, workers: int, **kw) -> list[ShardLoader]:
    return [
        ShardLoader(shards, rank=r, world_size=size, num_workers=workers, **{**KW, **kw}) for r in range(size)
    ]


def take(loader: ShardLoader, n: int) -> list[tuple[str, ...]]:
    """The next ``n`` batches of ``loader`` as tuples of pair ids (the loader's iterator goes on)."""
    it = loader._live if loader._live is not None else iter(loader)
    return [tuple(next(it)["pair_ids"]) for _ in range(n)]


def saved(loaders: list[ShardLoader]) -> list[dict]:
    """Every rank's state through JSON, as the checkpoint holds them."""
    return [json.loads(json.dumps(lo.state_dict())) for lo in loaders]


def close(*groups: list[ShardLoader]) -> None:
    for group in groups:
        for lo in group:
            lo.close()


def per_consumer(rank_batches: list[list], workers: int) -> list[list]:
    """Split each rank's batch stream into its logical workers' streams (the DataLoader takes them
    round robin), in consumer order."""
    w = max(1, workers)
    return [batches[i::w] for batches in rank_batches for i in range(w)]


def reference_epoch(shards, size: int, workers: int, **kw) -> list[list[tuple[str, ...]]]:
    """Epoch 0 of an uninterrupted run, per consumer."""
    los = world(shards, size, workers, **kw)
    out = per_consumer([take(lo, lo.batches_per_epoch) for lo in los], workers)
    close(los)
    return out


def pairs(batches) -> list[str]:
    return [p for b in batches for p in b]


@pytest.mark.parametrize(
    "old,new",
    [
        ((2, 0), (1, 0)),
        ((2, 2), (1, 2)),
        ((1, 0), (2, 0)),
        ((1, 2), (2, 0)),
        ((3, 0), (2, 2)),
        ((3, 1), (2, 0)),
        ((2, 0), (2, 2)),  # only the loader workers changed
    ],
    ids=lambda t: f"{t[0]}x{t[1]}",
)
def test_resize_continues_the_epoch(tiny_shards, old, new):
    check_resize(tiny_shards, old, new)


def check_resize(shards, old, new, exactly_once: bool = True, **kw) -> None:
    """Take a third of epoch 0 on the ``old`` (ranks, workers), resize to ``new``, finish the epoch
    and go one epoch further."""
    ref = reference_epoch(shards, *old, **kw)  # per old consumer
    olds = world(shards, *old, **kw)
    k = olds[0].batches_per_epoch // 3 + 1
    read = [take(lo, k) for lo in olds]
    states = saved(olds)
    close(olds)

    news = world(shards, *new, **kw)
    summaries = [lo.load_resized_state(states) for lo in news]
    m = news[0].epoch_batches
    assert all(lo.epoch_batches == m and lo.epoch == 0 for lo in news)
    got = [take(lo, m) for lo in news]
    assert all(lo.epoch == 1 and lo.batch_in_epoch == 0 for lo in news)

    # What each old consumer had not yielded yet, consumer after consumer, split evenly in order;
    # the tail of fewer batches than new consumers is dropped.
    done = per_consumer(read, old[1])
    rest = [b for c, batches in enumerate(ref) for b in batches[len(done[c]) :]]
    consumers = new[0] * max(1, new[1])
    each = len(rest) // consumers
    assert per_consumer(got, new[1]) == [rest[q * each : (q + 1) * each] for q in range(consumers)]
    dropped = rest[consumers * each :]
    assert len(dropped) < consumers and summaries[0]["dropped"] == len(dropped)
    assert summaries[0]["remaining"] == len(rest) and summaries[0]["per_rank"] == m

    if exactly_once:  # over the whole epoch: no pair twice, every pair but the documented tails
        seen = pairs(b for r in read for b in r) + pairs(b for g in got for b in g)
        assert len(seen) == len(set(seen))
        epoch = set(pairs(b for c in ref for b in c))  # the old world's epoch: the order less its tail
        assert set(seen) == epoch - set(pairs(dropped))

    # The epoch after the resized one is the new world's normal epoch 1.
    for r, lo in enumerate(news):
        fresh = ShardLoader(shards, rank=r, world_size=new[0], num_workers=new[1], **{**KW, **kw})
        fresh.load_state_dict({**fresh.state_dict(), "epoch": 1, "batch_in_epoch": 0})
        n = fresh.batches_per_epoch
        assert take(lo, n) == take(fresh, n)
        fresh.close()
    close(news)


def test_resize_with_length_buckets(tiny_shards):
    check_resize(tiny_shards, (2, 0), (3, 0), bucket_by_length=True, bucket_size=8)


def test_resize_over_damaged_shards(tiny_shards, tmp_path):
    """Holes of a corrupt shard are filled up inside the old plan's blocks, so they rebuild too."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_shards, bad)
    for name in ("shard-000002.tar", "shard-000005.tar"):  # same size: found while streaming
        raw = bytearray((bad / name).read_bytes())
        raw[1100] ^= 0xFF
        (bad / name).write_bytes(bytes(raw))
    check_resize(bad, (2, 0), (1, 2), exactly_once=False)


@pytest.mark.parametrize("new", [(1, 0), (2, 2)], ids=str)
def test_resume_inside_a_resized_epoch_is_exact(tiny_shards, new):
    olds = world(tiny_shards, 3, 0)
    for lo in olds:
        take(lo, 7)
    states = saved(olds)
    close(olds)
    news = world(tiny_shards, *new)
    for lo in news:
        lo.load_resized_state(states)
    m = news[0].epoch_batches
    k = m - 2  # save two batches before the resized epoch ends, compare across its end
    for r, lo in enumerate(news):
        take(lo, k)
        state = json.loads(json.dumps(lo.state_dict()))
        expected = take(lo, 6)
        again = ShardLoader(tiny_shards, rank=r, world_size=new[0], num_workers=new[1], **KW)
        again.load_state_dict(state)
        assert take(again, 6) == expected
        assert again.epoch == 1  # crossed into the normal epoch
        again.close()
    close(news)


@pytest.mark.parametrize(
    "chain", [[(3, 0), (2, 2), (1, 0)], [(1, 2), (2, 0), (3, 1)]], ids=lambda c: "-".join(map(str, c))
)
def test_second_resize_in_the_same_epoch(tiny_shards, chain):
    ref = reference_epoch(tiny_shards, *chain[0])
    batches = {b for c in ref for b in c}
    loaders = world(tiny_shards, *chain[0])
    seen: list[str] = []
    dropped = 0
    for step, shape in enumerate(chain[1:]):
        for lo in loaders:
            seen += pairs(take(lo, 3 + 2 * step))
        states = saved(loaders)
        close(loaders)
        loaders = world(tiny_shards, *shape)
        dropped += min(lo.load_resized_state(states)["dropped"] for lo in loaders)
    for lo in loaders:
        got = take(lo, lo.epoch_batches)
        assert set(got) <= batches  # the old world's own batches, rebuilt
        seen += pairs(got)
    assert all(lo.epoch == 1 for lo in loaders)
    assert len(seen) == len(set(seen))
    assert len(set(pairs(batches)) - set(seen)) == dropped * B  # only the dropped tails are missing
    close(loaders)


def test_too_little_left_starts_the_next_epoch(tiny_shards):
    olds = world(tiny_shards, 2, 0)
    for lo in olds:
        take(lo, lo.batches_per_epoch - 1)  # two batches left in all, for six new consumers
    states = saved(olds)
    close(olds)
    news = world(tiny_shards, 3, 2)
    for r, lo in enumerate(news):
        assert lo.load_resized_state(states)["dropped"] == 2
        assert (lo.epoch, lo.batch_in_epoch, lo.epoch_batches) == (1, 0, lo.batches_per_epoch)
        fresh = ShardLoader(tiny_shards, rank=r, world_size=3, num_workers=2, **KW)
        fresh.load_state_dict({**fresh.state_dict(), "epoch": 1, "batch_in_epoch": 0})
        assert take(lo, 3) == take(fresh, 3)
        fresh.close()
    close(news)


def test_saved_on_an_epoch_boundary_starts_the_new_worlds_epoch(tiny_shards):
    olds = world(tiny_shards, 2, 0)
    for lo in olds:
        take(lo, lo.batches_per_epoch)
    states = saved(olds)
    close(olds)
    lo = ShardLoader(tiny_shards, **KW)
    assert lo.load_resized_state(states) == {
        "epoch": 1,
        "per_rank": lo.batches_per_epoch,
        "remaining": None,
        "dropped": 0,
    }
    fresh = ShardLoader(tiny_shards, **KW)
    fresh.load_state_dict({**fresh.state_dict(), "epoch": 1})
    assert take(lo, 5) == take(fresh, 5)
    close([lo, fresh])


def test_same_world_is_an_exact_resume(tiny_shards):
    olds = world(tiny_shards, 2, 0)
    for lo in olds:
        take(lo, 5)
    states = saved(olds)
    expected = [take(lo, 4) for lo in olds]
    close(olds)
    for r, lo in enumerate(world(tiny_shards, 2, 0)):
        lo.load_resized_state(states)
        assert lo.state_dict()["resized"] is None and take(lo, 4) == expected[r]
        lo.close()


def test_inconsistent_states_are_refused(tiny_shards):
    olds = world(tiny_shards, 2, 0)
    states = saved(olds)
    lo = ShardLoader(tiny_shards, **KW)
    with pytest.raises(ValueError, match="saved by 2 rank"):
        lo.load_resized_state(states[:1])
    with pytest.raises(ValueError, match="rank 1 is missing"):
        lo.load_resized_state([states[0], None])
    with pytest.raises(ValueError, match=r"states\[0\] holds the loader state of rank 1"):
        lo.load_resized_state(states[::-1])
    with pytest.raises(ValueError, match="seed=6"):
        lo.load_resized_state([states[0], {**states[1], "seed": 6}])
    with pytest.raises(ValueError, match="epoch"):
        lo.load_resized_state([states[0], {**states[1], "epoch": 1}])
    with pytest.raises(ValueError, match="samples"):
        lo.load_resized_state([{**s, "samples": 400} for s in states])
    other = ShardLoader(tiny_shards, **{**KW, "batch_size": 8})
    with pytest.raises(ValueError, match="batch_size"):
        other.load_resized_state(states)
    reblocked = ShardLoader(tiny_shards, **{**KW, "shuffle_buffer": 24})
    with pytest.raises(ValueError, match="block"):
        reblocked.load_resized_state(states)
    close(olds)
