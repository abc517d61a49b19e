"""`mlctl stop`: ask trainings running on a Ray cluster to stop after their current step and save,
as a signal to their driver does. For a node about to go away (the KubeRay preStop hook in
cluster/kuberay-rayjob.yaml), a scheduler's script, or by hand."""

from __future__ import annotations

import argparse
import logging
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="the run's name (as `mlctl train` printed it)")
    p.add_argument("--all", action="store_true", help="every run training on the cluster")
    p.add_argument("--address", default="auto", help="the Ray cluster (default: auto, this node's)")
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for each run to have saved (or ended) before returning",
    )


def run(args: argparse.Namespace) -> int:
    import ray

    from launcher.control import find_control, list_runs

    if not args.name and not args.all:
        print("mlctl stop: name a run, or --all", file=sys.stderr)
        return 2
    ray.init(address=args.address, logging_level=logging.ERROR, log_to_driver=False)
    names = list_runs() if args.all else [args.name]
    if not names:
        print("[mlctl] stop: no run is training on this cluster")
        return 0
    asked = {}
    for name in names:
        control = find_control(name)
        if control is None:
            print(
                f"mlctl stop: no run {name!r} is training on this cluster (running: {list_runs()})",
                file=sys.stderr,
            )
            return 1
        before = ray.get(control.status.remote())["saved"]
        ray.get(control.request_stop.remote("mlctl stop"))
        asked[name] = (control, before)
        print(f"[mlctl] stop: asked run {name} to stop after its current step and save", flush=True)
    deadline = time.monotonic() + args.wait
    while args.wait and asked and time.monotonic() < deadline:
        for name, (control, before) in list(asked.items()):
            try:
                saved = ray.get(control.status.remote(), timeout=10)["saved"]
            except Exception:  # the driver ended, and its actor with it
                saved = "ended"
            if saved != before:
                print(f"[mlctl] stop: run {name} saved ({saved})", flush=True)
                del asked[name]
        time.sleep(0.5)
    if asked:
        if args.wait:
            print(f"[mlctl] stop: not saved within {args.wait:g} s: {', '.join(asked)}", flush=True)
        return 1 if args.wait else 0
    return 0
