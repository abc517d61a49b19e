"""A real Prometheus server, started on loopback with the shipped config, finds two workers through
the run's service-discovery file, scrapes them, and answers every query of the Grafana dashboard.

Needs the `prometheus` binary (Debian/Ubuntu: `apt-get install -y prometheus`); skips without it.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from ranks import free_port

from launcher.monitoring import publish_service_discovery
from mlctl.config import MetricsConfig
from mlctl.metrics import MetricsExporter, StepMetrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "cluster" / "monitoring" / "prometheus.yml"
DASHBOARD = ROOT / "cluster" / "monitoring" / "grafana-dashboard.json"
WAIT_S = 60


def scrape_config_for(storage: Path) -> dict:
    """The shipped config, with the file_sd pattern pointed at this test's storage folder and the
    intervals cut to a second so the test is quick."""
    cfg = yaml.safe_load(SHIPPED.read_text())
    cfg["global"]["scrape_interval"] = "1s"
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert {"mlctl", "ray"} <= set(jobs), "prometheus.yml must scrape the workers and Ray"
    job = jobs["mlctl"]
    job["scrape_interval"] = "1s"
    job["scrape_timeout"] = "1s"
    (sd,) = job["file_sd_configs"]
    shipped_pattern = Path(sd["files"][0])
    assert shipped_pattern.parent.name == "prometheus_sd", shipped_pattern
    sd["files"] = [str(storage / "prometheus_sd" / shipped_pattern.name)]
    sd["refresh_interval"] = "1s"
    return cfg


def api(base: str, path: str, **params) -> dict:
    url = f"{base}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def query(base: str, expr: str) -> list[dict]:
    out = api(base, "query", query=expr)
    assert out["status"] == "success", out
    return out["data"]["result"]


def poll(fn, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout}s; last answer: {last!r}")


def test_prometheus_scrapes_workers_found_through_service_discovery(tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the `prometheus` binary is not on PATH (Debian/Ubuntu: apt-get install -y prometheus)")

    storage = tmp_path / "runs"
    run_dir = storage / "promtest"
    exps = [
        MetricsExporter(
            MetricsConfig(port=free_port(), bind="127.0.0.1"),
            run="promtest",
            rank=r,
            node=f"node{r}",
            local_rank=0,
            run_dir=run_dir,
        )
        for r in (0, 1)
    ]
    stop = threading.Event()
    proc = log = None
    try:
        for e in exps:
            e.start()
            e.log_eval(0, {"de": 0.5})
            e.log_skipped("too_long", 1)
            e.log_checkpoint(0.1, 0)

        # Workers keep stepping while Prometheus scrapes, as in a run.
        def train():
            i = 0
            while not stop.wait(0.1):
                i += 1
                for e in exps:
                    e.log_step(
                        StepMetrics(
                            step=i,
                            loss=2.0 / i,
                            contrastive_loss=1.5 / i,
                            mlm_loss=0.5,
                            samples=8,
                            tokens=160,
                            step_seconds=0.1,
                            data_wait_seconds=0.002,
                            lr=1e-4,
                            grad_norm=1.0,
                            global_batch_size=8,
                            inbatch_accuracy=0.5,
                        )
                    )

        trainer = threading.Thread(target=train, daemon=True)
        trainer.start()
        publish_service_discovery(
            run_dir,
            [
                {"target": f"127.0.0.1:{e.port}", "run": "promtest", "rank": e.rank, "node": e.node}
                for e in exps
            ],
        )

        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config_for(storage), sort_keys=False))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def series():
            if proc.poll() is not None:
                raise AssertionError(
                    f"prometheus exited ({proc.returncode}): "
                    + (tmp_path / "prometheus.log").read_text()[-2000:]
                )
            res = query(base, 'mlctl_train_steps_total{run="promtest"}')
            return res if len(res) == 2 else None

        first = poll(series, "both workers' mlctl_train_steps_total series")
        assert sorted(r["metric"]["rank"] for r in first) == ["0", "1"]
        assert {r["metric"]["node"] for r in first} == {"node0", "node1"}
        assert all(r["metric"]["job"] == "mlctl" for r in first)
        steps0 = {r["metric"]["rank"]: float(r["value"][1]) for r in first}

        def grown():
            res = query(base, 'mlctl_train_steps_total{run="promtest"}')
            now = {r["metric"]["rank"]: float(r["value"][1]) for r in res}
            return now if len(now) == 2 and all(now[k] > steps0[k] for k in steps0) else None

        poll(grown, "the step counters to grow between scrapes")
        for r in query(base, 'mlctl_train_loss{run="promtest"}'):
            assert math.isfinite(float(r["value"][1]))
        targets = api(base, "targets")["data"]["activeTargets"]
        mine = [t for t in targets if t["labels"].get("run") == "promtest"]
        assert len(mine) == 2 and all(t["health"] == "up" for t in mine), mine

        # Every dashboard query is valid PromQL for this Prometheus, and the instant ones find data.
        dash = json.loads(DASHBOARD.read_text())
        empty = []
        for panel in dash["panels"]:
            for t in panel["targets"]:
                expr = t["expr"].replace("$run", ".*")
                if not query(base, expr) and "[" not in expr:
                    empty.append(expr)
        assert not empty, f"dashboard queries without data: {empty}"
    finally:
        stop.set()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log is not None:
            log.close()
        for e in exps:
            e.close()
