"""Where `mlctl prepare` writes: a staging folder of its own, published only when the run succeeds,
so a failed, interrupted or concurrent prepare never costs the dataset already in the output.

A local output ``/data/shards``:

- ``/data/.shards.lock`` (:class:`mlctl.lock.RunLock`) admits one prepare per output at a time;
- the run writes into ``/data/.shards.staging-<pid>``, a sibling on the same filesystem, so that
  publishing is two renames and two runs never read each other's temporary files;
- on success: ``shards`` -> ``.shards.old-<pid>``, the staging folder -> ``shards``, the old one
  deleted. On any failure (an exception, Ctrl-C) the staging folder is deleted and ``shards`` is left
  as it was;
- a process killed outright leaves its staging folder and lock behind; the next prepare into the
  output removes them, after putting ``.shards.old-<pid>`` back if the kill came between the renames
  (until then that hidden folder is the complete previous dataset).

An object-store output (``s3://bucket/prefix?endpoint_override=...``, see :mod:`mlctl.storage`) is
staged in a local temporary folder. Publishing deletes the old ``manifest.json`` first, uploads the
shards, writes ``manifest.json`` last and then deletes shards the new manifest does not name: a
reader never sees a manifest naming a missing or half-written shard, and a failed upload leaves no
manifest. The lock is then a local one (two prepares on one host), since an object store has no
exclusive create.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from mlctl import storage
from mlctl.data.skips import InputError
from mlctl.lock import RunLock

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# What a prepare writes into its output (the dot-files are what older versions left after a crash).
_OURS = re.compile(r"manifest\.json|shard-\d{6}\.tar|\.manifest\.json\.tmp|\.shard-\d{6}\.tar\.tmp|\.shuffle")
_SHARD = re.compile(r"shard-\d{6}\.tar")


def manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, ensure_ascii=False, indent=2) + "\n"


class StagedOutput:
    """``with StagedOutput(out) as stage:`` write into ``stage.dir``, then ``stage.publish(manifest)``;
    leaving the block without publishing (an exception) discards everything written."""

    def __init__(self, out: str | Path) -> None:
        self.remote = storage.is_remote(out)
        self.location = str(out)
        self.out = None if self.remote else Path(out).expanduser().resolve()
        self.dir: Path = Path()
        self._lock: RunLock | None = None
        self._published = False

    # ----------------------------------------------------------------------------------------------
    # Opening: lock, clean up after crashed runs, make the staging folder

    def __enter__(self) -> StagedOutput:
        if self.out is not None:
            if self.out.exists() and not self.out.is_dir():
                raise InputError(f"output {self.out} is a file, not a folder")
            self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock = RunLock(self._lock_path(), what=f"output {storage.display(self.location)}")
        self._lock.acquire()
        try:
            if self.remote:
                self._check_remote()
                self.dir = Path(tempfile.mkdtemp(prefix=f"mlctl-prepare-{os.getpid()}-"))
            else:
                self._recover()
                self._check_local()
                self.dir = self._sibling("staging")
                self.dir.mkdir()
        except BaseException:
            self._lock.release()
            raise
        return self

    def _lock_path(self) -> Path:
        """Beside a local output (not in it: the folder is swapped); in the temp folder for a URI."""
        if self.out is None:
            key = hashlib.blake2b(storage.display(self.location).encode(), digest_size=8).hexdigest()
            return Path(tempfile.gettempdir()) / f"mlctl-prepare-{key}.lock"
        return self.out.parent / f".{self.out.name}.lock"

    def _sibling(self, kind: str) -> Path:
        assert self.out is not None
        return self.out.parent / f".{self.out.name}.{kind}-{os.getpid()}"

    def _recover(self) -> None:
        """Undo what a killed prepare left (we hold the lock, so no other prepare is running)."""
        assert self.out is not None
        name = glob.escape(self.out.name)
        olds = sorted(self.out.parent.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds and not self.out.exists():
            os.rename(olds.pop(), self.out)
            log.warning(
                "restored %s: a prepare was killed while swapping in a new dataset, the previous one is back",
                self.out,
            )
        for p in olds + list(self.out.parent.glob(f".{name}.staging-*")):
            log.warning("removing %s, left by a prepare that was killed", p)
            shutil.rmtree(p, ignore_errors=True)

    def _check_local(self) -> None:
        """Publishing replaces the whole folder: refuse one that holds anything a prepare did not write."""
        assert self.out is not None
        if not self.out.is_dir():
            return
        foreign = sorted(p.name for p in self.out.iterdir() if not _OURS.fullmatch(p.name))
        if foreign:
            raise InputError(
                f"output folder {self.out} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                "which `mlctl prepare` did not write; a prepare replaces the whole folder, so give a new "
                "or empty folder (or move those files elsewhere)"
            )

    def _check_remote(self) -> None:
        """Fail before any work when the object store cannot be reached or has no such bucket."""
        import pyarrow.fs as pafs

        where = storage.display(self.location)
        try:
            fs, path = storage.filesystem(self.location)
            bucket = path.split("/", 1)[0]
            missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
            if not missing:
                storage.list_names(self.location)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid (a bad URI) is a ValueError
            raise InputError(f"output {where} cannot be reached: {e}") from None
        if missing:
            raise InputError(f"output {where}: there is no bucket {bucket!r}")

    # ----------------------------------------------------------------------------------------------
    # Publishing

    def publish(self, manifest: dict) -> None:
        """Make the staged shards and ``manifest`` the output's dataset (see the module docstring)."""
        text = manifest_text(manifest)
        if self.remote:
            self._upload(manifest, text)
        else:
            tmp = self.dir / f".{MANIFEST}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.dir / MANIFEST)
            self._swap()
        self._published = True

    def _swap(self) -> None:
        assert self.out is not None
        if not self.out.exists():
            os.rename(self.dir, self.out)
            return
        old = self._sibling("old")
        os.rename(self.out, old)
        try:
            os.rename(self.dir, self.out)
        except BaseException:
            os.rename(old, self.out)  # put the previous dataset back; the staging folder goes in __exit__
            raise
        shutil.rmtree(old, ignore_errors=True)

    def _upload(self, manifest: dict, text: str) -> None:
        before = storage.list_names(self.location)
        names = [s["name"] for s in manifest["shards"]]
        where = storage.display(self.location)
        done = 0
        try:
            # The old manifest goes first: from here on a reader sees no dataset rather than a
            # manifest naming shards that are being replaced.
            storage.delete(storage.join(self.location, MANIFEST))
            for name in names:
                storage.upload_file(self.dir / name, storage.join(self.location, name))
                done += 1
            storage.write_bytes(storage.join(self.location, MANIFEST), text.encode("utf-8"))
        except OSError as e:
            step = f"uploading {names[done]}" if done < len(names) else f"writing {MANIFEST}"
            raise OSError(
                f"{where}: {step} failed after {done} of {len(names)} shard(s); no {MANIFEST} was "
                f"written there, so readers see no dataset until a prepare succeeds: {e}"
            ) from e
        for stale in sorted(set(before) - set(names)):
            if _SHARD.fullmatch(stale):
                storage.delete(storage.join(self.location, stale))

    # ----------------------------------------------------------------------------------------------

    def __exit__(self, *exc) -> None:
        try:
            if self.dir != Path() and (self.remote or not self._published):
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            if self._lock is not None:
                self._lock.release()
