"""mlctl.lock.RunLock with real processes: a live holder blocks, a dead one on this host is replaced,
one on another host never is."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mlctl.lock import LockHeld, RunLock, read_owner

ROOT = Path(__file__).resolve().parent.parent


def _holder(lock: Path) -> subprocess.Popen:
    """A process that takes ``lock``, says so on stdout, and sleeps until killed."""
    code = (
        "import sys, time; from mlctl.lock import RunLock\n"
        f"RunLock({str(lock)!r}).acquire(); print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_blocks_and_a_dead_one_is_replaced(tmp_path, caplog):
    lock = tmp_path / "x.lock"
    proc = _holder(lock)
    try:
        with pytest.raises(LockHeld) as e:
            RunLock(lock, what="output folder X").acquire()
        msg = str(e.value)
        assert f"pid {proc.pid}" in msg and socket.gethostname() in msg and "output folder X" in msg, msg
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with RunLock(lock) as held:  # the holder died without releasing: taken over, with a warning
        assert read_owner(lock)["pid"] == os.getpid() == held.pid
    assert "no longer running" in caplog.text and str(proc.pid) in caplog.text
    assert not lock.exists() and list(tmp_path.iterdir()) == []


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    lock = tmp_path / "x.lock"
    record = {"pid": 1234, "host": "node-7", "started": "2026-01-01T00:00:00+00:00"}
    lock.write_text(json.dumps(record))
    with pytest.raises(LockHeld) as e:
        RunLock(lock, what="run folder R").acquire()
    msg = str(e.value)
    assert "pid 1234 on host node-7" in msg and f"remove {lock}" in msg, msg
    assert json.loads(lock.read_text()) == record  # untouched


def test_release_only_removes_its_own_lock_and_garbage_is_reported(tmp_path):
    lock = tmp_path / "x.lock"
    a = RunLock(lock).acquire()
    with pytest.raises(LockHeld, match="in use by pid"):
        RunLock(lock).acquire()  # the same process, a second time: not re-entrant
    a.release()
    a.release()  # idempotent
    assert not lock.exists()
    lock.write_text("not json")
    with pytest.raises(LockHeld, match=f"holds no lock record; .*remove {lock}"):
        RunLock(lock).acquire()
