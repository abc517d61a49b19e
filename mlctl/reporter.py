"""The channel between a training worker and whoever launched it (:class:`Reporter`), and the
run's count of worker-group starts (``RUN/attempts``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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
