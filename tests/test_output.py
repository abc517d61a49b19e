"""What the user sees: the driver's progress bar and messages, quiet workers, the report's panels."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.monitoring import ProgressLine
from mlctl.config import Config

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_terminal_bar_is_tqdm_with_loss_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    p = ProgressLine(total=100, stream=out, clock=clock, tty=True)
    p.update(step=20, loss=2.5, pairs_per_s=480.4)
    clock.t = 10.0
    p.write("[mlctl] eval step 20: de 0.500")
    p.update(step=40, loss=1.2344, pairs_per_s=512.0)
    p.close()
    text = out.getvalue()
    frames = [f for f in text.replace("\n", "\r").split("\r") if f.strip()]
    last = frames[-1]
    assert last.startswith("step 40/100 ") and last.endswith("loss 1.234 | 512 pairs/s | ETA 0:00:30")
    assert "#" in last, "tqdm draws a bar between the step count and the figures"
    # the message sits on its own line and the bar is drawn again after it
    assert "[mlctl] eval step 20: de 0.500\n" in text
    assert text.index("eval step 20") < text.index("step 40/100")
    assert text.endswith("\n") and "step 0/" not in text, "no empty bar before the first step"


def test_plain_lines_when_not_a_terminal():
    out, clock = io.StringIO(), Clock()
    p = ProgressLine(total=10, stream=out, clock=clock, tty=False, every_seconds=30)
    p.write("[mlctl] rank 0 on n: metrics at http://h:1/metrics")
    for s in range(1, 11):
        clock.t = s * 10.0
        p.update(step=s, loss=1.0, pairs_per_s=8.0)
    p.close()
    text = out.getvalue()
    assert "\r" not in text and "#" not in text
    lines = text.splitlines()
    assert lines[0].startswith("[mlctl] rank 0")
    assert lines[1:] == [
        "step 1/10 | loss 1.000 | 8 pairs/s | ETA ?",
        "step 4/10 | loss 1.000 | 8 pairs/s | ETA 0:01:00",
        "step 7/10 | loss 1.000 | 8 pairs/s | ETA 0:00:30",
        "step 10/10 | loss 1.000 | 8 pairs/s | ETA 0:00:00",
    ]


def _cfg(num_workers: int = 2, steps: int = 20) -> Config:
    cfg = Config()
    cfg.train.max_steps = steps
    cfg.ray.num_workers = num_workers
    cfg.ray.cpus_per_worker = 1
    return cfg


def test_watcher_prints_endpoints_progress_eval_and_skips_from_the_control(tmp_path):
    """The driver's view comes from the run's control (launcher/control.py; here the plain class,
    what the Ray actor wraps)."""
    from launcher.control import RunControl
    from launcher.monitoring import RunWatcher

    run = tmp_path / "run"
    control = RunControl("run")
    control.put_endpoint(
        0,
        {"rank": 0, "node": "n0", "host": "127.0.0.1", "port": 9400, "url": "http://127.0.0.1:9400/metrics"},
    )
    records = [
        {"event": "train", "step": s, "loss": 3.0 - 0.1 * s, "samples_per_second": 16.0, "time": 100.0 + s}
        for s in range(1, 11)
    ]
    records.insert(5, {"event": "eval", "step": 5, "eval": {"de": 0.5, "fr": 0.25}})
    control.put_records(records[:6])
    out = io.StringIO()
    w = RunWatcher(run, _cfg(steps=20), control.snapshot, stream=out, write_jsonl=True)
    w.progress.every_seconds = 0
    w.poll()
    control.put_records(records[6:])
    control.put_skipped(1, {"corrupt_shard": 2})
    w.poll()
    w.poll()  # nothing new: nothing printed twice
    w.check_waiting()  # an endpoint is there: nothing to say
    w.progress.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[mlctl] rank 0 on n0: metrics at http://127.0.0.1:9400/metrics"
    assert "[mlctl] eval step 5: de 0.500 fr 0.250" in lines
    progress = [line for line in lines if line.startswith("step ")]
    assert progress[-1] == "step 10/20 | loss 2.000 | 16 pairs/s | ETA 0:00:10"  # 10 steps left at 1 s each
    skips = [line for line in lines if "data skipped" in line]
    assert skips == [
        f"[mlctl] data skipped on rank 1: corrupt_shard +2 (details in {run}/logs/rank00001.log)"
    ]
    assert w.skipped_total() == {"corrupt_shard": 2}
    assert json.loads((run / "prometheus_sd.json").read_text())[0]["targets"] == ["127.0.0.1:9400"]
    # the driver keeps rank 0's records on its own node, each once
    assert [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] == records
    assert control.records == [] and w.next == len(records)  # read records leave the actor


def test_watcher_hands_a_fatal_error_over_once(tmp_path):
    from launcher.control import RunControl
    from launcher.monitoring import RunWatcher

    control = RunControl("run")
    seen: list[str] = []
    w = RunWatcher(tmp_path, _cfg(), control.snapshot, stream=io.StringIO(), on_fatal=seen.append)
    w.poll()
    control.put_fatal(1, "cannot resume from X: model differs")
    control.put_fatal(0, "a second one is not news")
    w.poll()
    w.poll()
    assert seen == ["rank 1: cannot resume from X: model differs"]


def test_watcher_says_what_resources_a_waiting_run_lacks(tmp_path):
    from launcher.control import RunControl
    from launcher.monitoring import RunWatcher

    feed = RunControl("run").snapshot
    out = io.StringIO()
    w = RunWatcher(
        tmp_path, _cfg(num_workers=4), feed, stream=out, wait_warning=0.0, resources=lambda: {"CPU": 2.0}
    )
    w.check_waiting()
    w.check_waiting()  # said once
    msg = out.getvalue()
    assert msg.count("\n") == 1
    assert "4 workers x 1 CPU" in msg and "has 2 CPU" in msg and "ray.num_workers" in msg

    out = io.StringIO()
    w = RunWatcher(
        tmp_path, _cfg(num_workers=2), feed, stream=out, wait_warning=0.0, resources=lambda: {"CPU": 8.0}
    )
    w.check_waiting()
    assert out.getvalue() == "", "enough CPUs: a slow start is not worth a message"


def test_embedded_ray_gets_a_token_in_the_environment_not_a_file(monkeypatch):
    from launcher.cluster import embedded_ray_auth as _embedded_ray_auth

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    _embedded_ray_auth()
    assert os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) == 64
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    _embedded_ray_auth()
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN" not in os.environ


WORKER_SCRIPT = """
import logging, sys, warnings
from launcher.worker import setup_worker_logging
log_file = setup_worker_logging(sys.argv[1], int(sys.argv[2]))
logging.getLogger("mlctl.engine").info("step 10/80 loss 1.0")
logging.getLogger("mlctl.model").warning("fresh MLM head")
logging.getLogger("mlctl.engine").error("a real problem")
logging.getLogger("transformers.modeling_utils").warning("LOAD REPORT")
warnings.warn("deprecated collective", FutureWarning)
print("DeepSpeed op built successfully")
"""


@pytest.mark.parametrize("rank", [0, 1])
def test_worker_console_shows_only_what_matters(tmp_path, rank):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", WORKER_SCRIPT, str(tmp_path), str(rank)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    console = proc.stdout + proc.stderr
    assert f"rank {rank} ERROR mlctl.engine: a real problem" in console
    assert ("fresh MLM head" in console) == (rank == 0), "warnings from rank 0 only"
    for quiet in ("step 10/80", "LOAD REPORT", "deprecated collective", "built successfully"):
        assert quiet not in console
    log = (tmp_path / "logs" / f"rank{rank:05d}.log").read_text()
    for everything in (
        "step 10/80",
        "fresh MLM head",
        "a real problem",
        "deprecated collective",
        "built successfully",
    ):
        assert everything in log


def test_report_plots_data_wait_share_and_eval_per_language(tmp_path, capsys):
    from launcher.cli import main
    from mlctl.report import data_wait_share

    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"event": "train", "step": s, "loss": 2.0, "step_seconds": 0.5, "data_wait_seconds": 0.05 * (s % 3)}
        for s in range(1, 13)
    ]
    lines.append({"event": "train", "step": 13, "loss": 2.0, "step_seconds": 0.0, "data_wait_seconds": 0.1})
    lines += [{"event": "eval", "step": s, "eval": {"de": s / 20, "es": s / 30}} for s in (6, 12)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    xs, ys = data_wait_share([r for r in lines if r["event"] == "train"])
    assert xs == list(range(1, 13)), "a zero step time has no share"
    assert ys[:3] == pytest.approx([0.1, 0.2, 0.0])
    assert main(["report", str(run), "--out", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "data wait 10.0% of step time" in out and "de=0.600" in out and "es=0.400" in out
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
