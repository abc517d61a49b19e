"""The metrics exporter over real HTTP, metrics.jsonl, `mlctl report`, service discovery, the progress
line and the Grafana dashboard's queries."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import socket
import struct
from pathlib import Path

import pytest
from ranks import free_port

from launcher.monitoring import (
    ProgressLine,
    format_eta,
    publish_service_discovery,
    retract_service_discovery,
    shared_sd_path,
    write_service_discovery,
)
from mlctl.config import MetricsConfig
from mlctl.metrics import METRIC_NAMES, MetricsExporter, StepMetrics, parse_metrics, scrape

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "cluster" / "monitoring" / "grafana-dashboard.json"


def free_port_block(n: int = 2) -> int:
    """A base port with ``n`` consecutive free ports (the OS picks the base)."""
    for _ in range(50):
        base = free_port()
        if base + n >= 65536:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports")


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def step(i: int, samples: int = 8, loss: float = 2.0, step_seconds: float = 0.5) -> StepMetrics:
    return StepMetrics(
        step=i,
        loss=loss,
        contrastive_loss=loss - 0.1,
        mlm_loss=1.0,
        samples=samples,
        tokens=samples * 20,
        step_seconds=step_seconds,
        data_wait_seconds=0.01,
        lr=1e-4,
        grad_norm=0.7,
        global_batch_size=samples,
        inbatch_accuracy=0.25,
    )


def exporter(
    tmp_path: Path | None, port: int = 0, rank: int = 0, local_rank: int = 0, **kw
) -> MetricsExporter:
    cfg = MetricsConfig(port=port, bind="127.0.0.1", window_steps=kw.pop("window_steps", 4))
    return MetricsExporter(
        cfg, run="testrun", rank=rank, node="node-a", local_rank=local_rank, run_dir=tmp_path, **kw
    )


def total(families: dict, name: str) -> float:
    return sum(v for _, v in families[name])


# ---- the exporter over HTTP --------------------------------------------------------------------


def test_two_workers_serve_all_metrics_with_labels_and_growing_counters(tmp_path):
    base = free_port_block(2)
    exps = [exporter(tmp_path, port=base, rank=r, local_rank=r) for r in (0, 1)]
    try:
        ports = [e.start() for e in exps]
        assert ports == [base, base + 1], "port must be base + local rank"
        assert exps[1].endpoint == f"http://127.0.0.1:{base + 1}/metrics"
        for i in range(1, 4):
            for e in exps:
                e.log_step(step(i))
        for e in exps:
            e.log_skipped("too_long", 2)
            e.log_checkpoint(0.25, 3)
            e.log_eval(3, {"de": 0.5, "fr": 0.75})
        first = {e.endpoint: scrape(e.endpoint) for e in exps}
        for i in range(4, 6):
            for e in exps:
                e.log_step(step(i, loss=1.5))
        second = {e.endpoint: scrape(e.endpoint) for e in exps}
    finally:
        for e in exps:
            e.close()

    for rank, e in enumerate(exps):
        a, b = first[e.endpoint], second[e.endpoint]
        missing = set(METRIC_NAMES) - set(a)
        assert not missing, f"rank {rank} lacks {sorted(missing)}"
        for name in (
            "mlctl_train_steps_total",
            "mlctl_train_samples_total",
            "mlctl_train_tokens_total",
            "mlctl_train_step_seconds",
            "mlctl_data_wait_seconds",
        ):
            assert total(b, name) > total(a, name), f"{name} did not grow between scrapes"
        assert total(b, "mlctl_train_steps_total") == 5
        assert total(b, "mlctl_train_samples_total") == 40
        assert total(b, "mlctl_train_step_seconds_sum") == pytest.approx(2.5)
        for labels, value in b["mlctl_train_loss"]:
            assert labels == {"run": "testrun", "rank": str(rank), "node": "node-a"}
            assert math.isfinite(value) and value == 1.5
        for samples in b.values():
            for labels, _ in samples:
                assert "step" not in labels
                assert {"run", "rank", "node"} <= set(labels)
        assert dict((lab["lang"], v) for lab, v in b["mlctl_eval_retrieval_accuracy"]) == {
            "de": 0.5,
            "fr": 0.75,
        }
        assert [(lab["reason"], v) for lab, v in b["mlctl_data_skipped_total"]] == [("too_long", 2.0)]
        assert total(b, "mlctl_checkpoint_seconds") == 0.25
        assert total(b, "mlctl_train_grad_norm") == pytest.approx(0.7)
    # Only rank 0 writes the run's metrics.jsonl.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(x)["event"] == "train" for x in lines) == 5


def test_port_in_use_moves_to_the_next_free_one_and_says_so(caplog):
    base = free_port_block(3)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", base + 1))
    blocker.listen()
    e = exporter(None, port=base, local_rank=1)
    try:
        with caplog.at_level(logging.INFO, logger="mlctl.metrics"):
            port = e.start()
        assert port == base + 2
        assert f"port {base + 1} is in use" in caplog.text and str(base + 2) in caplog.text
        e.log_step(step(1))
        assert total(scrape(e.endpoint), "mlctl_train_steps_total") == 1
    finally:
        e.close()
        blocker.close()


def test_disabled_exporter_serves_nothing_but_still_writes_jsonl(tmp_path):
    cfg = MetricsConfig(enabled=False)
    e = MetricsExporter(cfg, run="r", rank=0, node="n", local_rank=0, run_dir=tmp_path)
    assert e.start() is None and e.endpoint is None
    e.log_step(step(1))
    e.close()
    e.close()  # twice is fine
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 1


def test_restart_continues_counters_from_the_checkpoint_totals(caplog):
    e = exporter(None)
    e.restore_totals(steps=40, samples=320, tokens=6400, restarts=2)
    e.log_step(step(41))
    e.set_restarts(3)
    with caplog.at_level(logging.WARNING, logger="mlctl.metrics"):
        e.set_restarts(1)  # counters never go down
    fams = parse_metrics(_exposition(e))
    assert total(fams, "mlctl_train_steps_total") == 41
    assert total(fams, "mlctl_train_samples_total") == 328
    assert total(fams, "mlctl_train_tokens_total") == 6400 + 160
    assert total(fams, "mlctl_restarts_total") == 3
    assert "below the exported 3" in caplog.text


def _exposition(e: MetricsExporter) -> str:
    from prometheus_client import generate_latest

    return generate_latest(e.registry).decode()


def test_throughput_is_a_sliding_window_over_the_clock():
    clock = FakeClock()
    e = exporter(None, clock=clock, window_steps=2)
    rates = []
    for i, (dt, samples) in enumerate([(0, 10), (1.0, 10), (1.0, 30), (2.0, 10), (1.0, 10)], 1):
        clock.t += dt
        e.log_step(step(i, samples=samples, step_seconds=0.5))
        rates.append(total(parse_metrics(_exposition(e)), "mlctl_train_samples_per_second"))
    # step 1: no window yet, its own 10 / 0.5 s; then samples of the last 2 steps over their clock span
    assert rates == [20.0, 10.0, 40 / 2.0, 40 / 3.0, 20 / 3.0]


def test_jsonl_is_buffered_then_flushed_by_time_and_on_close(tmp_path):
    clock = FakeClock()
    e = exporter(tmp_path, clock=clock, flush_seconds=5.0)
    path = tmp_path / "metrics.jsonl"
    e.log_step(step(1))
    assert len(path.read_text().splitlines()) == 1, "the first step is written at once"
    clock.t += 1
    e.log_step(step(2))
    assert len(path.read_text().splitlines()) == 1, "every line flushed: a syscall per step"
    clock.t += 5
    e.log_step(step(3))
    assert len(path.read_text().splitlines()) == 3
    e.log_step(step(4))
    e.log_eval(4, {"de": 0.9})  # evaluations and checkpoints flush at once
    assert len(path.read_text().splitlines()) == 5
    e.log_step(step(5))
    e.close()
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 4, 5]
    assert all("time" in r and "restarts" in r for r in recs)
    assert all("samples_per_second" in r for r in recs if r["event"] == "train")


def test_rank_other_than_zero_writes_no_jsonl(tmp_path):
    e = exporter(tmp_path, rank=1, local_rank=1)
    e.log_step(step(1))
    e.log_eval(1, {"de": 0.1})
    e.close()
    assert not (tmp_path / "metrics.jsonl").exists()


# ---- mlctl report ------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_report_plots_a_real_metrics_jsonl(tmp_path, capsys):
    from launcher.cli import main
    from mlctl.report import load_metrics

    run = tmp_path / "run"
    clock = FakeClock()
    e = exporter(run, clock=clock)
    for i in range(1, 31):
        clock.t += 0.5
        e.log_step(step(i, loss=3.0 / i))
        if i % 10 == 0:
            e.log_checkpoint(0.2, i)
            e.log_eval(i, {"de": i / 40, "fr": i / 50})
    e.close()
    # A restarted worker redoes steps 21..22 after the step-20 checkpoint, appending to the same file.
    e = exporter(run, clock=clock)
    e.restore_totals(20, 160, 3200, 1)
    for i in (21, 22):
        e.log_step(step(i, loss=9.0))
    e.close()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('not json\n{"step": "x"}\n{"event": "train", "step": 31, "loss"\n')

    m = load_metrics(run / "metrics.jsonl")
    assert len(m.skipped_lines) == 3
    assert [r["step"] for r in m.train] == list(range(1, 31))
    assert m.train[20]["loss"] == 9.0, "the redone step's last record wins"
    assert m.eval["de"] == [(10, 0.25), (20, 0.5), (30, 0.75)]

    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "30 steps" in out and "3 malformed line(s) skipped" in out and "de=0.750" in out
    w, h = _png_size(run / "report.png")
    assert w >= 600 and h >= 600
    assert main(["report", str(run), "--out", str(tmp_path / "elsewhere" / "r.png")]) == 0
    assert (tmp_path / "elsewhere" / "r.png").is_file()


def test_report_errors_name_the_file(tmp_path, capsys):
    from launcher.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"event": "eval", "step": 1, "eval": {"de": 0.5}}\n')
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no training steps" in capsys.readouterr().err


# ---- service discovery and the progress line ---------------------------------------------------


def test_service_discovery_file_is_prometheus_file_sd(tmp_path):
    path = tmp_path / "sd" / "prometheus_sd.json"
    write_service_discovery(
        path,
        [
            {"target": "10.0.0.2:9401", "run": "r1", "rank": 1, "node": "b"},
            {"host": "10.0.0.1", "port": 9400, "run": "r1", "rank": 0, "node": "a"},
        ],
    )
    assert json.loads(path.read_text()) == [
        {"targets": ["10.0.0.1:9400"], "labels": {"run": "r1", "rank": "0", "node": "a"}},
        {"targets": ["10.0.0.2:9401"], "labels": {"run": "r1", "rank": "1", "node": "b"}},
    ]
    assert [p.name for p in path.parent.iterdir()] == ["prometheus_sd.json"], "temporary file left behind"
    with pytest.raises(ValueError, match="lacks node"):
        write_service_discovery(path, [{"target": "h:1", "run": "r", "rank": 0}])
    with pytest.raises(ValueError, match="needs 'target'"):
        write_service_discovery(path, [{"run": "r", "rank": 0, "node": "a"}])
    assert len(json.loads(path.read_text())) == 2, "a failed write must leave the old file intact"


def test_publish_writes_run_copy_and_shared_copy(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    paths = publish_service_discovery(run_dir, [{"target": "h:1", "run": "r1", "rank": 0, "node": "a"}])
    assert paths == [run_dir / "prometheus_sd.json", tmp_path / "runs" / "prometheus_sd" / "r1.json"]
    assert paths[0].read_text() == paths[1].read_text()
    retract_service_discovery(run_dir)
    assert not shared_sd_path(run_dir).exists() and paths[0].exists()


def test_progress_line_redraws_in_place_on_a_terminal():
    out = io.StringIO()
    clock = FakeClock(0.0)
    p = ProgressLine(total=100, stream=out, clock=clock, tty=True)
    p.update(step=20, loss=2.5, pairs_per_s=480.4)
    clock.t = 10.0
    p.update(step=40, loss=1.2344, pairs_per_s=512.0)
    p.close()
    text = out.getvalue()
    # one tqdm frame per update (close draws the last one again), then the closing newline; the bar
    # sits between the step count and the figures
    frames = [f.strip() for f in text.split("\r") if f.strip()]
    assert len(set(frames)) == 2 and text.endswith("\n") and text.count("\n") == 1
    last = text.split("\r")[-1].strip()
    assert last.startswith("step 40/100 ") and last.endswith("loss 1.234 | 512 pairs/s | ETA 0:00:30")


def test_progress_line_prints_now_and_then_when_not_a_terminal():
    out = io.StringIO()
    clock = FakeClock(0.0)
    p = ProgressLine(total=10, stream=out, clock=clock, tty=False, every_seconds=30)
    for s in range(1, 10):
        clock.t = s * 10.0
        p.update(step=s, loss=1.0, pairs_per_s=float("nan"))
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # printed at t=10, 40, 70, and the last figures on close
    assert [int(x.split()[1].split("/")[0]) for x in lines] == [1, 4, 7, 9]
    assert lines[0] == "step 1/10 | loss 1.000 | ? pairs/s | ETA ?"
    assert lines[-1].endswith("ETA 0:00:10")


def test_progress_line_eta_from_record_times():
    out = io.StringIO()
    p = ProgressLine(total=50, stream=out, tty=False, every_seconds=0, clock=FakeClock(5.0))
    # Records read in one batch carry their own times: the ETA follows them, not the reading time.
    for s, t in ((10, 1000.0), (20, 1010.0)):
        p.update(step=s, loss=1.0, pairs_per_s=100.0, at=t)
    assert out.getvalue().splitlines()[-1].endswith("ETA 0:00:30")


def test_format_eta():
    assert format_eta(4270.2) == "1:11:10"
    assert format_eta(59.6) == "0:01:00"
    assert format_eta(float("nan")) == "?" and format_eta(-1) == "?"


# ---- the Grafana dashboard ---------------------------------------------------------------------

PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "le",
    "run",
    "rank",
    "node",
    "lang",
    "reason",
    "job",
    # aggregation operators may be followed by `by (...)` rather than `(`
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        if isinstance(q, dict) and "query" in q:
            exprs.append(q["query"])
    return exprs


def referenced_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions (followed by `(`),
    keywords, label names, strings or range durations."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # matchers: label names are not metrics
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        word, rest = m.group(0), expr[m.end() :].lstrip()
        if rest.startswith("(") or word in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_dashboard_queries_name_only_exported_metrics(tmp_path):
    e = exporter(tmp_path)
    e.log_step(step(1))
    e.log_skipped("empty", 1)
    e.log_checkpoint(0.1, 1)
    e.log_eval(1, {"de": 0.5})
    exposed = set(parse_metrics(_exposition(e)))
    e.close()
    exposed.add("up")  # Prometheus' own per-target series
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    used = set().union(*(referenced_metrics(x) for x in exprs))
    assert not used - exposed, f"dashboard queries unknown metrics: {sorted(used - exposed)}"
    # The list of panels: loss, pairs/s, data wait, step time, restarts, eval accuracy.
    for name in (
        "mlctl_train_loss",
        "mlctl_train_samples_per_second",
        "mlctl_data_wait_seconds_sum",
        "mlctl_train_step_seconds_bucket",
        "mlctl_restarts_total",
        "mlctl_eval_retrieval_accuracy",
    ):
        assert name in used, f"no panel shows {name}"


def test_promql_name_extraction():
    assert referenced_metrics(
        'histogram_quantile(0.95, sum by (run, le) (rate(a_bucket{run=~"x"}[1m])))'
    ) == {"a_bucket"}
    assert referenced_metrics("sum(rate(x_sum[5m])) / sum(rate(x_count[5m])) > bool 0") == {
        "x_sum",
        "x_count",
    }
    assert referenced_metrics('max by (run) (y{run=~"$run"}) + count by (run) (up == 1)') == {"y", "up"}
