"""The ``checkpoints`` folder of a run: its layout, atomic publication, and which checkpoint is
the newest complete one.

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
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

LATEST = "latest"
TMP_PREFIX = ".tmp-"
# A published folder being replaced by a redo of the same step is moved aside under this prefix
# and deleted only once its replacement is in place.
OLD_PREFIX = ".old-"
ENGINE_TAG = "state"
_STEP_DIR = re.compile(r"^(?:\.old-)?step_(\d{8})$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def data_state_name(rank: int) -> str:
    return f"data_state_rank{rank:05d}.json"


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
