"""How long a stop takes: SIGTERM to `mlctl train` -> the run saves at the step it reached -> exit 143.

What a scheduler's grace period must cover (Slurm's --signal lead time, Kubernetes'
terminationGracePeriodSeconds). The run is the demo's recipe on the packaged encoder (MiniLM,
22.7M parameters), 2 CPU workers, ZeRO-1, on the Django catalogs `make demo` prepares; steps are
timed from its metrics.jsonl. Printed: the stop latency (signal -> exit), the save inside it (the
checkpoint record's seconds), the checkpoint's size, and the stop latency as a ratio of the
baseline measured in the same run, one median step + one save (what a stop must at least wait for).

    python bench/stop_save.py [--rounds 3] [--work demo_data]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def shards(work: Path) -> Path:
    """The demo's shards (prepared once, as `make demo` does)."""
    out = work / "shards"
    if (out / "manifest.json").is_file():
        return out
    sys.path.insert(0, str(ROOT))
    from launcher.demo import build_demo_inputs, prepare_shards
    from mlctl.config import load_config

    cfg = load_config(str(ROOT / "configs" / "demo.yaml"))
    train, dicts, _ = build_demo_inputs(work)
    return prepare_shards(cfg, work, train, dicts)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def one_stop(data: Path, storage: Path, name: str, steps_before: int) -> dict:
    cmd = [
        sys.executable, "-m", "launcher.cli", "train", "-c", str(ROOT / "configs" / "demo.yaml"),
        f"data.shards={data}", f"ray.storage_path={storage}", f"ray.name={name}",
        "train.max_steps=10000", "checkpoint.every_steps=0", "eval.every_steps=0", "metrics.port=19900",
    ]  # fmt: skip
    log = storage / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    run_dir = storage / name
    while sum(r.get("event") == "train" for r in records(run_dir)) < steps_before:
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before step {steps_before}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=600)
    latency = time.perf_counter() - t0
    if code != 143:
        raise SystemExit(f"exit {code}, expected 143:\n{log.read_text()[-3000:]}")
    recs = records(run_dir)
    steps = [r["step_seconds"] for r in recs if r.get("event") == "train"]
    save = [r for r in recs if r.get("event") == "checkpoint"][-1]
    folder = run_dir / "checkpoints" / f"step_{save['step']:08d}"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {
        "latency": latency,
        "save": save["checkpoint_seconds"],
        "step": statistics.median(steps),
        "bytes": size,
        "stopped_at": save["step"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps-before", type=int, default=5, help="steps trained before the signal")
    ap.add_argument("--work", default=str(ROOT / "demo_data"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = shards(Path(args.work))
    rows = []
    with tempfile.TemporaryDirectory(prefix="stop-save-") as tmp:
        for i in range(args.rounds):
            r = one_stop(data, Path(tmp), f"stop{i}", args.steps_before)
            baseline = r["step"] + r["save"]
            rows.append(r)
            print(
                f"round {i}: SIGTERM -> exit 143 in {r['latency']:.1f} s (stopped at step {r['stopped_at']}); "
                f"save {r['save']:.2f} s of {r['bytes'] / 2**20:.0f} MiB; median step {r['step']:.2f} s; "
                f"latency / (step + save) = {r['latency'] / baseline:.2f}x",
                flush=True,
            )
    lat = statistics.median(r["latency"] for r in rows)
    save = statistics.median(r["save"] for r in rows)
    base = statistics.median(r["step"] + r["save"] for r in rows)
    print(f"median: stop {lat:.1f} s, save {save:.2f} s, step + save {base:.2f} s -> {lat / base:.2f}x")


if __name__ == "__main__":
    main()
