"""Training metrics: one Prometheus endpoint per worker and a ``metrics.jsonl`` log per run.

The engine owns one :class:`MetricsExporter` per worker and calls :meth:`MetricsExporter.log_step`
once per optimizer step. Every series carries the labels ``run``, ``rank`` and ``node`` (never a
step label: Prometheus keeps one series per label set, and a step label would make one per step).
Rank 0 also appends each step, checkpoint and evaluation to ``RUN_DIR/metrics.jsonl``, which the
launcher's progress line and ``mlctl report`` read.

Totals (steps, samples, tokens, restarts) are carried by the checkpoint: a restarted worker calls
:meth:`MetricsExporter.restore_totals` so its counters continue from the checkpointed values instead
of starting at zero.

Where an endpoint binds and what address it advertises is :mod:`mlctl.endpoints`; reading one back
is :mod:`mlctl.scrape`. This module is where the metrics API is imported from (``__all__``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from mlctl.config import MetricsConfig
from mlctl.endpoints import advertised_host, endpoint_addresses, is_loopback
from mlctl.scrape import Samples, parse_metrics, scrape

__all__ = [
    "LABELS",
    "METRIC_NAMES",
    "MetricsExporter",
    "Samples",
    "StepMetrics",
    "advertised_host",
    "endpoint_addresses",
    "is_loopback",
    "parse_metrics",
    "scrape",
]

log = logging.getLogger(__name__)

LABELS = ("run", "rank", "node")

# The public metric names (DESIGN.md). Counters are listed with the `_total` they are exposed with;
# histograms expose `_bucket`, `_sum` and `_count` series under their base name.
METRIC_NAMES = (
    "mlctl_train_loss",
    "mlctl_train_contrastive_loss",
    "mlctl_train_mlm_loss",
    "mlctl_train_steps_total",
    "mlctl_train_samples_total",
    "mlctl_train_tokens_total",
    "mlctl_train_samples_per_second",
    "mlctl_train_step_seconds",
    "mlctl_data_wait_seconds",
    "mlctl_train_lr",
    "mlctl_train_grad_norm",
    "mlctl_train_global_batch_size",
    "mlctl_train_inbatch_accuracy",
    "mlctl_data_skipped_total",
    "mlctl_checkpoint_seconds",
    "mlctl_restarts_total",
    "mlctl_eval_retrieval_accuracy",
)

# Steps take from ~10 ms (tiny CPU model) to a minute (large model, big global batch).
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)
# Waiting for data should be near zero; the low buckets tell "prefetch keeps up" from "it does not".
WAIT_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    math.inf,
)

# How many ports past the configured one to try when it is taken.
PORT_ATTEMPTS = 64


@dataclass
class StepMetrics:
    """What the engine knows after one optimizer step.

    ``samples`` and ``tokens`` are the pairs and tokens consumed by this step (the engine passes the
    count over all ranks); ``step_seconds`` is the step's wall time including ``data_wait_seconds``,
    the part spent blocked on the data loader.
    """

    step: int
    loss: float
    contrastive_loss: float
    mlm_loss: float
    samples: int
    tokens: int
    step_seconds: float
    data_wait_seconds: float
    lr: float
    grad_norm: float | None
    global_batch_size: int
    inbatch_accuracy: float


class MetricsExporter:
    """One worker's metrics: Prometheus gauges, counters and histograms, served over HTTP, and the
    run's ``metrics.jsonl`` (rank 0 only).

    ``clock`` measures the throughput window and the jsonl flush interval (injectable for tests);
    ``registry`` defaults to a private one, so several exporters can live in one process.
    """

    def __init__(
        self,
        cfg: MetricsConfig,
        *,
        run: str,
        rank: int,
        node: str,
        local_rank: int,
        run_dir: Path | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        flush_seconds: float = 1.0,
        sink: Callable[[list[dict[str, Any]]], None] | None = None,
    ):
        if cfg.window_steps < 1:
            raise ValueError(f"metrics.window_steps must be >= 1, got {cfg.window_steps}")
        self.cfg = cfg
        self.run, self.rank, self.node, self.local_rank = run, rank, node, local_rank
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.clock = clock
        self.flush_seconds = flush_seconds
        # where rank 0's records also go, a batch per flush (the launcher: the driver's console)
        self.sink = sink
        self.port: int | None = None
        self._server: Any = None
        self._thread: Any = None
        self._jsonl: IO[str] | None = None
        self._pending: list[dict[str, Any]] = []  # jsonl records not written yet
        self._last_flush = -math.inf  # the first record goes out at once: the file exists early
        # (clock time, samples) of the last window_steps + 1 steps; the first entry only marks
        # where the window starts in time.
        self._window: deque[tuple[float, int]] = deque(maxlen=cfg.window_steps + 1)
        self._window_samples = 0  # samples of every entry in _window but the first
        self._totals = {"steps": 0, "samples": 0, "tokens": 0, "restarts": 0}
        self._define_metrics()

    # ---- registry ----------------------------------------------------------------------------

    def _define_metrics(self) -> None:
        r = self.registry
        labels = {"run": self.run, "rank": str(self.rank), "node": self.node}

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, LABELS, registry=r).labels(**labels)

        def counter(name: str, doc: str) -> Any:
            # prometheus_client appends `_total` itself.
            return Counter(name.removesuffix("_total"), doc, LABELS, registry=r).labels(**labels)

        self.loss = gauge("mlctl_train_loss", "Total loss of the last step (contrastive + weighted MLM).")
        self.contrastive_loss = gauge(
            "mlctl_train_contrastive_loss", "Contrastive (CZ-NCE / InfoNCE) loss of the last step."
        )
        self.mlm_loss = gauge("mlctl_train_mlm_loss", "Masked-LM loss of the last step (unweighted).")
        self.steps = counter("mlctl_train_steps_total", "Optimizer steps done, carried across restarts.")
        self.samples = counter(
            "mlctl_train_samples_total", "Sentence pairs trained on, carried across restarts."
        )
        self.tokens = counter("mlctl_train_tokens_total", "Tokens trained on, carried across restarts.")
        self.samples_per_second = gauge(
            "mlctl_train_samples_per_second",
            "Pairs per second over the last metrics.window_steps steps (wall clock).",
        )
        self.step_seconds = Histogram(
            "mlctl_train_step_seconds",
            "Wall time of one optimizer step, data wait included.",
            LABELS,
            buckets=STEP_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.data_wait_seconds = Histogram(
            "mlctl_data_wait_seconds",
            "Time one step spent waiting for its batches.",
            LABELS,
            buckets=WAIT_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.lr = gauge("mlctl_train_lr", "Learning rate of the last step.")
        self.grad_norm = gauge(
            "mlctl_train_grad_norm", "Global gradient norm of the last step (before clipping)."
        )
        self.grad_norm.set(math.nan)  # unknown until a step reports one, rather than a made-up 0
        self.global_batch_size = gauge(
            "mlctl_train_global_batch_size", "Pairs per optimizer step over all ranks."
        )
        self.inbatch_accuracy = gauge(
            "mlctl_train_inbatch_accuracy",
            "Share of rows whose nearest neighbour in the global batch is their translation.",
        )
        self.checkpoint_seconds = gauge("mlctl_checkpoint_seconds", "Wall time of the last checkpoint save.")
        self.restarts = counter("mlctl_restarts_total", "Times the run resumed from a checkpoint.")
        self._skipped = Counter(
            "mlctl_data_skipped",
            "Records the data loader skipped, by reason.",
            (*LABELS, "reason"),
            registry=r,
        )
        self._eval = Gauge(
            "mlctl_eval_retrieval_accuracy",
            "Retrieval accuracy (xx->en) on the dev pairs, by language.",
            (*LABELS, "lang"),
            registry=r,
        )
        self._labels = labels

    # ---- serving -----------------------------------------------------------------------------

    def start(self) -> int | None:
        """Serve ``/metrics`` if ``cfg.enabled``: on ``cfg.port + local_rank``, or the next free port
        when that one is taken (logged). Returns the bound port, or None when disabled."""
        if not self.cfg.enabled or self._server is not None:
            return self.port
        wanted = self.cfg.port + self.local_rank
        last_error: OSError | None = None
        for port in range(wanted, min(wanted + PORT_ATTEMPTS, 65536)):
            try:
                self._server, self._thread = start_http_server(
                    port, addr=self.cfg.bind, registry=self.registry
                )
            except OSError as e:  # taken (EADDRINUSE) or not allowed; the next one may do
                last_error = e
                continue
            self.port = port
            break
        if self.port is None:
            raise OSError(
                f"metrics: no free port in {wanted}..{wanted + PORT_ATTEMPTS - 1} on {self.cfg.bind!r} "
                f"(last error: {last_error})"
            )
        if self.port != wanted:
            log.warning(
                "metrics: port %d is in use; rank %d serves on %d instead", wanted, self.rank, self.port
            )
        log.info("metrics: rank %d serves %s", self.rank, self.endpoint)
        return self.port

    @property
    def endpoint(self) -> str | None:
        """``http://host:port/metrics`` once serving, else None (host: the bind address, or this
        machine's address when bound to all interfaces)."""
        if self.port is None:
            return None
        host = advertised_host(self.cfg.bind)
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return f"http://{host}:{self.port}/metrics"

    # ---- updates -----------------------------------------------------------------------------

    def restore_totals(self, steps: int, samples: int, tokens: int, restarts: int) -> None:
        """Continue the counters from a checkpoint's totals (absolute values)."""
        self._advance("steps", self.steps, steps)
        self._advance("samples", self.samples, samples)
        self._advance("tokens", self.tokens, tokens)
        self.set_restarts(restarts)

    def set_restarts(self, n: int) -> None:
        """Set ``mlctl_restarts_total`` to ``n`` (the checkpoint carries it)."""
        self._advance("restarts", self.restarts, n)

    def _advance(self, key: str, counter: Any, value: int) -> None:
        # Counters only go up: raise them by the difference. A lower value means the caller mixed
        # up runs; Prometheus would read a drop as a counter reset, so keep the higher one and say so.
        diff = value - self._totals[key]
        if diff < 0:
            log.warning(
                "metrics: %s total %d is below the exported %d; kept %d",
                key,
                value,
                self._totals[key],
                self._totals[key],
            )
            return
        if diff:
            counter.inc(diff)
            self._totals[key] = value

    def log_step(self, m: StepMetrics) -> None:
        """Record one optimizer step (cheap: a few lock-protected float updates and, on rank 0, one
        buffered line of JSON)."""
        now = self.clock()
        self.loss.set(m.loss)
        self.contrastive_loss.set(m.contrastive_loss)
        self.mlm_loss.set(m.mlm_loss)
        self.steps.inc()
        self.samples.inc(m.samples)
        self.tokens.inc(m.tokens)
        self._totals["steps"] += 1
        self._totals["samples"] += m.samples
        self._totals["tokens"] += m.tokens
        self.step_seconds.observe(m.step_seconds)
        self.data_wait_seconds.observe(m.data_wait_seconds)
        self.lr.set(m.lr)
        if m.grad_norm is not None:
            self.grad_norm.set(m.grad_norm)
        self.global_batch_size.set(m.global_batch_size)
        self.inbatch_accuracy.set(m.inbatch_accuracy)
        rate = self._throughput(now, m)
        self.samples_per_second.set(rate)
        if self._writes_jsonl():
            # vars(), not dataclasses.asdict(): asdict deep-copies every field, half of log_step's cost.
            self._write({"event": "train", **vars(m), "samples_per_second": rate}, now)

    def _throughput(self, now: float, m: StepMetrics) -> float:
        """Pairs per second over the last ``window_steps`` steps, by the clock, so time outside the
        step (evaluation, checkpoints) counts too. The first step has no window yet and uses its own
        step time."""
        if len(self._window) == self._window.maxlen:
            self._window_samples -= self._window[1][1]  # leaves the window; [0] only marks its start
        self._window.append((now, m.samples))
        if len(self._window) > 1:
            self._window_samples += m.samples
            span = now - self._window[0][0]
            if span > 0:
                return self._window_samples / span
        # No window yet (or a clock that did not move): this step's own rate.
        return m.samples / m.step_seconds if m.step_seconds > 0 else 0.0

    def log_skipped(self, reason: str, count: int) -> None:
        """Count ``count`` records the loader dropped for ``reason``."""
        if count < 0:
            raise ValueError(f"log_skipped: count must be >= 0, got {count}")
        self._skipped.labels(**self._labels, reason=reason).inc(count)

    def log_checkpoint(self, seconds: float, step: int) -> None:
        """Record how long the checkpoint at ``step`` took to write."""
        self.checkpoint_seconds.set(seconds)
        if self._writes_jsonl():
            self._write(
                {"event": "checkpoint", "step": step, "checkpoint_seconds": seconds}, self.clock(), flush=True
            )

    def log_eval(self, step: int, results: dict[str, float]) -> None:
        """Record retrieval accuracy per language (``{"de": 0.93, ...}``) measured at ``step``."""
        for lang, value in results.items():
            self._eval.labels(**self._labels, lang=lang).set(value)
        if self._writes_jsonl():
            self._write({"event": "eval", "step": step, "eval": dict(results)}, self.clock(), flush=True)

    # ---- metrics.jsonl -----------------------------------------------------------------------

    def _writes_jsonl(self) -> bool:
        """Whether this exporter keeps records (rank 0: to metrics.jsonl and/or the sink)."""
        return self.rank == 0 and (self.sink is not None or (self.cfg.jsonl and self.run_dir is not None))

    def _write(self, rec: dict[str, Any], now: float, flush: bool = False) -> None:
        rec["time"] = time.time()
        rec["restarts"] = self._totals["restarts"]
        self._pending.append(rec)
        # NOTE: records are serialised and written together once per flush_seconds (the launcher's
        # progress line polls once a second): one syscall instead of one per step, and json.dumps
        # runs in a warm loop rather than once after every compute-heavy step.
        if flush or now - self._last_flush >= self.flush_seconds:
            self._flush(now)

    def _flush(self, now: float) -> None:
        if not self._pending:
            return
        if self.sink is not None:
            try:
                self.sink(list(self._pending))
            except Exception as e:  # the driver's view is a courtesy; training goes on
                log.warning("metrics: could not send records to the launcher: %s", e)
        if not (self.cfg.jsonl and self.run_dir is not None):
            self._pending.clear()
            self._last_flush = now
            return
        if self._jsonl is None:
            assert self.run_dir is not None
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Append: a restarted worker continues the same file; `mlctl report` keeps the last
            # record of a step that was trained twice.
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._jsonl.write("".join(json.dumps(r) + "\n" for r in self._pending))
        self._jsonl.flush()
        self._pending.clear()
        self._last_flush = now

    def close(self) -> None:
        """Stop serving and close ``metrics.jsonl``. Safe to call twice."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = self._thread = None
        self._flush(self.clock())
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> MetricsExporter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
