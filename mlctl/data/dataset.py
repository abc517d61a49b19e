"""Streaming loader over `mlctl prepare` shards with equal batches per rank and exact resume.

Partition design
----------------
* The shard folder is a location of :mod:`mlctl.storage`: a local folder or an object-store URI
  (``s3://bucket/prefix?endpoint_override=...``). manifest.json is read from it; each shard is opened
  through WebDataset's URL opening (``webdataset.gopen``, which :func:`mlctl.storage.register_gopen`
  teaches the store's scheme, in the reading process itself) and read into memory, never to local
  disk. Messages name locations without their query string (:func:`mlctl.storage.display`).
* Start-up trusts the manifest that `mlctl prepare` wrote: per shard its records, bytes and sha256.
  Rank 0 alone checks each shard with one size lookup (a ``stat``, or a HEAD of the object: present,
  size as written) and, when a process group is up, broadcasts the resulting shard list (and any
  error) to every rank, so ranks can never disagree on the partition and hang in a collective. The
  cost is one lookup per shard, whatever the corpus size. A missing or resized shard is skipped and
  counted in ``skipped["corrupt_shard"]``. A local manifest without ``bytes``/``sha256`` (written by
  an older `mlctl prepare`) still loads: rank 0 then reads those shards' tar headers, as before, and
  logs that re-running prepare avoids it; in an object store such a manifest is refused (the scan
  would read every object).
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
* State = (epoch, batches this rank has yielded in the epoch, and in a resized epoch this rank's
  part of it, below), JSON, one per rank. Restoring it re-opens the one shard that holds the start
  of the current block, skips within it, rebuilds the block and drops the batches already yielded:
  the cost is bounded by one shard plus one block, whatever came before.
* Workers: a DataLoader(batch_size=None) round-robins its workers in order. After ``j`` batches of
  an epoch the next batch belongs to logical worker ``j mod W``, so DataLoader worker ``k`` plays
  logical worker ``(k + j) mod W``; as every worker has the same number of batches in an epoch
  (``nb``, or ``m`` in a resized one) the round robin stays aligned across epochs.

Elastic resize
--------------
When a checkpoint written by ``P`` consumers (old world size x workers) is resumed by ``Q`` (Ray
Train restarting the worker group with fewer or more workers, ZeRO-0), the epoch goes on instead of
starting over (:meth:`ShardLoader.load_resized_state`, arithmetic in :mod:`mlctl.data.resize`):

* Consumer ``c``'s batches of epoch ``e`` are a pure function of (plan with ``P`` consumers, ``e``,
  ``c``, batch index), so "batches ``[a, b)`` of consumer ``c``" -- a *segment* ``(c, a, b)`` -- can
  be rebuilt exactly by anyone. The rest of the epoch is the concatenation, over old consumers in
  order, of the batches each had not yielded: ``(c, progress_c, nb_P)`` (the unread batches of its
  current block, then its later blocks). Its ``R`` batches are cut into ``Q`` contiguous runs of
  ``m = R // Q`` batches, one per new consumer; the last ``R - Q m`` (< ``Q``) batches are dropped, as
  the tail of a normal epoch is, so every rank keeps the same number of steps. Their pairs go unseen
  this epoch, nothing is seen twice. ``m == 0`` goes straight to the next epoch; a checkpoint taken
  on an epoch boundary starts the new world's own epoch.
* A new consumer's run holds a few segments; each is read like a resume (one shard plus one block to
  reach its start) and yields exactly the batches the old consumer would have yielded, anchors and
  code-switching included (both hang on the epoch, not on the consumer).
* The next epoch uses the normal plan of ``Q`` consumers.
* A second resize inside a resized epoch works the same way: each consumer's remainder is its
  segment list less what it yielded, so the rest of the epoch is again a list of segments of the
  epoch's first plan (``plan_consumers`` in the state), re-split over the newest consumers.
* Every new rank reads the states of all old ranks and computes the same split, so no collective is
  needed; states from different runs, epochs or settings (seed, batch size, samples, block size)
  are refused.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import tarfile
from bisect import bisect_right
from pathlib import Path

import numpy as np
import torch
import webdataset
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from mlctl import storage
from mlctl.data import resize
from mlctl.data.collate import collate
from mlctl.data.shards import MEMBER_EXTS, ShardRefused, scan_shard

log = logging.getLogger(__name__)
STATE_VERSION = 2  # 2: "block", "bucket" and "resized" (version 1 states still load)
_HOLE = object()  # a position of a corrupt shard: counts as read, yields nothing


class NoReadableData(RuntimeError):
    """Every shard of the folder is damaged: there is nothing to train on (retrying cannot help)."""


class CorruptShard(ValueError):
    """A shard whose bytes do not match what the manifest recorded."""


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


class _Plan:
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

    def with_consumers(self, consumers: int) -> _Plan:
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

    def epoch_order(self, epoch: int) -> list[tuple[str, int]]:
        """(shard, index in shard) of every sample, in the epoch's global order (for tests/tools)."""
        shards, _ = self.epoch_shards(epoch)
        return [(name, i) for name, n in shards for i in range(n)]


class _Reader:
    """Sequential reader of the global order from a position. It yields one item per position: a
    record, ``None`` (an undecodable record) or ``_HOLE`` (a position of a corrupt shard)."""

    def __init__(self, plan: _Plan, epoch: int, start: int, skipped: dict) -> None:
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


def _borrow(plan: _Plan, epoch: int, start: int, want: int) -> list[dict]:
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
    plan: _Plan, epoch: int, consumer: int, block: int, records: list[dict]
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


def _range_batches(plan: _Plan, consumer: int, epoch: int, start: int, end: int, skipped: dict):
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


def _segment_batches(plan: _Plan, epoch: int, segments: list[resize.Segment], start: int, skipped: dict):
    """A consumer's part of a resized epoch from its batch ``start`` on; ``plan`` is the plan the
    epoch started with, whose blocks the segments point into."""
    for consumer, a, b in resize.drop(segments, start):
        yield from _range_batches(plan, consumer, epoch, a, b, skipped)


def consumer_batches(
    plan: _Plan,
    consumer: int,
    epoch: int,
    start_batch: int,
    skipped: dict,
    resized: tuple[_Plan, list[resize.Segment]] | None = None,
):
    """Batches of one consumer from ``start_batch`` of ``epoch`` on, forever (epoch after epoch).
    ``resized``: (the epoch's plan, this consumer's segments) when ``epoch`` is a resized one."""
    if resized is not None:
        yield from _segment_batches(resized[0], epoch, resized[1], start_batch, skipped)
        epoch, start_batch = epoch + 1, 0
    while True:
        yield from _range_batches(plan, consumer, epoch, start_batch, plan.nb, skipped)
        epoch, start_batch = epoch + 1, 0


class _RankStream(IterableDataset):
    """One rank's batches; with DataLoader workers each worker plays one logical consumer.
    ``resized``: (the epoch's plan, one segment list per logical worker) in a resized epoch."""

    def __init__(
        self,
        plan: _Plan,
        rank: int,
        workers: int,
        epoch: int,
        batch_in_epoch: int,
        resized: tuple[_Plan, list[list[resize.Segment]]] | None = None,
    ) -> None:
        self.plan, self.rank, self.workers = plan, rank, max(1, workers)
        self.epoch, self.j, self.resized = epoch, batch_in_epoch, resized

    def __iter__(self):
        info = get_worker_info()
        k = info.id if info is not None else 0
        w = (k + self.j) % self.workers
        start = resize.worker_progress(self.j, self.workers, w)  # batches w already gave
        epoch = self.epoch
        mine = None if self.resized is None else (self.resized[0], self.resized[1][w])
        in_epoch = self.plan.nb if mine is None else resize.length(mine[1])
        if start >= in_epoch:  # only when j == W * in_epoch, which the loader normalises away
            epoch, start, mine = epoch + 1, 0, None
        return consumer_batches(self.plan, self.rank * self.workers + w, epoch, start, {}, mine)


def _group_matches(rank: int, world_size: int) -> bool:
    """True when a default process group is up and is the one these rank/world_size describe."""
    import torch.distributed as dist

    return (
        world_size > 1
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() == world_size
        and dist.get_rank() == rank
    )


class ShardLoader:
    """Endless, exactly resumable batch iterator over a prepared shard folder (see module docstring).

    ``iter(loader)`` yields dicts with ``input_ids``/``attention_mask`` ``[2B, T]`` (source rows then
    target rows), ``spans`` ``[2B, 2]``, ``pair_ids``, ``source_ids`` ``[B]`` (int64 source-sentence
    ids), ``langs``, ``epoch``, ``num_tokens``, ``switched_words``.

    ``code_switch`` > 0 swaps source words for translations (:mod:`mlctl.data.switch`); the drawn
    anchor is kept unless ``switch_anchors`` (for a recipe without the word-level term)."""

    def __init__(
        self,
        shards_dir: str | Path,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        bucket_by_length: bool = False,
        bucket_size: int = 0,
        expected_tokenizer_hash: str | None = None,
        code_switch: float = 0.0,
        switch_anchors: bool = False,
    ) -> None:
        self.root = str(shards_dir)  # a local folder or an object-store URI (mlctl.storage)
        self.manifest: dict = self._read_manifest()
        tok = self.manifest.get("tokenizer", {})
        where = storage.display(self.root)
        if expected_tokenizer_hash is not None and tok.get("hash") != expected_tokenizer_hash:
            raise ValueError(
                f"shards in {where} were tokenized with {tok.get('name')!r} (hash {tok.get('hash')}), "
                f"but the model's tokenizer has hash {expected_tokenizer_hash}: re-run `mlctl prepare` "
                "with the model's tokenizer"
            )
        if batch_size < 1 or not 0 <= rank < world_size or num_workers < 0:
            raise ValueError(
                f"bad loader settings: batch_size={batch_size}, rank={rank}, "
                f"world_size={world_size}, num_workers={num_workers}"
            )
        if not 0.0 <= code_switch <= 1.0:
            raise ValueError(f"code_switch is a probability in [0, 1], got {code_switch}")
        if code_switch > 0 and not self.manifest.get("code_switch"):
            raise ValueError(
                f"code_switch={code_switch} but the shards in {where} were prepared without "
                "code-switch dictionaries: re-run `mlctl prepare` with data.prepare.code_switch "
                "(--code-switch TGT=PATH), or set data.code_switch: 0"
            )
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed = num_workers, seed
        self.skipped: dict[str, int] = {}
        valid = self._check_shards()
        consumers = world_size * max(1, num_workers)
        self.plan = _Plan(
            self.root,
            [(name, n) for name, n, _, _ in valid],
            batch_size,
            consumers,
            seed,
            shuffle_buffer,
            bucket_by_length,
            bucket_size,
            int(tok.get("pad_id", 0)),
            {name: (size, sha) for name, _, size, sha in valid},
            code_switch,
            int(self.manifest.get("max_tokens") or 512),
            not switch_anchors,
        )
        if self.plan.nb == 0:
            raise ValueError(
                f"{self.plan.total} samples in {where} are too few for {world_size} rank(s) x "
                f"{max(1, num_workers)} worker(s) x batch {batch_size}"
            )
        self.batches_per_epoch = self.plan.nb * max(1, num_workers)
        self.epoch, self.batch_in_epoch = 0, 0
        # In a resized epoch: {"plan_consumers": P, "parts": one segment list per logical worker}
        # (mlctl.data.resize); None in a normal one.
        self._resized: dict | None = None
        self._live = None

    def _read_manifest(self) -> dict:
        location = storage.join(self.root, "manifest.json")
        try:
            text = storage.read_text(location)
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(
                f"no manifest.json in {storage.display(self.root)}: run `mlctl prepare` first "
                "(or it was interrupted before finishing)"
            ) from None
        return json.loads(text)

    def _check_shards(self) -> list[tuple[str, int, int | None, str | None]]:
        """Rank 0's view of the shards, shared with every rank when a process group is up."""
        if _group_matches(self.rank, self.world_size):
            import torch.distributed as dist

            box = [self._check_manifest() if self.rank == 0 else None]
            # NOTE: NCCL moves the pickled object through a GPU: this rank's own, which the trainer
            # made current before the process group existed (under Ray that is index 0 of the one
            # GPU the worker sees, not the local rank).
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
            dist.broadcast_object_list(box, src=0, device=dev)
            result: dict = box[0]  # type: ignore[assignment]  # rank 0 filled it
        else:
            result = self._check_manifest()
        if "error" in result:  # raised on every rank, so none waits for the others in a collective
            raise (ShardRefused if result.get("refused") else ValueError)(result["error"])
        for reason, n in result["skipped"].items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        return result["valid"]

    def _check_manifest(self) -> dict:
        """Valid shards as (name, records, bytes, sha256): one size lookup per shard (a stat, or a
        HEAD of the object) for a current manifest, a tar header scan for the shards of an older
        one (no ``bytes``; local folders only)."""
        valid: list = []
        skipped: dict[str, int] = {}
        legacy = 0
        entries = self.manifest.get("shards")
        manifest = storage.display(storage.join(self.root, "manifest.json"))
        if not isinstance(entries, list):
            return {"error": f"{manifest}: key 'shards' must be a list of shards"}
        for i, entry in enumerate(entries):
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("name"), str)
                or not isinstance(entry.get("samples"), int)
            ):
                return {
                    "error": f"{manifest}: shards[{i}] needs a string 'name' and an "
                    f"integer 'samples', got {entry!r}"
                }
            location = storage.join(self.root, entry["name"])
            try:
                if isinstance(entry.get("bytes"), int):
                    size = storage.size(location)
                    if size != entry["bytes"]:
                        raise CorruptShard(f"{size} bytes, manifest says {entry['bytes']} (truncated?)")
                    n, check = entry["samples"], (entry["bytes"], entry.get("sha256"))
                elif storage.is_remote(self.root):
                    # NOTE: a header scan would read every object whole; prepare has written sizes
                    # and checksums for long enough that an old manifest is re-made, not served.
                    return {
                        "error": f"{manifest}: shards[{i}] has no 'bytes'/'sha256' (an older `mlctl "
                        "prepare`); shards in an object store need them: re-run `mlctl prepare`"
                    }
                else:
                    legacy += 1
                    n = scan_shard(Path(location))
                    if n != entry["samples"]:
                        raise tarfile.ReadError(f"{n} records, manifest says {entry['samples']}")
                    check = (None, None)
            except ShardRefused as e:
                return {"error": str(e), "refused": True}
            except (tarfile.TarError, OSError, ValueError) as e:
                skipped["corrupt_shard"] = skipped.get("corrupt_shard", 0) + 1
                log.warning("skipping corrupt shard %s: %s", storage.display(location), e)
                continue
            valid.append((entry["name"], n, *check))
        if legacy:
            log.warning(
                "%s: %d shard(s) have no size/checksum in the manifest (an older `mlctl prepare`); "
                "their tar headers were read instead, which grows with the corpus: re-run prepare",
                storage.display(self.root),
                legacy,
            )
        return {"valid": valid, "skipped": skipped}

    @property
    def dropped_per_epoch(self) -> int:
        """Samples of the epoch's global order left out (its tail) so every consumer gets full batches."""
        return self.plan.total - self.plan.consumers * self.plan.nb * self.batch_size

    def epoch_pair_order(self, epoch: int) -> list[tuple[str, int]]:
        return self.plan.epoch_order(epoch)

    # ---- state -------------------------------------------------------------------------------

    @property
    def epoch_batches(self) -> int:
        """Batches this rank yields in the current epoch: ``batches_per_epoch``, or fewer in a
        resized epoch (its part of what the old ranks had left)."""
        if self._resized is None:
            return self.batches_per_epoch
        return resize.length(self._resized["parts"][0]) * max(1, self.num_workers)

    def state_dict(self) -> dict:
        """JSON-serialisable position right after the last batch the iterator yielded."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "samples": self.plan.total,
            "block": self.plan.block,
            "bucket": self.plan.bucket,
            "resized": copy.deepcopy(self._resized),
            "skipped": dict(self.skipped),
        }

    def _refuse_other_settings(self, state: dict, keys: tuple[str, ...], what: str) -> None:
        mine = self.state_dict()
        for key in keys:
            # "block" and "bucket" are absent from version 1 states: nothing to compare then
            if key in ("block", "bucket") and key not in state:
                continue
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"loader state was saved with {key}={state.get(key)}, this loader has "
                    f"{key}={mine[key]}: {what}"
                )

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly where ``state`` (this rank's, same world size and workers) left off."""
        self._refuse_other_settings(
            state,
            ("world_size", "num_workers", "batch_size", "seed", "samples", "rank", "block", "bucket"),
            "the partition would differ, so it cannot resume exactly (after a change of world size "
            "or workers, load_resized_state continues the epoch)",
        )
        self.close()
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self._resized = copy.deepcopy(state.get("resized"))
        self._merge_skipped(state)

    def load_resized_state(self, states: list[dict]) -> dict:
        """Continue the epoch of a checkpoint written by another number of ranks (or workers).

        ``states``: the data state of every old rank, in rank order (``data_state_rank00000.json``,
        ...). The batches no old consumer had yielded yet are split evenly over this run's consumers
        (module docstring, "Elastic resize"); fewer than ``world_size x max(1, num_workers)`` left
        over at the end are dropped. With the same world size and workers this is
        ``load_state_dict(states[rank])``. Every rank passes the same list and gets its own part, no
        collective needed. Returns ``epoch`` (the one this loader goes on with), ``per_rank`` (its
        batches this rank yields in it), ``remaining`` (batches the old consumers had left of their
        epoch; None when nothing was re-split) and ``dropped`` (the tail left out)."""
        resize.check_states(states)
        old = states[0]
        self._refuse_other_settings(
            old,
            ("batch_size", "seed", "samples", "block", "bucket"),
            "the old ranks' batches cannot be rebuilt, so the epoch cannot be re-split",
        )
        remaining, dropped = None, 0
        if (old["world_size"], old["num_workers"]) == (self.world_size, self.num_workers):
            self.load_state_dict(states[self.rank])
        elif old.get("resized") is None and all(int(s["batch_in_epoch"]) == 0 for s in states):
            # saved on an epoch boundary: nothing to carry over, the new world's own epoch begins
            self._continue(int(old["epoch"]), None, states)
        else:
            epoch, plan_consumers, rest = resize.rest_of_epoch(states)
            parts, dropped = resize.split(rest, self.plan.consumers)
            workers = max(1, self.num_workers)
            mine = [[list(seg) for seg in p] for p in parts[self.rank * workers : (self.rank + 1) * workers]]
            if resize.length(parts[0]) == 0:  # fewer batches left than consumers: the epoch is over
                self._continue(epoch + 1, None, states)
            else:
                self._continue(epoch, {"plan_consumers": plan_consumers, "parts": mine}, states)
            remaining = resize.length(rest)
            log.info(
                "loader resized from %d rank(s) x %d worker(s) to %d x %d in epoch %d: %d batches "
                "left, %d on this rank, %d dropped",
                old["world_size"],
                max(1, old["num_workers"]),
                self.world_size,
                workers,
                epoch,
                remaining,
                self.epoch_batches if self.epoch == epoch else 0,
                dropped,
            )
        return {
            "epoch": self.epoch,
            "per_rank": self.epoch_batches,
            "remaining": remaining,
            "dropped": dropped,
        }

    def _continue(self, epoch: int, resized: dict | None, states: list[dict]) -> None:
        """Start of ``epoch`` (a resized one when ``resized`` is given) after the old ``states``."""
        self.close()
        self.epoch, self.batch_in_epoch, self._resized = epoch, 0, resized
        if self.rank < len(states):  # a rank that existed before keeps counting its skips
            self._merge_skipped(states[self.rank])

    def _merge_skipped(self, state: dict) -> None:
        for reason, n in state.get("skipped", {}).items():
            self.skipped[reason] = max(self.skipped.get(reason, 0), int(n))

    # ---- iteration ---------------------------------------------------------------------------

    def __iter__(self):
        self.close()
        gen = self._iterate()
        self._live = gen
        return gen

    def _iterate(self):
        resized = None
        if self._resized is not None:
            parts = [[tuple(seg) for seg in p] for p in self._resized["parts"]]
            resized = (self.plan.with_consumers(self._resized["plan_consumers"]), parts)
        ds = _RankStream(self.plan, self.rank, self.num_workers, self.epoch, self.batch_in_epoch, resized)
        if self.num_workers == 0:
            source = iter(ds)
        else:
            dl = DataLoader(
                ds, batch_size=None, num_workers=self.num_workers, prefetch_factor=4, persistent_workers=False
            )
            source = iter(dl)
        # read-time skips per logical consumer (cumulative there), merged into self.skipped
        base = dict(self.skipped)
        per_consumer: dict[int, dict] = {}
        try:
            for batch in source:
                per_consumer[self.batch_in_epoch % max(1, self.num_workers)] = batch.pop("_skipped")
                for reason in {r for d in per_consumer.values() for r in d}:
                    self.skipped[reason] = base.get(reason, 0) + sum(
                        d.get(reason, 0) for d in per_consumer.values()
                    )
                self.batch_in_epoch += 1
                if self.batch_in_epoch == self.epoch_batches:
                    self.epoch, self.batch_in_epoch, self._resized = self.epoch + 1, 0, None
                yield batch
        finally:
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:  # NOTE: an endless iterator never ends, so stop its workers here
                shutdown()

    def close(self) -> None:
        """Stop the live iterator (and its worker processes), if any."""
        if self._live is not None:
            self._live.close()
            self._live = None
