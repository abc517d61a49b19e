"""Signals to the driver: a stop is a save.

SIGTERM (Slurm's time-limit warning, a preemption notice, Kubernetes deleting the driver's pod),
SIGINT (Ctrl-C) and SIGUSR1 ask the run to stop: the watcher passes the request to the control
actor, rank 0 reads it between steps, every rank learns it from the step's all-reduce, the run
saves a checkpoint at the step it reached and the workers return; ``mlctl train`` then exits
128 + the signal's number. A second signal aborts at once (the newest complete checkpoint stays the
resume point). Before any worker has started there is nothing to save, so the first signal aborts.

Handlers are Python's, so they run in the main thread between bytecodes, also while it waits in
``trainer.fit()``. Ray's blocking calls let only KeyboardInterrupt through (another exception a
handler raises there is printed and dropped), so aborting raises KeyboardInterrupt and
:attr:`StopSignals.abort` says why.
"""

from __future__ import annotations

import _thread
import signal
import threading
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
    """Installs the handlers (main thread only; Python's rule) and restores the previous ones."""

    def __init__(self, say: Callable[[str], None], can_wait: Callable[[], bool]):
        self.say, self.can_wait = say, can_wait
        self.received: list[int] = []
        self.requested = threading.Event()  # the watcher forwards the first signal to the run
        self.abort: str | None = None  # set before KeyboardInterrupt is raised for a reason of ours
        self.waiting = True  # the main thread is (still) in trainer.fit()
        self._previous: dict[int, object] = {}

    @property
    def signum(self) -> int | None:
        return self.received[0] if self.received else None

    @property
    def name(self) -> str:
        return signal.Signals(self.received[0]).name if self.received else ""

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.abort is not None:  # fail(): the watcher interrupted the main thread
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        if self.received:
            self.abort = f"second signal ({name}) during the stop"
            self.say(f"[mlctl] {name} again: aborting now, without waiting for the save")
            raise KeyboardInterrupt
        self.received.append(signum)
        if not self.can_wait():
            self.abort = f"{name} before any worker started"
            raise KeyboardInterrupt
        self.say(
            f"[mlctl] {name}: stopping after the current step and saving a checkpoint "
            "(send it again to abort without saving)"
        )
        self.requested.set()

    def fail(self, reason: str) -> None:
        """From another thread: end the main thread's wait in ``trainer.fit()`` with
        KeyboardInterrupt, for ``reason`` (nothing when it has already left it)."""
        if not self.waiting:
            return
        self.abort = reason
        _thread.interrupt_main(signal.SIGINT)
