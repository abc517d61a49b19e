"""What runs in each Ray Train worker: logging set-up, the entry point, and which failures are final.

A failure that retrying cannot fix (another model's checkpoint, a changed recipe, no readable data,
a full disk, a model that does not load) is not raised into Ray Train, which would retry it
``ray.max_failures`` times and print a traceback from every worker each time: the worker writes the
traceback to its log file, tells the control actor in one line, and returns; the driver then ends
the run with that line.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any

from mlctl.config import ConfigError, config_from_dict

log = logging.getLogger(__name__)

# Library loggers whose INFO chatter repeats on every worker and says nothing a user acts on.
QUIET_LOGGERS = ("transformers", "deepspeed", "DeepSpeed", "ray.train", "torch.distributed")


def fatal_reason(error: BaseException) -> str | None:
    """One line saying why ``error`` cannot be fixed by a retry, or None when a retry may help."""
    from mlctl.data.blocks import NoReadableData
    from mlctl.data.shards import ShardRefused
    from mlctl.resume_checks import CheckpointMismatch

    if isinstance(error, (CheckpointMismatch, ShardRefused, NoReadableData, ConfigError)):
        return str(error)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" ({error.filename})" if error.filename else ""
        return f"no space left on the device{where}: free some space or point ray.storage_path elsewhere"
    return None


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch

    from launcher.control import find_control
    from launcher.naming import local_run_dir
    from launcher.reporters import ObjectStoreReporter, RayReporter
    from mlctl.engine import Trainer

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    # With an object store every node works in a folder of its own; otherwise all share the run's.
    object_store = bool(loop_config.get("object_store"))
    run_dir = local_run_dir(loop_config["run_name"]) if object_store else Path(loop_config["run_dir"])
    setup_worker_logging(run_dir, rank)
    cfg = config_from_dict(loop_config["config"])
    if object_store:
        # The driver keeps metrics.jsonl on its node from rank 0's records (launcher.monitoring):
        # this node's run folder is its own, and may be the driver's.
        cfg.metrics.jsonl = False
    node = f"node{ctx.get_node_rank()}-{ray.get_runtime_context().get_node_id()[:6]}"
    if isinstance(cfg.ray.num_workers, list) and rank == 0:
        # Say how many workers this attempt got, so a shrunk (or regrown) run is visible in the log.
        log.info(
            "[mlctl] elastic: training on %d worker(s) (ray.num_workers=%s)",
            ctx.get_world_size(),
            cfg.ray.num_workers,
            extra={"notice": True},  # on the driver's console (launcher.monitoring)
        )
    control = find_control(loop_config["run_name"])
    reporter = (
        ObjectStoreReporter(control, rank, ctx.get_local_rank(), run_dir)
        if object_store
        else RayReporter(control, rank)
    )
    trainer = Trainer(
        cfg,
        run_dir,
        rank=rank,
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        node=node,
        run_name=loop_config["run_name"],
        reporter=reporter,
        # Ray knows which GPU it gave this worker; its local rank need not index it.
        device=ray.train.torch.get_device(),
    )
    try:
        trainer.setup()
        trainer.fit()
    except Exception as e:
        reason = fatal_reason(e)
        if reason is None:
            raise
        log.info("final failure, not retried: %s", reason, exc_info=True)  # the log file keeps the trace
        reporter.fatal(rank, reason)


def quiet_ray_logs() -> None:
    """Runs in every Ray worker process at start-up (runtime_env ``worker_process_setup_hook``).

    Ray Train's placement-group cleaner polls the state API, which needs the dashboard; without it
    (an embedded Ray on a machine without ``ray[default]``) it warns every second. Only that logger is
    raised to ERROR. Ray Train's INFO lines (resource requests, worker group start) go too: the
    driver prints the endpoints and, when workers do not start, what the run is waiting for."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR
    )
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # NOTE: without an address the cleaner's state-API client looks for Ray instances on the machine
    # and dies with a traceback when it finds more than one (another user's cluster); point it at
    # the one this process belongs to.
    try:
        import ray

        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    except Exception:  # not connected yet or an older Ray: the cleaner keeps its own lookup
        pass


def setup_worker_logging(run_dir: str | Path, rank: int) -> Path:
    """Logging of one training worker: everything at INFO into ``RUN_DIR/logs/rankNNNNN.log``; on
    the console (which Ray forwards to the driver) only warnings and notices of rank 0 and errors of
    any rank.

    NOTE: what is silenced on the console and why. The driver already shows progress, endpoints and
    evaluation (from the control actor), so the workers' INFO lines would repeat them once per rank.
    transformers' weight-loading report and progress bar (the MLM head is fresh by design, and
    mlctl.model logs which weights that is), DeepSpeed's op-build notice and Python warnings from
    libraries (e.g. torch deprecations inside DeepSpeed) are known and harmless: they go to the log
    file only. Returns the log file's path.
    """
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
