"""Driver-side monitoring: the Prometheus service-discovery file of a run and the progress line.

The workers serve their own metrics (:mod:`mlctl.metrics`); the driver only tells Prometheus where
they are (a ``file_sd`` JSON that one Prometheus re-reads, so workers on every node are found as
they come and go) and shows a one-line summary to the person who started the run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO


def _target(ep: dict[str, Any]) -> str:
    if ep.get("target"):
        return str(ep["target"])
    if ep.get("host") and ep.get("port"):
        host = str(ep["host"])
        return f"[{host}]:{ep['port']}" if ":" in host else f"{host}:{ep['port']}"
    raise ValueError(f"service discovery: endpoint {ep!r} needs 'target' (host:port) or 'host' and 'port'")


def write_service_discovery(path: str | Path, endpoints: list[dict[str, Any]]) -> None:
    """Write a Prometheus file-based service-discovery JSON for a run's workers.

    Each endpoint is ``{"target": "host:port"}`` (or ``"host"`` and ``"port"``) with ``run``,
    ``rank`` and ``node``; the result is ``[{"targets": ["host:port"], "labels": {"run": ...,
    "rank": ..., "node": ...}}, ...]`` sorted by rank. The file is replaced atomically, because
    Prometheus re-reads it whenever it changes and must never see half of it.
    """
    keyed: list[tuple[tuple[int, str], dict[str, Any]]] = []
    for ep in endpoints:
        missing = [k for k in ("run", "rank", "node") if k not in ep]
        if missing:
            raise ValueError(f"service discovery: endpoint {ep!r} lacks {', '.join(missing)}")
        target, rank = _target(ep), str(ep["rank"])
        # file_sd label values must be strings.
        labels = {"run": str(ep["run"]), "rank": rank, "node": str(ep["node"])}
        keyed.append(((int(rank) if rank.isdigit() else 0, target), {"targets": [target], "labels": labels}))
    groups = [g for _, g in sorted(keyed, key=lambda kg: kg[0])]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(groups, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


SD_FILE = "prometheus_sd.json"
SD_FOLDER = "prometheus_sd"


def shared_sd_path(run_dir: str | Path) -> Path:
    """``STORAGE/prometheus_sd/RUN.json``: where ``cluster/monitoring/prometheus.yml`` looks.

    Prometheus accepts a wildcard only in a file name, not in a folder, so one Prometheus can follow
    every run only if their discovery files share one folder next to the run folders.
    """
    run_dir = Path(run_dir)
    return run_dir.parent / SD_FOLDER / f"{run_dir.name}.json"


def publish_service_discovery(run_dir: str | Path, endpoints: list[dict[str, Any]]) -> list[Path]:
    """Write the run's discovery file into the run folder (a record of where its workers served) and
    into the shared folder Prometheus watches. Returns both paths."""
    paths = [Path(run_dir) / SD_FILE, shared_sd_path(run_dir)]
    for p in paths:
        write_service_discovery(p, endpoints)
    return paths


def retract_service_discovery(run_dir: str | Path) -> None:
    """Remove the run from the shared folder once it is over, so Prometheus stops scraping (and
    alerting on) workers that are gone. The copy in the run folder stays."""
    shared_sd_path(run_dir).unlink(missing_ok=True)


def format_eta(seconds: float) -> str:
    """``4270.2`` -> ``"1:11:10"``; unknown -> ``"?"``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressLine:
    """The driver's progress display: ``step 40/100 | loss 1.234 | 512 pairs/s | ETA 0:01:10``.

    On a terminal it is a tqdm bar redrawn in place, with those figures after it; otherwise (a log
    file, a pipe, Ray's captured output) a plain line is printed at most every ``every_seconds`` so
    logs stay readable. The ETA comes from the step rate since the first update, measured on the
    times given to :meth:`update` (the steps' own times when replaying ``metrics.jsonl``), not on
    when the driver happened to read them. :meth:`write` prints a message without breaking the bar.
    """

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        every_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
    ):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.every_seconds = every_seconds
        self.clock = clock
        isatty = getattr(self.stream, "isatty", None)
        self.tty = tty if tty is not None else bool(isatty and isatty())
        self._first: tuple[float, int] | None = None
        self._last_print: float | None = None
        self._bar: Any = None  # tqdm, made at the first update so start-up time is not in the bar
        self._line = ""
        self._printed_line = ""
        self.step = 0

    @staticmethod
    def figures(loss: float, pairs_per_s: float, eta_seconds: float) -> str:
        rate = f"{pairs_per_s:.0f}" if math.isfinite(pairs_per_s) else "?"
        return f"loss {loss:.3f} | {rate} pairs/s | ETA {format_eta(eta_seconds)}"

    def render(self, step: int, loss: float, pairs_per_s: float, eta_seconds: float) -> str:
        return f"step {step}/{self.total} | {self.figures(loss, pairs_per_s, eta_seconds)}"

    def update(self, step: int, loss: float, pairs_per_s: float, at: float | None = None) -> None:
        """New figures for ``step``; draws the line when it is due.

        ``at`` is when the step happened, on one clock for all calls (e.g. metrics.jsonl's ``time``
        when replaying records read in batches); default: now, by ``clock``.
        """
        now = self.clock() if at is None else at
        if self._first is None or step < self._first[1]:  # first update, or a restart went back
            self._first = (now, step)
        t0, s0 = self._first
        eta = (self.total - step) * (now - t0) / (step - s0) if step > s0 and now > t0 else math.nan
        eta = eta if step < self.total else 0.0
        self.step = step
        self._line = self.render(step, loss, pairs_per_s, eta)
        if self.tty:
            self._draw(step, self.figures(loss, pairs_per_s, eta))
        elif self._last_print is None or now - self._last_print >= self.every_seconds or step >= self.total:
            self._print_line(now)

    def _draw(self, step: int, figures: str) -> None:
        from tqdm import tqdm

        if self._bar is None:
            # NOTE: the ETA is ours (see the class docstring), so tqdm's own rate and remaining time
            # are left out of the format; tqdm draws the bar and keeps it on one terminal line.
            self._bar = tqdm(
                total=self.total,
                initial=step,
                desc=figures,
                file=self.stream,
                dynamic_ncols=True,
                bar_format="step {n}/{total} {bar} {desc}",
                leave=True,
            )
        else:
            self._bar.n = step
            self._bar.set_description_str(figures, refresh=False)
            self._bar.refresh()
        self._printed_line = self._line

    def write(self, message: str) -> None:
        """Print a whole line (an evaluation result, an endpoint) above the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            self.stream.write(message + "\n")
            self.stream.flush()

    def _print_line(self, now: float) -> None:
        self.stream.write(self._line + "\n")
        self.stream.flush()
        self._last_print = now
        self._printed_line = self._line

    def close(self) -> None:
        """End the bar (terminal) or print the last figures if not printed yet (logs)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif not self.tty and self._line and self._line != self._printed_line:
            self._print_line(self.clock())


# Library loggers whose INFO chatter repeats on every worker and says nothing a user acts on.
QUIET_LOGGERS = ("transformers", "deepspeed", "DeepSpeed", "ray.train", "torch.distributed")


def setup_worker_logging(run_dir: str | Path, rank: int) -> Path:
    """Logging of one training worker: everything at INFO into ``RUN_DIR/logs/rankNNNNN.log``; on
    the console (which Ray forwards to the driver) only warnings and notices of rank 0 and errors of
    any rank.

    NOTE: what is silenced on the console and why. The driver already shows progress, endpoints and
    evaluation (from metrics.jsonl), so the workers' INFO lines would repeat them once per rank.
    transformers' weight-loading report and progress bar (the MLM head is fresh by design, and
    mlctl.model logs which weights that is), DeepSpeed's op-build notice and Python warnings from
    libraries (e.g. torch deprecations inside DeepSpeed) are known and harmless: they go to the log
    file only. Returns the log file's path.
    """
    import logging

    path = Path(run_dir) / "logs" / f"rank{rank:05d}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(fmt)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter(f"rank {rank} %(levelname)s %(name)s: %(message)s"))
    # Rank 0 also shows the few INFO records marked ``extra={"notice": True}``: what a user must see
    # happen (a resume and where from, an elastic run's worker count).
    floor = logging.WARNING if rank == 0 else logging.ERROR
    console.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    console.addFilter(
        lambda r: (
            (r.levelno >= floor or getattr(r, "notice", False))
            and r.name != "py.warnings"
            and not r.name.startswith(QUIET_LOGGERS)
        )
    )
    root.addHandler(to_file)
    root.addHandler(console)
    root.setLevel(logging.INFO)
    # Python's default filters stay (a module may have silenced a warning it knows about).
    logging.captureWarnings(True)
    quiet_library_output()
    # Libraries that print() instead of logging (DeepSpeed's "op built successfully") write to the
    # log file too; the worker's own messages all go through logging.
    sys.stdout = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (lives as long as the worker)
    return path


def quiet_library_output() -> None:
    """transformers' load report and weight-loading bars off (errors still show); see
    :func:`setup_worker_logging` for why."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
