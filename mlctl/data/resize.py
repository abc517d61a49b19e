"""Elastic resize of the loader: the rest of an epoch re-split over a new number of consumers.

When the number of ranks (or loader workers) changes between a checkpoint and the resume, the
epoch goes on from where every old consumer had got to instead of starting over (see the module
docstring of :mod:`mlctl.data.dataset`, "Elastic resize"). Everything here is arithmetic on
*segments*; no shard is read.

A segment ``(c, a, b)`` stands for batches ``[a, b)`` of consumer ``c`` under the plan the epoch
started with (its consumer count is ``plan_consumers``): each of those batches is a pure function
of (plan, epoch, c, batch index), so any slice can be rebuilt exactly. A consumer of a normal epoch
owns ``[(c, 0, nb)]``; a consumer of a resized epoch owns a short list of segments.
"""

from __future__ import annotations

from collections.abc import Sequence

Segment = tuple[int, int, int]  # (consumer of the epoch's plan, first batch, end batch)

# Fields every old rank's state must agree on before their positions can be combined.
SHARED_FIELDS = ("world_size", "num_workers", "batch_size", "seed", "samples", "epoch")


def length(segments: list[Segment]) -> int:
    return sum(b - a for _, a, b in segments)


def cut(segments: list[Segment], start: int, end: int) -> list[Segment]:
    """Batches ``[start, end)`` of the concatenation of ``segments``, as segments."""
    out: list[Segment] = []
    pos = 0  # index, in the concatenation, of the current segment's first batch
    for c, a, b in segments:
        lo, hi = max(start, pos), min(end, pos + b - a)
        if lo < hi:
            out.append((c, a + lo - pos, a + hi - pos))
        pos += b - a
    return out


def drop(segments: list[Segment], n: int) -> list[Segment]:
    """``segments`` without their first ``n`` batches."""
    return cut(segments, n, length(segments))


def split(segments: list[Segment], parts: int) -> tuple[list[list[Segment]], int]:
    """``parts`` contiguous runs of equal batch count, and the batches of the tail left out (fewer
    than ``parts``), as the tail of a normal epoch is left out: every consumer must yield the same
    number of batches, or the ranks would issue different numbers of collectives."""
    each = length(segments) // parts
    runs = [cut(segments, i * each, (i + 1) * each) for i in range(parts)]
    return runs, length(segments) - parts * each


def worker_progress(batch_in_epoch: int, workers: int, worker: int) -> int:
    """Batches logical worker ``worker`` of a rank has yielded once the rank yielded
    ``batch_in_epoch`` batches of the epoch (the DataLoader takes its workers round robin)."""
    return max(0, (batch_in_epoch - worker + workers - 1) // workers)


def check_states(states: Sequence[dict | None]) -> None:
    """Refuse, with a sentence, states that do not describe one position of one run: a missing
    rank, ranks out of order, or ranks that disagree on a setting or on the epoch."""
    if not states:
        raise ValueError("no loader state given: pass the data state of every rank of the checkpoint")
    first = states[0]
    if not isinstance(first, dict):
        raise ValueError("the loader state of rank 0 is missing")
    world = first.get("world_size")
    if world != len(states):
        raise ValueError(
            f"{len(states)} loader state(s) given, but they were saved by {world} rank(s): "
            "pass the data state of every rank of the checkpoint, in rank order"
        )
    for rank, state in enumerate(states):
        if not isinstance(state, dict):
            raise ValueError(f"the loader state of rank {rank} is missing")
        if state.get("rank") != rank:
            raise ValueError(f"states[{rank}] holds the loader state of rank {state.get('rank')}")
        for key in (*SHARED_FIELDS, "block", "bucket"):
            if state.get(key) != first.get(key):
                raise ValueError(
                    f"loader states disagree: rank 0 has {key}={first.get(key)}, rank {rank} has "
                    f"{key}={state.get(key)}; they are not from one checkpoint"
                )
        if _plan_consumers(state) != _plan_consumers(first):
            raise ValueError(
                f"loader states disagree on the resize of epoch {first['epoch']} (rank 0 and rank "
                f"{rank}); they are not from one checkpoint"
            )


def _plan_consumers(state: dict) -> int | None:
    resized = state.get("resized")
    return None if resized is None else int(resized["plan_consumers"])


def own_segments(state: dict, worker: int, plan_batches: int) -> list[Segment]:
    """What logical worker ``worker`` of the rank that saved ``state`` owns in its epoch (read or
    not): its part of a resized epoch, or its whole range of a normal one."""
    resized = state.get("resized")
    if resized is not None:
        return [tuple(s) for s in resized["parts"][worker]]  # type: ignore[misc]  # JSON lists
    workers = max(1, state["num_workers"])
    return [(state["rank"] * workers + worker, 0, plan_batches)]


def rest_of_epoch(states: list[dict]) -> tuple[int, int, list[Segment]]:
    """``(epoch, plan_consumers, segments)``: the batches of the current epoch no old consumer has
    yielded yet, consumer after consumer in the old order (each one's current block first, then its
    later blocks), as segments of the plan the epoch started with."""
    check_states(states)
    first = states[0]
    workers = max(1, first["num_workers"])
    plan_consumers = _plan_consumers(first) or first["world_size"] * workers
    plan_batches = first["samples"] // (plan_consumers * first["batch_size"])  # the plan's nb
    rest: list[Segment] = []
    for state in states:
        for w in range(workers):
            done = worker_progress(int(state["batch_in_epoch"]), workers, w)
            rest += drop(own_segments(state, w, plan_batches), done)
    return int(first["epoch"]), plan_consumers, rest
