"""What the data path does with bad input. A malformed line or entry is skipped and counted by
reason in a :class:`Counts` (the manifest's ``dropped``), the first few of each reason logged with
their ``file:line``; what would lose a file wholesale (a truncated gzip, a corrupt .mo header, a
file in another encoding, a missing dictionary) stops `mlctl prepare` with an :class:`InputError`
naming it, before any output is written.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger(__name__)

LOG_FIRST = 3  # how many examples of each skip reason are logged


class InputError(ValueError):
    """Bad input that stops `mlctl prepare` before any output (missing file, unknown format...)."""


class Counts:
    """Skips by reason, logging the first few of each with their location."""

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self._events: Counter[str] = Counter()

    def skip(self, reason: str, where: str, detail: str = "", n: int = 1) -> None:
        """Count ``n`` pairs lost at ``where`` (``n`` > 1: a file that breaks loses all its rest;
        0: it broke where nothing was left to lose, which the manifest still shows)."""
        self.by_reason[reason] += n
        self._events[reason] += 1
        if self._events[reason] <= LOG_FIRST:
            log.warning("skipped (%s) at %s%s", reason, where, f": {detail}" if detail else "")
