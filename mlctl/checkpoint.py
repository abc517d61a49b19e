"""Checkpoint layout, atomic publication and compatibility checks.

Layout of a run folder::

    RUN/config.yaml                      resolved config
    RUN/checkpoints/latest               name of the newest complete checkpoint (written last)
    RUN/checkpoints/step_00000040/
        engine/                          DeepSpeed save_checkpoint(..., tag="state"): model, optimizer,
                                         scheduler, ZeRO shards of every rank
        data_state_rank00000.json        loader position of each rank
        rng_rank00000.pt                 python / numpy / torch RNG states of each rank
        meta.json                        step, samples, restarts, model, tokenizer hash, world size, ...
        config.yaml

Every rank writes into ``.tmp-step_XXXXXXXX``; once all ranks are done, rank 0 writes meta.json,
renames the folder to its final name (atomic on one filesystem) and then rewrites ``latest``
(temp file + rename). A kill at any point before that leaves ``latest`` on the previous, complete
checkpoint; leftovers of an interrupted save are removed on the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LATEST = "latest"
TMP_PREFIX = ".tmp-"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointMismatch(ValueError):
    """A checkpoint does not belong to this model, tokenizer or world size."""


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

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> CheckpointMeta:
        data = json.loads(Path(path).read_text())
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


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
        """Rank 0, after every rank finished writing: meta, rename, then the ``latest`` pointer."""
        tmp = self.tmp_path(step)
        (tmp / "meta.json").write_text(meta.to_json())
        final = self.final_path(step)
        if final.exists():  # a redone step after a restart: replace the older copy
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = self.root / f"{TMP_PREFIX}{LATEST}"
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, self.root / LATEST)
        self.prune()
        return final

    def prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        latest = self.latest()
        for old in done[: max(0, len(done) - self.keep_last)]:
            if latest is None or old != latest:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
        return path


def check_compatible(
    meta: CheckpointMeta, *, model: str, tokenizer_hash: str, world_size: int, zero_stage: int, where: Path
) -> None:
    """Refuse a checkpoint of another model, tokenizer or (ZeRO >= 1) world size, saying what differs."""
    problems = []
    if meta.model != model:
        problems.append(f"model: checkpoint has {meta.model!r}, config has {model!r}")
    if meta.tokenizer_hash != tokenizer_hash:
        problems.append(
            f"tokenizer vocabulary hash: checkpoint {meta.tokenizer_hash}, config {tokenizer_hash}"
        )
    if meta.zero_stage != zero_stage:
        problems.append(f"ZeRO stage: checkpoint {meta.zero_stage}, config {zero_stage}")
    if max(meta.zero_stage, zero_stage) >= 1 and meta.world_size != world_size:
        problems.append(
            f"world size: checkpoint was written by {meta.world_size} ranks, this run has {world_size} "
            f"(ZeRO >= 1 shards the optimizer state by rank)"
        )
    if problems:
        raise CheckpointMismatch(f"cannot resume from {where}: " + "; ".join(problems))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
