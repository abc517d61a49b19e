"""Checkpoints and resume: :class:`Checkpointer` saves and restores one rank's share of a run (the
DeepSpeed engine, the loader position, the train state), collectively with the other ranks.

The folder layout, atomic publication and the choice of the resume point are
:mod:`mlctl.checkpoint_dir`'s; what a resume refuses is :mod:`mlctl.resume_checks`'s. This module
is also where the checkpoint API is imported from (``__all__``).

No RNG state is saved: every step reseeds torch from :func:`step_seed` and the loader's order is
a pure function of (seed, epoch, position), so a resumed step is the same step bitwise.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlctl.checkpoint_dir import (
    ENGINE_TAG,
    LATEST,
    OLD_PREFIX,
    TMP_PREFIX,
    CheckpointDir,
    CheckpointMeta,
    NewestCheckpoint,
    data_state_name,
    incomplete_reason,
    step_name,
    step_of,
)
from mlctl.reporter import Reporter, count_attempt
from mlctl.resume_checks import CheckpointMismatch, check_changes, check_compatible, recipe_differences

__all__ = [
    "ENGINE_TAG",
    "FULL_DISK_BYTES",
    "LATEST",
    "OLD_PREFIX",
    "TMP_PREFIX",
    "CheckpointDir",
    "CheckpointMeta",
    "CheckpointMismatch",
    "Checkpointer",
    "NewestCheckpoint",
    "Reporter",
    "TrainState",
    "check_changes",
    "check_compatible",
    "count_attempt",
    "data_state_name",
    "incomplete_reason",
    "recipe_differences",
    "step_name",
    "step_of",
    "step_seed",
]

log = logging.getLogger(__name__)

FULL_DISK_BYTES = 1 << 20  # less free space than this after a failed save: the disk is full


def step_seed(seed: int, step: int, rank: int, micro: int = 0) -> int:
    """Per-(seed, step, rank, micro-batch) seed: dropout and MLM masks do not depend on history, so
    a resumed run redoes a step exactly as the uninterrupted run did.

    NOTE: ``SeedSequence`` hashes the four numbers together; a linear mix such as
    ``seed * a + step * b + rank * c + micro`` gives the same seed to different tuples (rank 1,
    micro 0 and rank 0, micro 31 with c = 31), so two ranks would draw identical masks."""
    words = np.random.SeedSequence([seed, step, rank, micro]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) | (int(words[1]) >> 1)  # 63 bits: a valid torch seed


@dataclass
class TrainState:
    """What the loop counts; restored from ``meta.json``."""

    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # pairs, all ranks together
    tokens_seen: int = 0
    restarts: int = 0


class Checkpointer:
    """Saves and restores one rank's share of a run: the DeepSpeed engine (model, optimizer,
    scheduler), the loader position and the train state. Every rank calls every method (the saves
    and loads are collective)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        rank: int,
        world_size: int,
        keep_last: int,
        identity: dict[str, Any],
        local_rank: int = 0,
        node_local: bool = False,
    ):
        """``identity``: ``model``, ``tokenizer_hash``, ``zero_stage``, ``manifest_hash``,
        ``config_fingerprint`` and ``recipe_fingerprint`` of this run, written into meta.json and
        checked on load. ``node_local``: the run folder is each node's own (checkpoints travel
        through an object store), so the first rank of every node tidies its own."""
        self.dir = CheckpointDir(run_dir, keep_last)
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.node_local = node_local
        self.identity = identity

    def save(self, engine, loader, state: TrainState, cfg) -> Path:
        """Write step ``state.step`` and publish it once every rank has written its part.

        A save that fails (a full disk) removes this rank's node's temporary folder before it
        raises, so what is left never blocks the next attempt."""
        import torch.distributed as dist

        step = state.step
        if self.rank == 0 or (self.node_local and self.local_rank == 0):
            self.dir.prepare(step)
        dist.barrier()
        tmp = self.dir.tmp_path(step)
        tmp.mkdir(parents=True, exist_ok=True)  # a node without the shared run folder has its own
        try:
            engine.save_checkpoint(str(tmp / "engine"), tag=ENGINE_TAG, save_latest=False)
            (tmp / data_state_name(self.rank)).write_text(json.dumps(loader.state_dict()))
        except (OSError, RuntimeError) as e:
            # NOTE: torch.save reports a full disk as a RuntimeError from its zip writer ("unexpected
            # pos"); the free space, read before the partial folder goes, tells what happened.
            free = shutil.disk_usage(tmp).free
            shutil.rmtree(tmp, ignore_errors=True)
            if free < FULL_DISK_BYTES and not (isinstance(e, OSError) and e.errno == errno.ENOSPC):
                raise OSError(errno.ENOSPC, f"no space left while saving ({e})", str(tmp)) from e
            raise
        dist.barrier()
        if self.rank == 0:
            cfg.save(tmp / "config.yaml")
            meta = CheckpointMeta(
                step=step,
                samples_seen=state.samples_seen,
                tokens_seen=state.tokens_seen,
                restarts=state.restarts,
                world_size=self.world_size,
                **self.identity,
            )
            self.dir.publish(step, meta)
        dist.barrier()
        return self.dir.final_path(step)

    def resume_point(
        self, restored: Path | None = None, *, resume: bool = True, local: bool = True
    ) -> Path | None:
        """The checkpoint to resume from, or None for a fresh start.

        ``restored``: a checkpoint handed back by the launcher (Ray's, downloaded from an object
        store). ``local``: whether the run folder's newest complete checkpoint counts too (the
        newer complete one of the two wins); off where the object store is the one record."""
        if restored is None and not resume:
            return None
        candidates = []
        if restored is not None:
            reason = incomplete_reason(restored)
            if reason is None:
                candidates.append(restored)
            elif self.rank == 0:
                log.warning("Ray restored %s, which cannot be used (%s)", restored, reason)
        newest_here = self.dir.latest(quiet=self.rank != 0) if local else None
        if newest_here is not None:
            candidates.append(newest_here)
        if restored is not None and not candidates:
            raise FileNotFoundError(
                f"Ray restored a checkpoint pointing at {restored}, which is not usable here and the "
                "run folder has no complete checkpoint; is the run's storage path shared by all nodes?"
            )
        if not candidates:
            return None
        return max(candidates, key=lambda p: CheckpointMeta.load(p / "meta.json").step)

    def load(self, path: Path, engine, loader, cfg=None) -> TrainState:
        """Restore engine, loader position and counts from ``path``.

        Refuses a checkpoint of another model, tokenizer or (ZeRO >= 1) world size, and, unless
        ``cfg.checkpoint.resume_with_changes``, one trained with another recipe or on other shards
        (saying what differs). A checkpoint of another world size (elastic, ZeRO-0) continues its
        epoch where the old ranks had got to, re-split over the new ones."""
        meta = CheckpointMeta.load(path / "meta.json")
        check_compatible(
            meta,
            model=self.identity["model"],
            tokenizer_hash=self.identity["tokenizer_hash"],
            world_size=self.world_size,
            zero_stage=self.identity["zero_stage"],
            where=path,
        )
        manifest_hash = self.identity["manifest_hash"]
        same_data = not meta.manifest_hash or meta.manifest_hash == manifest_hash
        if cfg is not None:
            check_changes(path, meta, cfg, manifest_hash)
        load_path, _ = engine.load_checkpoint(
            str(path / "engine"), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no engine state under {path / 'engine'}")
        if same_data:
            states = [json.loads((path / data_state_name(r)).read_text()) for r in range(meta.world_size)]
            info = loader.load_resized_state(states)
            if meta.world_size != self.world_size and self.rank == 0:
                log.info(
                    "data: epoch %d goes on from where %d rank(s) had got to, re-split over %d "
                    "(%s batches each)",
                    info["epoch"],
                    meta.world_size,
                    self.world_size,
                    info["per_rank"],
                    extra={"notice": True},
                )
        else:
            log.warning("%s was trained on other shards; the data position starts over", path)
        return TrainState(
            step=meta.step,
            samples_seen=meta.samples_seen,
            tokens_seen=meta.tokens_seen,
            restarts=meta.restarts + 1,
        )
