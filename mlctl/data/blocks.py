"""The batches of a prepared shard folder, as a pure function of (files, seed, epoch, consumer):
the epoch's global order (:class:`Plan`), reading it from any position (shards verified against the
manifest, damage turned into holes), and the blocks and batches each consumer makes of its range.
:class:`mlctl.data.dataset.ShardLoader` decides which consumer a process plays and where it resumes.

* The shard folder is a location of :mod:`mlctl.storage`: a local folder or an object-store URI
  (``s3://bucket/prefix?endpoint_override=...``). Each shard is opened through WebDataset's URL
  opening (``webdataset.gopen``, which :func:`mlctl.storage.register_gopen` teaches the store's
  scheme, in the reading process itself) and read into memory, never to local disk. Messages name
  locations without their query string (:func:`mlctl.storage.display`).
* Damage that keeps the size (flipped bytes) is found while streaming: a shard is read whole and its
  sha256 checked before any of its records is used. A bad shard (or one that fails to parse) becomes
  a hole in the global order: its positions count as read but yield nothing, ``corrupt_shard`` is
  counted (once per rank and epoch that meets it) and the consumer's block is filled up with repeats
  of the block's own readable records (or, for a block with none, with the next readable records of
  the epoch's order). So the batches per rank and epoch never change, every rank issues the same
  collectives per step, and what is yielded is a pure function of (files, seed, epoch, consumer):
  resuming reproduces it. The checked bytes are streamed by WebDataset's tar iterator and
  ``group_by_keys`` (one record = the members that share a key), from memory.
* Epoch ``e``: the valid shards are permuted with ``rng(seed, e)`` and concatenated into one global
  sample order of N samples. There are ``P = world_size x max(1, num_workers)`` consumers; each gets
  ``nb = N // (P x B)`` batches, i.e. the contiguous range ``[c L, (c+1) L)`` of ``L = nb B``
  samples, consumer ``c = rank x W + worker``. The tail ``N - P L`` (< P B samples) is dropped. So
  every rank and worker yields the same number of batches whatever the shard sizes, each pair is
  seen at most once per epoch, and the partition changes every epoch.
* A consumer reads its range as blocks of K samples (K >= shuffle_buffer, a multiple of B, and of the
  bucket size when bucketing). Within a block the samples are permuted with ``rng(seed, e, c, block)``;
  with bucketing, each bucket of the permuted block is sorted by length, cut into batches and the
  block's batches are shuffled. A block is a pure function of (seed, epoch, consumer, block index).
* One anchor per pair per epoch: a hash of (seed, epoch, pair id) picks it (:func:`draw_anchor`).
  Code-switching (``code_switch`` > 0, :mod:`mlctl.data.switch`) draws from the same kind of hash.
* Rebuilding batch ``j`` of a consumer re-opens the one shard that holds the start of its block,
  skips within it, rebuilds the block and drops the batches before ``j``: the cost is bounded by one
  shard plus one block, whatever came before. A resized epoch's batches are segments of the plan it
  started with (:mod:`mlctl.data.resize`), rebuilt the same way.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import tarfile
from bisect import bisect_right

import numpy as np
import webdataset
from webdataset.tariterators import group_by_keys, tar_file_iterator

from mlctl import storage
from mlctl.data import resize
from mlctl.data.collate import collate
from mlctl.data.manifest import CorruptShard
from mlctl.data.shards import MEMBER_EXTS, ShardRefused

log = logging.getLogger(__name__)
_HOLE = object()  # a position of a corrupt shard: counts as read, yields nothing


class NoReadableData(RuntimeError):
    """Every shard of the folder is damaged: there is nothing to train on (retrying cannot help)."""


def _read_verified(location: str, size: int | None, sha256: str | None) -> bytes:
    """The whole shard (a local file or an object), read into memory through WebDataset's URL
    opening and checked against the manifest's size and checksum (when it has them)."""
    # NOTE: registered here, in the process that reads: a DataLoader worker started by spawn or
    # forkserver has a fresh webdataset whose gopen knows no object-store scheme.
    storage.register_gopen()
    with webdataset.gopen(location, "rb") as f:
        data = f.read()
    if size is not None and len(data) != size:
        raise CorruptShard(f"{len(data)} bytes, manifest says {size}")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CorruptShard("sha256 differs from the manifest's")
    return data


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class Plan:
    """Everything a consumer needs to rebuild any block; small and picklable for worker processes."""

    def __init__(
        self,
        root: str,
        shards: list[tuple[str, int]],
        batch_size: int,
        consumers: int,
        seed: int,
        shuffle_buffer: int,
        bucket_by_length: bool,
        bucket_size: int,
        pad_id: int,
        checks: dict[str, tuple[int | None, str | None]] | None = None,
        switch: float = 0.0,
        max_tokens: int = 512,
        keep_anchor: bool = True,
    ) -> None:
        self.checks = checks or {}  # shard name -> (bytes, sha256) from the manifest
        # code-switching (mlctl.data.switch)
        self.switch, self.max_tokens, self.keep_anchor = switch, max_tokens, keep_anchor
        self.root, self.shards, self.b, self.consumers, self.seed = root, shards, batch_size, consumers, seed
        self.pad_id = pad_id
        self.total = sum(n for _, n in shards)
        self.nb = self.total // (consumers * batch_size)  # batches per consumer per epoch
        self.bucket = _round_up(bucket_size or 8 * batch_size, batch_size) if bucket_by_length else 0
        k = _round_up(max(shuffle_buffer, batch_size), batch_size)
        self.block = _round_up(k, self.bucket) if self.bucket else k

    def with_consumers(self, consumers: int) -> Plan:
        """The same shards and settings split over another number of consumers (the plan a resized
        epoch started with)."""
        other = copy.copy(self)
        other.consumers = consumers
        other.nb = self.total // (consumers * self.b)
        return other

    def epoch_shards(self, epoch: int) -> tuple[list[tuple[str, int]], list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        shards = [self.shards[i] for i in order]
        starts = np.cumsum([0] + [n for _, n in shards]).tolist()
        return shards, starts


class _Reader:
    """Sequential reader of the global order from a position. It yields one item per position: a
    record, ``None`` (an undecodable record) or ``_HOLE`` (a position of a corrupt shard)."""

    def __init__(self, plan: Plan, epoch: int, start: int, skipped: dict) -> None:
        self.plan, self.skipped = plan, skipped
        self.shards, starts = plan.epoch_shards(epoch)
        self.si = bisect_right(starts, start) - 1
        self.offset = start - starts[self.si]
        self._it = self._records()

    def _records(self):
        while self.si < len(self.shards):
            name, n = self.shards[self.si]
            location = storage.join(self.plan.root, name)
            where = storage.display(location)
            skip, done = self.offset, 0  # positions of this shard consumed so far
            try:
                data = _read_verified(location, *self.plan.checks.get(name, (None, None)))
                # The bytes were checked against the manifest above, so WebDataset streams them
                # from memory instead of reopening the file or object.
                members = ({**m, "__url__": where} for m in tar_file_iterator(io.BytesIO(data)))
                for sample in group_by_keys(members):
                    if done == n:
                        break
                    done += 1
                    if done > skip:
                        yield _decode(sample, where)
                if done < n:
                    raise tarfile.ReadError(f"{done} records, manifest says {n}")
            except ShardRefused:
                raise
            except (tarfile.TarError, OSError, ValueError) as e:
                # Count it and keep the positions: the consumer's block is filled up later, so the
                # batch count per rank does not change (see the module docstring).
                self.skipped["corrupt_shard"] = self.skipped.get("corrupt_shard", 0) + 1
                log.warning("skipping corrupt shard %s while streaming: %s", where, e)
                for _ in range(max(done, skip), n):
                    yield _HOLE
            self.si += 1
            self.offset = 0

    def take(self, n: int) -> list[dict]:
        """The readable records among the next ``n`` positions (fewer at the end of the order)."""
        out: list[dict] = []
        for _ in range(n):
            rec = next(self._it, _HOLE)
            if rec is None:
                self.skipped["corrupt_sample"] = self.skipped.get("corrupt_sample", 0) + 1
            elif rec is not _HOLE:
                out.append(rec)  # type: ignore[arg-type]  # a decoded record
        return out


def _borrow(plan: Plan, epoch: int, start: int, want: int) -> list[dict]:
    """Up to ``want`` readable records from position ``start`` on (wrapping once around the epoch's
    order), for a block whose own positions are all unreadable. Not counted again as skips."""
    out: list[dict] = []
    for s0 in (start % plan.total, 0):
        reader = _Reader(plan, epoch, s0, {})
        remaining = plan.total - s0
        while remaining and len(out) < want:
            step = min(want, remaining)
            out.extend(reader.take(step))
            remaining -= step
        if out:
            return out[:want]
    raise NoReadableData(
        f"no readable sample in any shard under {storage.display(plan.root)} (epoch {epoch})"
    )


def _decode(sample: dict, where: str) -> dict | None:
    """json + int32 npy members only; anything else was refused by the header scan already."""
    extra = [k for k in sample if not k.startswith("__") and k not in MEMBER_EXTS]
    if extra:
        raise ShardRefused(f"shard {where} holds member {sample['__key__']}.{extra[0]}: refusing it")
    try:
        meta = json.loads(sample["json"])
        src = np.load(io.BytesIO(sample["src.npy"]), allow_pickle=False)
        tgt = np.load(io.BytesIO(sample["tgt.npy"]), allow_pickle=False)
    except (KeyError, ValueError, OSError) as e:
        log.warning("corrupt record %s in %s: %s", sample.get("__key__"), where, e)
        return None
    return {"meta": meta, "src": src, "tgt": tgt}


def _block_batches(
    plan: Plan, epoch: int, consumer: int, block: int, records: list[dict]
) -> list[list[dict]]:
    """The batches of one block: permuted (then bucketed) deterministically."""
    want = min(plan.block, plan.nb * plan.b - block * plan.block)
    if not records:  # every position of the block is in a corrupt shard
        first = consumer * plan.nb * plan.b + block * plan.block
        records = _borrow(plan, epoch, first + want, want)
    if len(records) < want:  # corrupt data replaced by repeats so every rank keeps the same step count
        records = records + [records[i % len(records)] for i in range(want - len(records))]
    rng = np.random.default_rng([plan.seed, epoch, consumer, block])
    recs = [records[i] for i in rng.permutation(len(records))]
    if plan.bucket:
        batches: list[list[dict]] = []
        for s in range(0, len(recs), plan.bucket):
            bucket = sorted(recs[s : s + plan.bucket], key=lambda r: max(len(r["src"]), len(r["tgt"])))
            batches.extend(bucket[i : i + plan.b] for i in range(0, len(bucket), plan.b))
        return [batches[i] for i in rng.permutation(len(batches))]
    return [recs[i : i + plan.b] for i in range(0, len(recs), plan.b)]


def _range_batches(plan: Plan, consumer: int, epoch: int, start: int, end: int, skipped: dict):
    """Batches ``[start, end)`` of one consumer's epoch, collated: the block holding ``start`` is
    rebuilt whole and its batches before ``start`` are dropped."""
    per_block = plan.block // plan.b
    block = start // per_block
    reader = _Reader(plan, epoch, consumer * plan.nb * plan.b + block * plan.block, skipped)
    first = block * per_block  # index of the block's first batch
    while first < end:
        want = min(plan.block, plan.nb * plan.b - block * plan.block)
        batches = _block_batches(plan, epoch, consumer, block, reader.take(want))
        for batch in batches[max(0, start - first) : end - first]:
            out = collate(
                batch, plan.pad_id, plan.seed, epoch, plan.switch, plan.max_tokens, plan.keep_anchor
            )
            out["_skipped"] = dict(skipped)  # read-time skips travel with the batch out of workers
            yield out
        block, first = block + 1, first + len(batches)


def _segment_batches(plan: Plan, epoch: int, segments: list[resize.Segment], start: int, skipped: dict):
    """A consumer's part of a resized epoch from its batch ``start`` on; ``plan`` is the plan the
    epoch started with, whose blocks the segments point into."""
    for consumer, a, b in resize.drop(segments, start):
        yield from _range_batches(plan, consumer, epoch, a, b, skipped)


def consumer_batches(
    plan: Plan,
    consumer: int,
    epoch: int,
    start_batch: int,
    skipped: dict,
    resized: tuple[Plan, list[resize.Segment]] | None = None,
):
    """Batches of one consumer from ``start_batch`` of ``epoch`` on, forever (epoch after epoch).
    ``resized``: (the epoch's plan, this consumer's segments) when ``epoch`` is a resized one."""
    if resized is not None:
        yield from _segment_batches(resized[0], epoch, resized[1], start_batch, skipped)
        epoch, start_batch = epoch + 1, 0
    while True:
        yield from _range_batches(plan, consumer, epoch, start_batch, plan.nb, skipped)
        epoch, start_batch = epoch + 1, 0
