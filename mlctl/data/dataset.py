"""Streaming loader over `mlctl prepare` shards with equal batches per rank and exact resume.

:class:`ShardLoader` is one rank's view: it checks the shard folder at start-up, plays its
consumers of the epoch's partition (the order, blocks and batches are :mod:`mlctl.data.blocks`'s, a
pure function of (files, seed, epoch, consumer)), keeps its position as state, and continues an
epoch over another number of ranks.

Design
------
* Start-up trusts the manifest that `mlctl prepare` wrote (:mod:`mlctl.data.manifest`: one size
  lookup per shard). Rank 0 alone checks it and, when a process group is up, broadcasts the
  resulting shard list (and any error) to every rank, so ranks can never disagree on the partition
  and hang in a collective. A missing or resized shard is skipped and counted in
  ``skipped["corrupt_shard"]``.
* State = (epoch, batches this rank has yielded in the epoch, and in a resized epoch this rank's
  part of it, below), JSON, one per rank. Restoring it rebuilds the current block from its start
  (:mod:`mlctl.data.blocks`): the cost is bounded by one shard plus one block, whatever came before.
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
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mlctl import storage
from mlctl.data import resize
from mlctl.data.blocks import NoReadableData, Plan, consumer_batches
from mlctl.data.manifest import check_manifest, read_manifest
from mlctl.data.shards import ShardRefused

log = logging.getLogger(__name__)
STATE_VERSION = 2  # 2: "block", "bucket" and "resized" (version 1 states still load)

__all__ = ["STATE_VERSION", "NoReadableData", "ShardLoader"]


class _RankStream(IterableDataset):
    """One rank's batches; with DataLoader workers each worker plays one logical consumer.
    ``resized``: (the epoch's plan, one segment list per logical worker) in a resized epoch."""

    def __init__(
        self,
        plan: Plan,
        rank: int,
        workers: int,
        epoch: int,
        batch_in_epoch: int,
        resized: tuple[Plan, list[list[resize.Segment]]] | None = None,
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
        self.manifest: dict = read_manifest(self.root)
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
        self.plan = Plan(
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

    def _check_shards(self) -> list[tuple[str, int, int | None, str | None]]:
        """Rank 0's view of the shards, shared with every rank when a process group is up."""
        if _group_matches(self.rank, self.world_size):
            import torch.distributed as dist

            box = [check_manifest(self.root, self.manifest) if self.rank == 0 else None]
            # NOTE: NCCL moves the pickled object through a GPU: this rank's own, which the trainer
            # made current before the process group existed (under Ray that is index 0 of the one
            # GPU the worker sees, not the local rank).
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
            dist.broadcast_object_list(box, src=0, device=dev)
            result: dict = box[0]  # type: ignore[assignment]  # rank 0 filled it
        else:
            result = check_manifest(self.root, self.manifest)
        if "error" in result:  # raised on every rank, so none waits for the others in a collective
            raise (ShardRefused if result.get("refused") else ValueError)(result["error"])
        for reason, n in result["skipped"].items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        return result["valid"]

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
