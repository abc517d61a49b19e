"""Checkpoints and resume: layout, atomic publication, the resume point, compatibility checks.

Layout of a run folder::

    RUN/config.yaml                      resolved config
    RUN/attempts                         worker-group starts of this run (restarts = attempts - 1)
    RUN/checkpoints/latest               name of the newest published checkpoint (written last)
    RUN/checkpoints/step_00000040/
        engine/                          DeepSpeed save_checkpoint(..., tag="state"): model, optimizer,
                                         scheduler, ZeRO shards of every rank
        data_state_rank00000.json        loader position of each rank
        meta.json                        step, samples, restarts, model, tokenizer hash, world size, ...
        config.yaml

Every rank writes into ``.tmp-step_XXXXXXXX``; once all ranks are done, rank 0 writes meta.json,
renames the folder to its final name (atomic on one filesystem) and then rewrites ``latest``
(temp file + rename). A kill at any point before the rename leaves the previous checkpoint as the
newest complete one; leftovers of an interrupted save are removed on the next save.

The resume point is the newest *complete* checkpoint (meta.json readable, engine state and every
rank's data state present). ``latest`` is the fast path; when it is missing, unreadable or names a
damaged folder, the folders themselves are scanned and the newest complete one is used, with a
warning: a damaged checkpoint costs the steps since the one before it, never the run.

No RNG state is saved: every step reseeds torch from :func:`step_seed` and the loader's order is
a pure function of (seed, epoch, position), so a resumed step is the same step bitwise.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

LATEST = "latest"
TMP_PREFIX = ".tmp-"
# A published folder being replaced by a redo of the same step is moved aside under this prefix
# and deleted only once its replacement is in place.
OLD_PREFIX = ".old-"
ENGINE_TAG = "state"
FULL_DISK_BYTES = 1 << 20  # less free space than this after a failed save: the disk is full
_STEP_DIR = re.compile(r"^(?:\.old-)?step_(\d{8})$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def data_state_name(rank: int) -> str:
    return f"data_state_rank{rank:05d}.json"


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


class CheckpointMismatch(ValueError):
    """A checkpoint does not belong to this model, tokenizer, world size, recipe or data."""


class Reporter:
    """How a worker talks to whoever launched it: where it announces its endpoint, step records,
    skipped data and published checkpoints, where it counts attempts and learns that it should stop.

    This base is the launch without Ray (a process group started by hand, as the tests do): attempts
    are counted in ``RUN/attempts``, nothing else goes anywhere. The launcher's reporters
    (launcher/reporters.py) send it all to the run's control actor.

    ``authoritative``: the reporter's store, not the run folder, is the record of the latest
    checkpoint (an object store that Ray uploads to); resume then starts only from what
    :meth:`restored_from` hands back."""

    authoritative = False

    def checkpoint(self, path: Path, step: int, metrics: dict[str, float]) -> None:  # noqa: B027
        pass

    def restored_from(self) -> Path | None:
        return None

    def release(self, path: Path) -> None:  # noqa: B027
        """The checkpoint handed back by :meth:`restored_from` has been loaded."""

    def count_attempt(self, run_dir: Path, rank: int) -> int:
        return count_attempt(run_dir, rank)

    def stop_requested(self) -> bool:
        return False

    def announce(self, rank: int, info: dict[str, Any]) -> None:  # noqa: B027
        pass

    def records(self, records: list[dict[str, Any]]) -> None:  # noqa: B027
        pass

    def skipped(self, rank: int, counts: dict[str, int]) -> None:  # noqa: B027
        pass

    def fatal(self, rank: int, message: str) -> None:  # noqa: B027
        pass


@dataclass
class CheckpointMeta:
    step: int
    samples_seen: int
    tokens_seen: int
    restarts: int
    model: str
    tokenizer_hash: str
    world_size: int
    zero_stage: int
    manifest_hash: str
    config_fingerprint: str
    recipe_fingerprint: str = ""  # Config.recipe_fingerprint(); empty in checkpoints before it

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> CheckpointMeta:
        data = json.loads(Path(path).read_text())
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def incomplete_reason(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (missing meta.json, engine state, a rank's data state),
    or None when it is complete."""
    path = Path(path)
    if not path.is_dir():
        return "the folder is missing"
    try:
        meta = CheckpointMeta.load(path / "meta.json")
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError, TypeError) as e:
        return f"meta.json is unreadable ({e})"
    tag = path / "engine" / ENGINE_TAG
    if not any(tag.glob("*model_states.pt")):
        return f"no DeepSpeed model state under {tag}"
    missing = [
        data_state_name(r) for r in range(meta.world_size) if not (path / data_state_name(r)).is_file()
    ]
    if missing:
        return f"data state missing: {', '.join(missing)}"
    return None


class CheckpointDir:
    """The ``checkpoints`` folder of one run."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def tmp_path(self, step: int) -> Path:
        return self.root / f"{TMP_PREFIX}{step_name(step)}"

    def final_path(self, step: int) -> Path:
        return self.root / step_name(step)

    def prepare(self, step: int) -> Path:
        """Rank 0, before the collective save: a clean temporary folder (and no stale leftovers)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.tmp_path(step)
        tmp.mkdir(parents=True)
        return tmp

    def publish(self, step: int, meta: CheckpointMeta) -> Path:
        """Rank 0, after every rank finished writing: meta, rename, then the ``latest`` pointer.

        A redone step (after a restart) replaces its older copy without ever leaving no complete
        copy: the old folder is moved aside, the new one renamed in, and only then the old one
        deleted. A kill between the two renames leaves ``.old-step_X``, which :meth:`latest` still
        finds."""
        tmp = self.tmp_path(step)
        (tmp / "meta.json").write_text(meta.to_json())
        final = self.final_path(step)
        aside = self.root / f"{OLD_PREFIX}{final.name}"
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        pointer_tmp = self.root / f"{TMP_PREFIX}{LATEST}"
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, self.root / LATEST)
        shutil.rmtree(aside, ignore_errors=True)  # also one left by a publication killed midway
        self.prune()
        return final

    def _published(self) -> list[tuple[int, Path]]:
        """(step, folder) of every published or set-aside folder, newest first (a published folder
        before a set-aside copy of the same step)."""
        out = []
        for p in self.root.glob("*step_*"):
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), not p.name.startswith(OLD_PREFIX), p))
        return [(s, p) for s, _, p in sorted(out, key=lambda t: (t[0], t[1]), reverse=True)]

    def prune(self) -> None:
        """Keep the newest ``keep_last`` folders, and never the resume point."""
        latest = self.latest(quiet=True)
        for _, old in self._published()[self.keep_last :]:
            if latest is None or old != latest:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self, quiet: bool = False) -> Path | None:
        """The newest complete checkpoint, or None when there is none.

        ``latest`` is trusted when it names a complete folder and nothing newer is complete. When
        it is missing, unreadable or names a damaged folder, the newest complete folder is used
        instead and a warning says why; a fresh start only when no folder is complete."""
        found = self.newest_complete()
        if quiet:
            return found.path
        if found.path is not None and found.passed_over:
            log.warning(
                "%s; resuming from %s, the newest complete checkpoint",
                "; ".join(found.passed_over),
                found.path,
            )
        published = self._published()
        if found.path is None and published:
            log.warning(
                "%s; no checkpoint in %s is complete (%s): starting from scratch",
                found.pointer_problem or "no complete checkpoint",
                self.root,
                "; ".join(f"{p.name}: {incomplete_reason(p)}" for _, p in published),
            )
        return found.path

    def newest_complete(self) -> NewestCheckpoint:
        """What :meth:`latest` picks, with why it passed over the pointer or newer folders; for
        callers that say it in their own words (`mlctl eval` and `mlctl export` do not resume)."""
        named, problem = self._pointed()
        if named is not None:
            reason = incomplete_reason(named)
            if reason is None:
                newer = [p for s, p in self._published() if s > step_of(named)]
                if not any(incomplete_reason(p) is None for p in newer):
                    return NewestCheckpoint(named)
            else:
                problem = f"{self.root / LATEST} names {named.name}, which is damaged: {reason}"
        skipped: list[str] = []
        for _, path in self._published():
            reason = incomplete_reason(path)
            if reason is None:
                return NewestCheckpoint(path, problem, skipped)
            if named is None or path != named:  # the pointer's own damage is already in `problem`
                skipped.append(f"skipped {path.name}: {reason}")
        return NewestCheckpoint(None, problem, skipped)

    def complete(self) -> list[Path]:
        """Every complete checkpoint folder, newest first (a published folder before a set-aside
        copy of the same step)."""
        return [p for _, p in self._published() if incomplete_reason(p) is None]

    def _pointed(self) -> tuple[Path | None, str]:
        """(the folder ``latest`` names, or None; what is wrong with the pointer, or '')."""
        pointer = self.root / LATEST
        try:
            text = pointer.read_text().strip()
        except FileNotFoundError:
            return None, f"{pointer} is missing"
        except (OSError, UnicodeDecodeError) as e:
            return None, f"{pointer} is unreadable ({e})"
        if _STEP_DIR.match(text) and not text.startswith(OLD_PREFIX):
            return self.root / text, ""
        return None, f"{pointer} holds {text[:40]!r}, not a checkpoint name"


@dataclass
class NewestCheckpoint:
    """The newest complete checkpoint of a run (None when none is) and what was passed over."""

    path: Path | None
    pointer_problem: str = ""  # what is wrong with ``latest`` ('' when it was fine or not needed)
    skipped: list[str] = field(default_factory=list)  # "skipped NAME: why", newer damaged folders

    @property
    def passed_over(self) -> list[str]:
        """Everything worth a warning, in order: the pointer's problem, then the skipped folders."""
        return [self.pointer_problem] * bool(self.pointer_problem) + self.skipped


def step_of(path: Path) -> int:
    """The step in a checkpoint folder's name (``step_00000040``, ``.old-step_00000040``); -1 for
    any other name."""
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


def check_compatible(
    meta: CheckpointMeta,
    *,
    model: str,
    tokenizer_hash: str,
    world_size: int | None,
    zero_stage: int,
    where: Path,
) -> None:
    """Refuse a checkpoint of another model, tokenizer or (ZeRO >= 1) world size, saying what
    differs (``world_size`` None: not known yet, an elastic run's)."""
    problems = []
    if meta.model != model:
        problems.append(f"model: checkpoint has {meta.model!r}, config has {model!r}")
    if meta.tokenizer_hash != tokenizer_hash:
        problems.append(
            f"tokenizer vocabulary hash: checkpoint {meta.tokenizer_hash}, config {tokenizer_hash}"
        )
    if meta.zero_stage != zero_stage:
        problems.append(f"ZeRO stage: checkpoint {meta.zero_stage}, config {zero_stage}")
    if world_size is not None and max(meta.zero_stage, zero_stage) >= 1 and meta.world_size != world_size:
        problems.append(
            f"world size: checkpoint was written by {meta.world_size} ranks, this run has {world_size} "
            f"(ZeRO >= 1 shards the optimizer state by rank)"
        )
    if problems:
        raise CheckpointMismatch(f"cannot resume from {where}: " + "; ".join(problems))


def count_attempt(run_dir: Path, rank: int) -> int:
    """Rank 0 bumps ``RUN/attempts`` (worker-group starts of this run); every rank reads it.

    A checkpoint only knows the restarts before it was written; two failures between two saves
    would count once. This counter sees every start."""
    import torch.distributed as dist

    path = Path(run_dir) / "attempts"
    if rank == 0:
        try:
            n = int(path.read_text().strip()) + 1 if path.is_file() else 1
        except ValueError:
            log.warning("%s is not a number; counting attempts from 1 again", path)
            n = 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".attempts.tmp")
        tmp.write_text(f"{n}\n")
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()
    return int(path.read_text().strip())


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


def check_changes(path: Path, meta: CheckpointMeta, cfg, manifest_hash: str) -> list[str]:
    """What differs between the checkpoint at ``path`` and the run about to resume from it: recipe
    keys (:meth:`Config.recipe`) and the shards' manifest. Raises :class:`CheckpointMismatch`
    naming them unless ``cfg.checkpoint.resume_with_changes``; then returns them (and warns)."""
    changes = recipe_differences(path, cfg)
    if meta.manifest_hash and meta.manifest_hash != manifest_hash:
        changes.append(f"data: the shards' manifest was {meta.manifest_hash}, now {manifest_hash}")
    if changes and not cfg.checkpoint.resume_with_changes:
        raise CheckpointMismatch(
            f"cannot resume from {path}: the run's recipe changed (checkpoint "
            f"{meta.recipe_fingerprint or meta.config_fingerprint}, config {cfg.recipe_fingerprint()}): "
            + "; ".join(changes)
            + ". Train under another --name, or pass --resume-with-changes "
            "(checkpoint.resume_with_changes=true) to go on with the new settings"
        )
    if changes:
        log.warning("resuming %s with changes: %s", path, "; ".join(changes))
    return changes


def recipe_differences(path: Path, cfg) -> list[str]:
    """What differs between the recipe of the checkpoint at ``path`` (its config.yaml) and
    ``cfg``'s; empty when the checkpoint has no config.yaml (written by hand or by an old version)."""
    from mlctl.config import ConfigError, load_config, recipe_changes

    saved = Path(path) / "config.yaml"
    if not saved.is_file():
        return []
    try:
        before = load_config(saved).recipe()
    except ConfigError as e:  # a key this version no longer knows: say so rather than guess
        return [f"its config.yaml does not load here ({e})"]
    return recipe_changes(before, cfg.recipe())
