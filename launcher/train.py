"""`mlctl train`: resolve the config, then launch (or resume) the run under Ray."""

from __future__ import annotations

import argparse
import sys

from mlctl.config import load_config
from mlctl.stock import config_paths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        action="append",
        help="YAML config, or a stock config's name (paper, proof, demo, cluster, ablation/ml-ctl, deepspeed/zero2...); repeat to layer presets (defaults < YAML files in order < overrides)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. loss.temperature=0.05"
    )
    p.add_argument("--address", help="join this Ray cluster (default: start an embedded local Ray)")
    p.add_argument("--num-workers", type=int, help="training workers (ranks)")
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--storage", help="storage path; the run folder is STORAGE/NAME (shared by all nodes)")
    p.add_argument("--name", help="run name (default: derived from the config, so a re-run resumes)")
    p.add_argument(
        "--resume-with-changes",
        action="store_true",
        help="resume even though the recipe or the shards differ from the checkpoint's (listed on refusal)",
    )


def resolve(args: argparse.Namespace):
    overrides = list(args.overrides or [])
    for flag, key in (
        ("address", "ray.address"),
        ("num_workers", "ray.num_workers"),
        ("gpus_per_worker", "ray.gpus_per_worker"),
        ("cpus_per_worker", "ray.cpus_per_worker"),
        ("storage", "ray.storage_path"),
        ("name", "ray.name"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}" if not isinstance(value, str) else f"{key}={_quote(value)}")
    if getattr(args, "resume_with_changes", False):
        overrides.append("checkpoint.resume_with_changes=true")
    return load_config(config_paths(args.config), overrides)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def run(args: argparse.Namespace) -> int:
    from launcher.ray_train import Stopped, launch

    cfg = resolve(args)
    try:
        run_dir = launch(cfg)
    except RuntimeError as e:
        print(f"mlctl train: {e}", file=sys.stderr)
        return 1
    except Stopped as e:  # launch() said where the run resumes from
        return 128 + e.signum
    print(f"[mlctl] done: {run_dir}")
    return 0
