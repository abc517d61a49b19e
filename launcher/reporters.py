"""How a Ray Train worker reports to the launch (:class:`mlctl.reporter.Reporter`'s two Ray forms).

* :class:`RayReporter`: the run folder is on storage every node mounts. Published checkpoints are
  reported to Ray Train by their figures only; attempts, the stop request, endpoints, step records
  and skipped data go through the run's control actor (launcher/control.py).
* :class:`ObjectStoreReporter`: no shared filesystem. Every rank hands its own files of each
  published checkpoint to Ray, which uploads them into one folder under the storage URI; on a
  restart (or a re-run) each node downloads only what its ranks load, once, and deletes it after.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlctl.checkpoint_dir import TMP_PREFIX
from mlctl.reporter import Reporter

log = logging.getLogger(__name__)


class RayReporter(Reporter):
    """Reports to Ray Train and to the run's control actor (``control``; None in tests of the
    engine alone)."""

    def __init__(self, control: Any, rank: int) -> None:
        self.control, self.rank = control, rank
        self._stop = False
        self._pending: Any = None  # an unanswered stop_requested() call

    def checkpoint(self, path: Path, step: int, metrics: dict[str, float]) -> None:
        import ray.train

        # NOTE: no checkpoint goes with it: the run folder is the one record of the latest
        # checkpoint (mlctl.checkpoint_dir finds the newest complete one).
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        self._saved(path, step)

    def _saved(self, where: Path | str, step: int) -> None:
        if self.rank == 0 and self.control is not None:
            self.control.put_saved.remote(step, str(where))

    def count_attempt(self, run_dir: Path, rank: int) -> int:
        """Counted on the control actor, which every node reaches (a file in a node-local run folder
        would only be seen by the ranks of rank 0's node)."""
        import ray
        import torch.distributed as dist

        if self.control is None:
            return super().count_attempt(run_dir, rank)
        if rank == 0:
            ray.get(self.control.begin_attempt.remote())
        if dist.is_initialized():
            dist.barrier()
        return int(ray.get(self.control.attempt.remote()))

    def stop_requested(self) -> bool:
        """Non-blocking: the answer to the previous call's question, asked again in the background,
        so a step never waits on the actor (a request is seen one or two steps later)."""
        import ray

        if self._stop or self.control is None:
            return self._stop
        if self._pending is None:
            self._pending = self.control.stop_requested.remote()
        ready, _ = ray.wait([self._pending], timeout=0)
        if ready:
            self._stop = ray.get(self._pending) is not None
            self._pending = None
        return self._stop

    def announce(self, rank: int, info: dict[str, Any]) -> None:
        if self.control is not None:
            self.control.put_endpoint.remote(rank, info)

    def records(self, records: list[dict[str, Any]]) -> None:
        if self.control is not None:
            self.control.put_records.remote(records)

    def skipped(self, rank: int, counts: dict[str, int]) -> None:
        if self.control is not None:
            self.control.put_skipped.remote(rank, counts)

    def fatal(self, rank: int, message: str) -> None:
        import ray

        if self.control is not None:
            ray.get(self.control.put_fatal.remote(rank, message), timeout=30)


def _rank_of_file(name: str) -> int | None:
    """The rank whose own file this is (DeepSpeed's ``zero_pp_rank_R_...`` optimizer shards), or
    None for what every rank reads (model states, meta.json, config.yaml, every data state)."""
    m = re.search(r"zero_pp_rank_(\d+)_", name)
    return int(m.group(1)) if m else None


def _writer_of(name: str) -> int:
    """The rank that uploads a file: its owner, ``data_state_rankR.json``'s rank, else rank 0."""
    m = re.search(r"zero_pp_rank_(\d+)_", name) or re.fullmatch(r"data_state_rank(\d+)\.json", name)
    return int(m.group(1)) if m else 0


class ObjectStoreReporter(RayReporter):
    """Checkpoints without a shared filesystem (see the module docstring). Ray's registry is the one
    record of the latest checkpoint; the local run folder is only the staging area, emptied on every
    node once Ray has committed an upload."""

    authoritative = True

    def __init__(self, control: Any, rank: int, local_rank: int, run_dir: Path) -> None:
        super().__init__(control, rank)
        self.local_rank, self.run_dir = local_rank, Path(run_dir)

    def checkpoint(self, path: Path, step: int, metrics: dict[str, float]) -> None:
        import ray.train
        import torch.distributed as dist

        # Rank 0 renamed the folder on its own node; other nodes still hold it under the temp name.
        src = path if path.is_dir() else path.with_name(TMP_PREFIX + path.name)
        stage = Path(tempfile.mkdtemp(prefix=f".upload-rank{self.rank:05d}-", dir=self.run_dir))
        try:
            for f in sorted(src.rglob("*")):
                if f.is_file() and _writer_of(f.name) == self.rank:
                    dest = stage / f.relative_to(src)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(f, dest)  # no copy of the bytes on disk before the upload
                    except OSError:
                        shutil.copy2(f, dest)
            ray.train.report(
                {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                checkpoint=ray.train.Checkpoint.from_directory(str(stage)),
                checkpoint_dir_name=path.name,
            )
            # NOTE: the controller registers reports when it next polls the workers; a worker killed
            # before that would take the registration with it and the restart would start over.
            # Waiting for the commit makes "saved" mean "Ray will hand it back".
            committed = ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
            )
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        where = str(committed[-1].checkpoint.path) if committed else path.name
        # Every rank's files are in the store now: each node drops its local copy (published or
        # still under the temp name), so nothing piles up on nodes that never publish.
        if dist.is_initialized():
            dist.barrier()
        if self.local_rank == 0:
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(path.with_name(TMP_PREFIX + path.name), ignore_errors=True)
        self._saved(where, step)

    def restored_from(self) -> Path | None:
        """The checkpoint Ray hands back, downloaded into this node's run folder: the files every
        rank reads once per node (by its first rank), each rank's own optimizer shard by that rank."""
        import ray.train
        import torch.distributed as dist

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        dest = self.run_dir / "restored" / Path(ckpt.path).name
        got: list[str] = []
        if self.local_rank == 0:
            shutil.rmtree(dest, ignore_errors=True)
            got += self._download(ckpt, dest, lambda owner: owner is None)
        if dist.is_initialized():
            dist.barrier()
        got += self._download(ckpt, dest, lambda owner: owner == self.rank)
        if dist.is_initialized():
            dist.barrier()
        log.info("rank %d downloaded %s from %s into %s", self.rank, ", ".join(sorted(got)), ckpt.path, dest)
        return dest

    def _download(self, ckpt: Any, dest: Path, wanted) -> list[str]:
        """The checkpoint's files whose owner ``wanted`` accepts, into ``dest``; their names."""
        import pyarrow.fs as pafs

        got = []
        infos = ckpt.filesystem.get_file_info(pafs.FileSelector(ckpt.path, recursive=True))
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            rel = os.path.relpath(info.path, ckpt.path)
            if not wanted(_rank_of_file(os.path.basename(rel))):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with ckpt.filesystem.open_input_stream(info.path) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, length=8 << 20)
            got.append(rel)
        return got

    def release(self, path: Path) -> None:
        """Loaded on every rank: the node's downloaded copy goes."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
        if self.local_rank == 0:
            shutil.rmtree(path, ignore_errors=True)
