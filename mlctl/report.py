"""``mlctl report RUN_DIR``: draw a run's ``metrics.jsonl`` (loss, throughput, data-wait share, eval
accuracy per language) to a PNG."""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class RunMetrics:
    """A run's metrics.jsonl, one record per step (a step trained again after a restart keeps its
    last record, which is the one on the surviving timeline)."""

    train: list[dict[str, Any]] = field(default_factory=list)  # sorted by step
    eval: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # lang -> [(step, accuracy)]
    checkpoints: list[tuple[int, float]] = field(default_factory=list)  # (step, seconds)
    skipped_lines: list[int] = field(default_factory=list)  # 1-based numbers of malformed lines


def _number(rec: dict[str, Any], key: str) -> bool:
    return isinstance(rec.get(key), (int, float)) and not isinstance(rec.get(key), bool)


def load_metrics(path: str | Path) -> RunMetrics:
    """Read ``metrics.jsonl``; malformed lines are skipped, counted and logged with their numbers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (the run wrote no metrics; is metrics.jsonl off?)")
    out = RunMetrics()
    train: dict[int, dict[str, Any]] = {}
    evals: dict[str, dict[int, float]] = {}
    ckpts: dict[int, float] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                out.skipped_lines.append(lineno)
                continue
            if not isinstance(rec, dict) or not _number(rec, "step"):
                out.skipped_lines.append(lineno)
                continue
            step = int(rec["step"])
            event = rec.get("event", "train" if "loss" in rec else "")
            if event == "train" and _number(rec, "loss"):
                train[step] = rec
            elif event == "eval" and isinstance(rec.get("eval"), dict):
                for lang, value in rec["eval"].items():
                    if isinstance(value, (int, float)):
                        evals.setdefault(str(lang), {})[step] = float(value)
            elif event == "checkpoint" and _number(rec, "checkpoint_seconds"):
                ckpts[step] = float(rec["checkpoint_seconds"])
            else:
                out.skipped_lines.append(lineno)
    if out.skipped_lines:
        shown = ", ".join(str(n) for n in out.skipped_lines[:10])
        more = f" and {len(out.skipped_lines) - 10} more" if len(out.skipped_lines) > 10 else ""
        log.warning("%s: skipped %d malformed line(s): %s%s", path, len(out.skipped_lines), shown, more)
    out.train = [train[s] for s in sorted(train)]
    out.eval = {lang: sorted(points.items()) for lang, points in sorted(evals.items())}
    out.checkpoints = sorted(ckpts.items())
    return out


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def data_wait_share(records: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """Per step, the share of the step's wall time spent blocked on the data loader (0-1).

    Steps without both times, or with a zero step time, are left out."""
    xs, ys = [], []
    for r in records:
        wait, total = r.get("data_wait_seconds"), r.get("step_seconds")
        if (
            isinstance(wait, (int, float))
            and isinstance(total, (int, float))
            and math.isfinite(wait)
            and math.isfinite(total)
            and total > 0
        ):
            xs.append(int(r["step"]))
            ys.append(min(1.0, max(0.0, float(wait) / float(total))))
    return xs, ys


def plot_report(metrics: RunMetrics, out: str | Path, title: str = "") -> Path:
    """Four panels against step: losses (total, contrastive, MLM), pairs/s, the share of each step
    spent waiting for data, and eval retrieval accuracy per language."""
    from mlctl.extras import require

    matplotlib = require("matplotlib", "mlctl report")
    matplotlib.use("Agg")  # no display needed, and no GUI toolkit pulled in
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_rate, ax_wait, ax_eval) = plt.subplots(4, 1, figsize=(8, 11), sharex=True)
    for key, label in (("loss", "total"), ("contrastive_loss", "contrastive"), ("mlm_loss", "MLM")):
        xs, ys = _series(metrics.train, key)
        if xs:
            ax_loss.plot(xs, ys, label=label)
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right")
    ax_loss.grid(alpha=0.3)

    xs, ys = _series(metrics.train, "samples_per_second")
    ax_rate.plot(xs, ys, color="tab:green")
    ax_rate.set_ylabel("pairs/s")
    ax_rate.grid(alpha=0.3)

    xs, ys = data_wait_share(metrics.train)
    if xs:
        ax_wait.plot(xs, [100 * y for y in ys], color="tab:orange", label="per step")
        mean = 100 * sum(ys) / len(ys)
        ax_wait.axhline(mean, color="tab:gray", linestyle="--", label=f"mean {mean:.1f}%")
        ax_wait.legend(loc="upper right")
    else:
        ax_wait.text(
            0.5, 0.5, "no data-wait times in this run", ha="center", va="center", transform=ax_wait.transAxes
        )
    ax_wait.set_ylabel("data wait, % of step")
    ax_wait.set_ylim(bottom=0)
    ax_wait.grid(alpha=0.3)

    for lang, points in metrics.eval.items():
        ax_eval.plot([s for s, _ in points], [v for _, v in points], marker="o", label=lang)
    if metrics.eval:
        ax_eval.legend(loc="lower right")
        ax_eval.set_ylim(0, 1.02)
    else:
        ax_eval.text(
            0.5, 0.5, "no evaluation in this run", ha="center", va="center", transform=ax_eval.transAxes
        )
    ax_eval.set_ylabel("dev retrieval accuracy\n(xx->en) per language")
    ax_eval.set_xlabel("step")
    ax_eval.grid(alpha=0.3)

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder holding metrics.jsonl")
    parser.add_argument(
        "--out", metavar="PNG", default=None, help="output image (default: RUN_DIR/report.png)"
    )


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    metrics = load_metrics(run_dir / "metrics.jsonl")
    if not metrics.train:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no training steps to plot")
    out = plot_report(metrics, args.out or run_dir / "report.png", title=run_dir.resolve().name)
    last = metrics.train[-1]
    evals = " ".join(f"{lang}={pts[-1][1]:.3f}" for lang, pts in metrics.eval.items())
    _, shares = data_wait_share(metrics.train)
    wait = f", data wait {100 * sum(shares) / len(shares):.1f}% of step time" if shares else ""
    print(
        f"{out}: {len(metrics.train)} steps (last {last['step']}, loss {last['loss']:.4f})"
        + wait
        + (f", eval {evals}" if evals else "")
        + (f", {len(metrics.skipped_lines)} malformed line(s) skipped" if metrics.skipped_lines else "")
    )
    return 0
