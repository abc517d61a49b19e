"""Driver-side monitoring: the watcher, the Prometheus service-discovery file and the progress line.

The workers serve their own metrics (:mod:`mlctl.metrics`); the driver only tells Prometheus where
they are (a ``file_sd`` JSON that one Prometheus re-reads, so workers on every node are found as
they come and go) and shows a one-line summary to the person who started the run. What it shows
comes from the run's control actor (launcher/control.py), which every node reaches through Ray.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import threading
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


class RunWatcher(threading.Thread):
    """Driver-side: polls the run's control actor (``feed(since)`` -> its snapshot) once a second.

    It prints each worker's endpoint once and keeps the Prometheus discovery file current, draws
    the progress bar and the evaluation results from rank 0's records (and, with ``write_jsonl``,
    keeps them in ``RUN/metrics.jsonl`` on this node: the workers' own run folders may be elsewhere),
    says which data a rank skipped, and hands a fatal error to ``on_fatal`` once. When no worker has
    reported after ``wait_warning`` seconds, it says which resources the run is waiting for (Ray
    would wait silently). Everything goes to ``stream`` through one :class:`ProgressLine`.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: Any,
        feed: Callable[[int], dict[str, Any]],
        interval: float = 1.0,
        stream: TextIO | None = None,
        wait_warning: float = 60.0,
        resources: Callable[[], dict[str, float]] | None = None,
        write_jsonl: bool = False,
        on_fatal: Callable[[str], None] | None = None,
    ):
        super().__init__(daemon=True)
        self.run_dir, self.cfg, self.feed, self.interval = Path(run_dir), cfg, feed, interval
        self.stop_event = threading.Event()
        self.seen: dict[int, dict[str, Any]] = {}
        self.next = 0
        self.skipped: dict[int, dict[str, int]] = {}
        self.saved: dict[str, Any] | None = None
        self.last: dict[str, Any] = {}
        self.progress = ProgressLine(total=cfg.train.max_steps, stream=stream or sys.stdout)
        self.wait_warning, self.resources = wait_warning, resources
        self.write_jsonl, self.on_fatal = write_jsonl, on_fatal
        self.started = time.monotonic()
        self.warned_wait = False
        self.fatal_seen = False
        self.write_failed = False

    @property
    def workers_seen(self) -> bool:
        return bool(self.seen)

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.poll()
        self.poll()
        self.progress.close()

    def poll(self) -> None:
        try:
            snap = self.feed(self.next)
        except Exception as e:  # the actor went with a dying driver: nothing more to show
            self.progress.write(f"[mlctl] lost the run's control actor: {e}")
            self.stop_event.set()
            return
        self.last = snap
        try:
            self.show_endpoints(snap["endpoints"])
            self.show_records(snap["records"])
        except OSError as e:  # the run folder's disk is full or gone: keep watching, say it once
            if not self.write_failed:
                self.write_failed = True
                self.progress.write(f"[mlctl] cannot write to {self.run_dir}: {e}")
        self.next = snap["next"]
        self.show_skipped(snap["skipped"])
        self.show_saved(snap.get("saved"))
        self.check_waiting()
        if snap.get("fatal") and not self.fatal_seen:
            self.fatal_seen = True
            if self.on_fatal is not None:
                self.on_fatal(snap["fatal"])

    def check_waiting(self) -> None:
        if self.warned_wait or self.seen or time.monotonic() - self.started < self.wait_warning:
            return
        self.warned_wait = True
        # An elastic run starts once its minimum fits; that is what to compare with the cluster.
        ray_cfg = self.cfg.ray
        need = ray_cfg.min_workers * ray_cfg.cpus_per_worker
        gpus = ray_cfg.min_workers * ray_cfg.gpus_per_worker
        have = self.resources() if self.resources else {}
        if have.get("CPU", need) >= need and have.get("GPU", 0.0) >= gpus:
            return  # still starting (model loading, DeepSpeed op build): nothing to act on
        self.progress.write(
            f"[mlctl] waiting: the run needs {ray_cfg.num_workers} workers x {ray_cfg.cpus_per_worker:g} CPU"
            + (f" x {ray_cfg.gpus_per_worker:g} GPU" if gpus else "")
            + f", the Ray cluster has {have.get('CPU', 0):g} CPU, {have.get('GPU', 0):g} GPU in all; "
            "Ray waits until a node with enough joins (lower ray.num_workers / --cpus-per-worker, "
            "or add nodes)"
        )

    def show_endpoints(self, endpoints: dict[int, dict[str, Any]]) -> None:
        changed = False
        for rank, info in sorted(endpoints.items()):
            if self.seen.get(rank) != info:
                self.seen[rank] = info
                changed = True
                self.progress.write(
                    f"[mlctl] rank {info['rank']} on {info['node']}: metrics at {info['url']}"
                )
        if changed:
            targets = [
                {
                    "target": f"{i['host']}:{i['port']}",
                    "run": self.run_dir.name,
                    "rank": i["rank"],
                    "node": i["node"],
                }
                for i in self.seen.values()
            ]
            publish_service_discovery(self.run_dir, targets)

    def show_records(self, records: list[dict[str, Any]]) -> None:
        if self.write_jsonl and records:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in records))
        for rec in records:
            if not isinstance(rec, dict) or "step" not in rec:
                continue
            if "loss" in rec:
                self.progress.update(
                    step=rec["step"],
                    loss=rec["loss"],
                    pairs_per_s=rec.get("samples_per_second", float("nan")),
                    at=rec.get("time"),
                )
            elif rec.get("event") == "eval" and isinstance(rec.get("eval"), dict):
                figures = " ".join(f"{k} {v:.3f}" for k, v in rec["eval"].items() if isinstance(v, float))
                self.progress.write(f"[mlctl] eval step {rec['step']}: {figures}")

    def show_saved(self, saved: dict[str, Any] | None) -> None:
        """One line per checkpoint the run has published (and, to an object store, committed)."""
        if saved and saved != self.saved:
            self.saved = saved
            self.progress.write(f"[mlctl] checkpoint at step {saved['step']} saved: {saved['where']}")

    def show_skipped(self, skipped: dict[int, dict[str, int]]) -> None:
        for rank, counts in sorted(skipped.items()):
            before = self.skipped.get(rank, {})
            new = {r: n - before.get(r, 0) for r, n in counts.items() if n > before.get(r, 0)}
            if new:
                what = ", ".join(f"{reason} +{n}" for reason, n in sorted(new.items()))
                log = self.run_dir / "logs" / f"rank{rank:05d}.log"
                self.progress.write(f"[mlctl] data skipped on rank {rank}: {what} (details in {log})")
            self.skipped[rank] = dict(counts)

    def skipped_total(self) -> dict[str, int]:
        """Data skipped by reason, summed over ranks (for the closing line)."""
        total: dict[str, int] = {}
        for counts in self.skipped.values():
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
        return total

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)
