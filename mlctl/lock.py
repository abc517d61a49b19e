"""A lock file that says who holds a folder: one writer at a time for a prepared dataset or a run.

::

    with RunLock(out.parent / f".{out.name}.lock", what=f"output folder {out}"):
        ...  # only this process writes to out

The lock is a small JSON file, ``{"pid": ..., "host": ..., "started": ...}``, created atomically
(``O_CREAT | O_EXCL``), so it also works on a shared filesystem where ``flock`` may not. A second
process gets :class:`LockHeld`, whose message names the holder's pid and host. A lock left behind by
a process that died on *this* host (SIGKILL, a power cut) is taken over with a warning; one from
another host is never taken over, since this host cannot tell whether that process still runs: the
message says which file to remove once it is known to be dead.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)


class LockHeld(RuntimeError):
    """Another process holds the lock (or it cannot be told apart from one that does)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def read_owner(path: str | Path) -> dict | None:
    """The holder recorded in a lock file (``pid``, ``host``, ``started``), None when there is no
    lock; ``{}`` when the file exists but does not hold a lock record."""
    p = Path(path)
    # NOTE: the holder creates the file and then writes it; a reader in between sees it empty.
    # Three tries over ~0.3 s let such a write finish before the file is called unreadable.
    for attempt in range(3):
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return None
        try:
            owner = json.loads(raw)
            if isinstance(owner, dict) and isinstance(owner.get("pid"), int) and owner.get("host"):
                return owner
        except ValueError:
            pass
        if attempt < 2:
            time.sleep(0.15)
    return {}


class RunLock:
    """Exclusive, inter-process lock held as the file ``path`` (context manager).

    ``what`` names the thing locked in messages (``"output folder /data/shards"``). ``host`` and
    ``pid`` default to this process's; tests inject them to play another holder."""

    def __init__(self, path: str | Path, what: str = "", *, host: str | None = None, pid: int | None = None):
        self.path = Path(path)
        self.what = what or str(self.path)
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self.held = False

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`LockHeld`; a dead holder on this host is replaced."""
        for _ in range(5):  # a retry per stale lock taken over under our feet; 5 is plenty
            if self._create():
                self.held = True
                return self
            owner = read_owner(self.path)
            if owner is None:
                continue  # released between our create and our read
            self._take_over_if_stale(owner)
        raise LockHeld(f"{self.what}: could not take the lock {self.path} (it keeps changing hands)")

    def release(self) -> None:
        """Remove the lock file if this object holds it (and it is still ours)."""
        if not self.held:
            return
        self.held = False
        owner = read_owner(self.path)
        if owner and owner.get("pid") == self.pid and owner.get("host") == self.host:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ----------------------------------------------------------------------------------------------

    def _create(self) -> bool:
        record = {
            "pid": self.pid,
            "host": self.host,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over_if_stale(self, owner: dict) -> None:
        """Remove the lock when its holder is known dead; raise :class:`LockHeld` otherwise."""
        if not owner:
            raise LockHeld(
                f"{self.what}: the lock file {self.path} exists but holds no lock record; "
                f"if no other process is using it, remove {self.path} and retry"
            )
        pid, host, since = owner["pid"], owner["host"], owner.get("started", "?")
        if host != self.host:
            raise LockHeld(
                f"{self.what} is locked by pid {pid} on host {host} (since {since}); "
                f"this host ({self.host}) cannot tell whether it still runs: if it does not, "
                f"remove {self.path} and retry"
            )
        if pid == self.pid or _pid_alive(pid):
            raise LockHeld(
                f"{self.what} is in use by pid {pid} on host {host} (since {since}); "
                f"wait for it to finish or stop it (lock file {self.path})"
            )
        # NOTE: move the stale file aside before deleting it and check what was moved: two processes
        # taking over the same stale lock must not delete each other's fresh one.
        aside = self.path.with_name(f"{self.path.name}.stale-{self.pid}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process took it over first; try to create again
        moved = read_owner(aside)
        if moved != owner:
            try:
                os.link(aside, self.path)  # someone's live lock: put it back, unless a newer one exists
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        log.warning(
            "%s: taking over the lock %s left by pid %d on this host (%s), which is no longer running",
            self.what,
            self.path,
            pid,
            host,
        )
