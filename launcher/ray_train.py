"""Ray side of training: start or join Ray, build the TorchTrainer (Ray Train V2), name the run,
apply the failure policy, count failures, and watch the run from the driver.

Checkpoints live in the run folder (``RUN/checkpoints``, written and found by the workers through
:mod:`mlctl.checkpoint`); a restarted worker group, or a re-run of the same command, resumes from
the newest complete one there.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlctl.config import Config, config_from_dict
from mlctl.engine import Reporter

log = logging.getLogger(__name__)

# Variables every worker needs, whatever the cluster's defaults.
WORKER_ENV = (
    "DS_ACCELERATOR",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "OMP_NUM_THREADS",
)


# What identifies a run: the keys that shape the model and its training trajectory. Everything else
# (train.max_steps, eval/log/checkpoint cadence, metrics, where Ray runs, failure budget, resources
# per worker) can change between two invocations of the same run: raising max_steps extends it.
# NOTE: a whole section counts, minus the listed keys, so a key added to these sections later
# shapes the name unless it is listed here.
RUN_IDENTITY_SECTIONS = ("model", "loss", "data", "train", "deepspeed")
RUN_IDENTITY_IGNORED = {
    "data": ("prepare",),  # what `mlctl prepare` reads; training sees only the shards
    "train": ("max_steps", "log_every", "log_pair_ids"),
}


def run_identity(cfg: Config) -> dict[str, Any]:
    """The config keys the run name is derived from (see ``RUN_IDENTITY_SECTIONS``); plus
    ``ray.num_workers``, which sets the global batch and the data split."""
    d = cfg.to_dict()
    out: dict[str, Any] = {}
    for section in RUN_IDENTITY_SECTIONS:
        out[section] = {k: v for k, v in d[section].items() if k not in RUN_IDENTITY_IGNORED.get(section, ())}
    out["ray"] = {"num_workers": d["ray"]["num_workers"]}
    return out


def run_name(cfg: Config) -> str:
    """``ray.name``, or derived from :func:`run_identity`, so re-running a command (after the
    driver died, or with more steps or another eval/log/checkpoint cadence) resumes the same run."""
    if cfg.ray.name:
        return cfg.ray.name
    import hashlib

    digest = hashlib.sha256(json.dumps(run_identity(cfg), sort_keys=True).encode()).hexdigest()[:10]
    return f"mlctl-{digest}"


def is_object_store(storage_path: str) -> bool:
    """``s3://...``, ``gs://...`` and other URIs: checkpoints go through Ray's persistence."""
    return "://" in storage_path


def run_dir_of(cfg: Config) -> Path:
    """The run folder: under the storage path, or, when that is an object store, a local working
    folder (metrics.jsonl, endpoints, attempts, checkpoints staged before upload) in the temp dir."""
    if is_object_store(cfg.ray.storage_path):
        return Path(tempfile.gettempdir()) / "mlctl-runs" / run_name(cfg)
    return Path(cfg.ray.storage_path).expanduser().resolve() / run_name(cfg)


class RayReporter(Reporter):
    """Reports each published checkpoint's step and figures to Ray (``ray.train.report``).

    NOTE: no checkpoint goes with it: the run folder is the one record of the latest checkpoint
    (mlctl.checkpoint finds the newest complete one). Ray's registry used to hold a pointer too; it
    is written asynchronously and could lag the folder by one save, so two records had to be
    reconciled on every resume."""

    def checkpoint(self, path: Path, step: int, metrics: dict[str, float]) -> None:
        import ray.train

        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def _rank_of_file(name: str) -> int:
    """The rank that wrote a checkpoint file: DeepSpeed's ``zero_pp_rank_R_...`` shards and
    ``data_state_rankR.json`` are per rank; the rest (model states without ZeRO-3, meta.json,
    config.yaml) is rank 0's."""
    m = re.search(r"zero_pp_rank_(\d+)_", name) or re.fullmatch(r"data_state_rank(\d+)\.json", name)
    return int(m.group(1)) if m else 0


class ObjectStoreReporter(Reporter):
    """Checkpoints without a shared filesystem: every rank hands its own files of each published
    checkpoint to Ray (``ray.train.report(checkpoint=...)``), which uploads them into one folder
    under the storage URI and, on a restart or a re-run with the same name, hands the newest one
    back; a worker downloads it and resumes from it. Ray's registry is then the one record of the
    latest checkpoint (the local run folder is only the staging area)."""

    authoritative = True

    def __init__(self, rank: int, run_dir: Path):
        self.rank, self.run_dir = rank, Path(run_dir)

    def checkpoint(self, path: Path, step: int, metrics: dict[str, float]) -> None:
        import ray.train

        from mlctl.checkpoint import TMP_PREFIX

        # Rank 0 renamed the folder on its own node; other nodes still hold it under the temp name.
        src = path if path.is_dir() else path.with_name(TMP_PREFIX + path.name)
        stage = Path(tempfile.mkdtemp(prefix=f".upload-rank{self.rank:05d}-", dir=self.run_dir))
        try:
            for f in sorted(src.rglob("*")):
                if f.is_file() and _rank_of_file(f.name) == self.rank:
                    dest = stage / f.relative_to(src)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(f, dest)  # no copy of the bytes on disk before the upload
                    except OSError:
                        shutil.copy2(f, dest)
            ray.train.report(
                {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                checkpoint=ray.train.Checkpoint.from_directory(str(stage)),
                checkpoint_dir_name=path.name,
            )
            # NOTE: the controller registers reports when it next polls the workers; a worker killed
            # before that would take the registration with it and the restart would start over.
            # Waiting for the commit makes "saved" mean "Ray will hand it back".
            ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
            )
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def restored_from(self) -> Path | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        dest = self.run_dir / "restored" / f"rank{self.rank:05d}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        ckpt.to_directory(str(dest))
        log.info("downloaded checkpoint %s to %s", ckpt.path, dest)
        return dest


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


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch

    from launcher.monitoring import setup_worker_logging
    from mlctl.engine import Trainer

    ctx = ray.train.get_context()
    setup_worker_logging(loop_config["run_dir"], ctx.get_world_rank())
    cfg = config_from_dict(loop_config["config"])
    node = f"node{ctx.get_node_rank()}-{ray.get_runtime_context().get_node_id()[:6]}"
    if isinstance(cfg.ray.num_workers, list) and ctx.get_world_rank() == 0:
        # Say how many workers this attempt got, so a shrunk (or regrown) run is visible in the log.
        log.info(
            "[mlctl] elastic: training on %d worker(s) (ray.num_workers=%s)",
            ctx.get_world_size(),
            cfg.ray.num_workers,
            extra={"notice": True},  # on the driver's console (launcher.monitoring)
        )
    trainer = Trainer(
        cfg,
        loop_config["run_dir"],
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        node=node,
        run_name=loop_config["run_name"],
        reporter=(
            ObjectStoreReporter(ctx.get_world_rank(), Path(loop_config["run_dir"]))
            if loop_config.get("object_store")
            else RayReporter()
        ),
        # Ray knows which GPU it gave this worker; its local rank need not index it.
        device=ray.train.torch.get_device(),
    )
    trainer.setup()
    trainer.fit()


class RunWatcher(threading.Thread):
    """Driver-side: prints each worker's endpoint once, keeps the Prometheus service-discovery
    file current, and draws the progress bar and the evaluation results from metrics.jsonl.

    Everything goes to ``stream`` (stdout by default) through one :class:`ProgressLine`, so the
    messages never break the bar. When no worker has reported an endpoint after ``wait_warning``
    seconds, it says which resources the run is waiting for (Ray would wait silently).
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: Config,
        interval: float = 1.0,
        stream=None,
        wait_warning: float = 60.0,
        resources: Callable[[], dict[str, float]] | None = None,
    ):
        super().__init__(daemon=True)
        from launcher.monitoring import ProgressLine

        self.run_dir, self.cfg, self.interval = run_dir, cfg, interval
        self.stop_event = threading.Event()
        self.seen: dict[str, dict[str, Any]] = {}
        self.offset = 0
        self.progress = ProgressLine(total=cfg.train.max_steps, stream=stream or sys.stdout)
        self.wait_warning, self.resources = wait_warning, resources
        self.started = time.monotonic()
        self.warned_wait = False

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.poll_endpoints()
            self.poll_metrics()
            self.check_waiting()
        self.poll_endpoints()
        self.poll_metrics()
        self.progress.close()

    def check_waiting(self) -> None:
        if self.warned_wait or self.seen or time.monotonic() - self.started < self.wait_warning:
            return
        self.warned_wait = True
        # An elastic run starts once its minimum fits; that is what to compare with the cluster.
        need = self.cfg.ray.min_workers * self.cfg.ray.cpus_per_worker
        gpus = self.cfg.ray.min_workers * self.cfg.ray.gpus_per_worker
        have = self.resources() if self.resources else {}
        if have.get("CPU", need) >= need and have.get("GPU", 0.0) >= gpus:
            return  # still starting (model loading, DeepSpeed op build): nothing to act on
        self.progress.write(
            f"[mlctl] waiting: the run needs {self.cfg.ray.num_workers} workers x "
            f"{self.cfg.ray.cpus_per_worker:g} CPU"
            + (f" x {self.cfg.ray.gpus_per_worker:g} GPU" if gpus else "")
            + f", the Ray cluster has {have.get('CPU', 0):g} CPU, {have.get('GPU', 0):g} GPU in all; "
            "Ray waits until a node with enough joins (lower ray.num_workers / --cpus-per-worker, "
            "or add nodes)"
        )

    def poll_endpoints(self) -> None:
        from launcher.monitoring import publish_service_discovery

        changed = False
        for f in sorted((self.run_dir / "endpoints").glob("rank*.json")):
            try:
                info = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if self.seen.get(f.name) != info:
                self.seen[f.name] = info
                changed = True
                self.progress.write(
                    f"[mlctl] rank {info['rank']} on {info['node']}: metrics at {info['url']}"
                )
        if changed:
            endpoints = [
                {
                    "target": f"{i['host']}:{i['port']}",
                    "run": self.run_dir.name,
                    "rank": i["rank"],
                    "node": i["node"],
                }
                for i in self.seen.values()
            ]
            publish_service_discovery(self.run_dir, endpoints)

    def poll_metrics(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        with open(path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
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

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


def failure_counter():
    """(callback, read): a Ray Train callback that counts worker-group failures, and a function
    returning the count. The callback runs in Ray Train's controller, another process, so the
    count lives in a small actor both sides can reach. The actor is pinned to the driver's node: a
    worker node that dies must not take the count (and with it the controller's callback) along,
    and when the driver's node dies the run is gone anyway."""
    import ray
    from ray.train import UserCallback
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class Count:
        def __init__(self) -> None:
            self.n = 0

        def add(self) -> None:
            self.n += 1

        def get(self) -> int:
            return self.n

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    count = Count.options(scheduling_strategy=here).remote()

    class CountFailures(UserCallback):
        def __init__(self, count) -> None:
            self.count = count

        def after_exception(self, run_context, worker_exceptions) -> None:
            # Runs in Ray Train's controller, whose own console lines the driver keeps below ERROR:
            # this line is how a user (and the tests) see a failure being handled.
            ranks = ", ".join(str(r) for r in sorted(worker_exceptions or {})) or "?"
            cause = next(iter((worker_exceptions or {}).values()), None)
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[-1][:200]
            print(f"[mlctl] worker group failed (rank {ranks}): {first}; Ray Train handles it", flush=True)
            try:
                ray.get(self.count.add.remote(), timeout=30)
            except Exception as e:  # never let the bookkeeping fail the run it is counting
                print(f"[mlctl] could not count this failure: {e}", flush=True)

    return CountFailures(count), lambda: int(ray.get(count.get.remote(), timeout=30))


def preflight(cfg: Config) -> Config:
    """Driver-side checks that would otherwise fail on every worker (and be retried by Ray), and
    paths made absolute: Ray workers do not run in the driver's working directory."""

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path

    cfg.model.name_or_path = absolute(cfg.model.name_or_path)
    cfg.model.tokenizer = absolute(cfg.model.tokenizer)
    if not cfg.data.shards:
        raise FileNotFoundError("data.shards is empty: point it at a folder written by `mlctl prepare`")
    shards = Path(cfg.data.shards).expanduser().resolve()
    if not (shards / "manifest.json").is_file():
        raise FileNotFoundError(f"no manifest.json in {shards}: run `mlctl prepare` first")
    cfg.data.shards = str(shards)
    missing = [p for p in cfg.eval.pairs if not Path(p).expanduser().is_file()]
    if missing:
        raise FileNotFoundError(f"eval.pairs not found: {', '.join(missing)}")
    cfg.eval.pairs = [absolute(p) for p in cfg.eval.pairs]
    from mlctl.evaluate import read_pair_file

    for path in cfg.eval.pairs:
        # Read once here: a file every worker would refuse at its first evaluation (in another
        # encoding, without a pair) stops the run before it starts, not steps into it.
        read_pair_file(path, cfg.eval.max_pairs)
    if isinstance(cfg.ray.num_workers, list) and cfg.deepspeed.zero_stage != 0:
        raise ValueError(
            f"ray.num_workers={cfg.ray.num_workers} (elastic) needs deepspeed.zero_stage=0, got "
            f"{cfg.deepspeed.zero_stage}: ZeRO >= 1 shards the optimizer state by rank, so a checkpoint "
            "cannot be resumed by a different number of workers"
        )
    return cfg


class Stopped(BaseException):
    """SIGTERM reached the driver (a scheduler's stop: Slurm's time-limit warning through
    cluster/slurm.sbatch, a preemption). A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` reports it as a training failure."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _scaling_workers(cfg: Config) -> int | tuple[int, int]:
    """``ScalingConfig.num_workers``: an int, or ``(min, max)`` for Ray Train V2 elastic training."""
    n = cfg.ray.num_workers
    return (n[0], n[1]) if isinstance(n, list) else n


def launch(cfg: Config, *, num_cpus: int | None = None) -> Path:
    """Run (or resume) training under Ray; returns the run folder. Raises RuntimeError with the
    failure count and the last good checkpoint when the run fails for good."""
    if not cfg.ray.address:
        # NOTE: read when ray is first imported: keeps an embedded Ray (GCS, raylet, workers) on
        # 127.0.0.1 instead of the machine's outward address. Joining a cluster leaves it alone.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        _embedded_ray_auth()
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    name = run_name(cfg)  # from the config as given, before paths are made absolute
    run_dir = run_dir_of(cfg)
    object_store = is_object_store(cfg.ray.storage_path)
    cfg = preflight(copy.deepcopy(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    # NOTE: set, not defaulted: the accelerator follows what the workers are given, not the
    # driver's environment (a CPU-only head node exporting DS_ACCELERATOR=cpu, as the Makefile does
    # without a GPU, would otherwise put GPU workers on DeepSpeed's CPU accelerator).
    env["DS_ACCELERATOR"] = "cuda" if cfg.ray.gpus_per_worker > 0 else "cpu"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", str(max(1, int(cfg.ray.cpus_per_worker))))
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")] if p
    )
    runtime_env = {"env_vars": env, "worker_process_setup_hook": "launcher.ray_train.quiet_ray_logs"}
    started_here = False
    if not ray.is_initialized():
        if cfg.ray.address:
            ray.init(address=cfg.ray.address, runtime_env=runtime_env, log_to_driver=True)
        else:
            need = int(cfg.ray.max_workers * cfg.ray.cpus_per_worker) + 1
            # NOTE: the embedded Ray stays on loopback; nothing of a local run listens elsewhere.
            if need - 1 > (os.cpu_count() or 1) and not num_cpus:
                print(
                    f"[mlctl] warning: {cfg.ray.num_workers} workers x {cfg.ray.cpus_per_worker:g} CPU on a "
                    f"machine with {os.cpu_count()} CPUs: they will share cores and run slower than fewer "
                    "workers would",
                    flush=True,
                )
            ray.init(
                num_cpus=num_cpus or max(need, os.cpu_count() or 1),
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                runtime_env=runtime_env,
                log_to_driver=True,
                logging_level=logging.WARNING,  # "Started a local Ray instance" and the like
            )
        started_here = True
    print(f"[mlctl] run {name}: {run_dir}", flush=True)
    count_cb, failures_so_far = failure_counter()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "run_dir": str(run_dir),
            "run_name": name,
            "object_store": object_store,
        },
        scaling_config=ScalingConfig(
            # NOTE: a (min, max) range is Ray Train V2's; mypy sees the V1 signature of this name.
            num_workers=_scaling_workers(cfg),  # type: ignore[arg-type]
            use_gpu=cfg.ray.gpus_per_worker > 0,
            resources_per_worker={
                "CPU": cfg.ray.cpus_per_worker,
                **({"GPU": cfg.ray.gpus_per_worker} if cfg.ray.gpus_per_worker > 0 else {}),
            },
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.gpus_per_worker > 0 else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=cfg.ray.storage_path if object_store else str(run_dir.parent),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            callbacks=[count_cb],
            # Ray keeps (and prunes) the registry only where it is the record: object stores.
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last)
            if object_store
            else None,
            # NOTE: Ray Train's console lines below ERROR (resource requests, worker group start,
            # "checkpoint created", "failed to send resource request ... safe to ignore" with a
            # traceback on a busy machine) stay in its log files; the driver shows progress, and a
            # failed run still raises from fit() with the cause.
            logging_config=LoggingConfig(log_level="ERROR"),  # type: ignore[call-arg]  # V2 RunConfig
        ),
    )
    watcher = RunWatcher(run_dir, cfg, resources=ray.cluster_resources)
    watcher.start()
    # NOTE: set after ray.init, whose core worker installs a SIGTERM handler that dumps a stack trace
    # and dies. This one unwinds like Ctrl-C instead: the finally below retracts the scrape targets
    # and shuts down what this process started, and Ray ends the run's workers with the driver. It
    # raises KeyboardInterrupt because that is what Ray's blocking get (inside trainer.fit) lets
    # through; any other exception raised by a handler there is printed and dropped. Main thread
    # only (Python's rule); the previous handler comes back when launch() returns.
    terminated: list[int] = []

    def on_sigterm(signum: int, frame: object) -> None:
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = (
        signal.signal(signal.SIGTERM, on_sigterm)
        if threading.current_thread() is threading.main_thread()
        else False
    )
    try:
        trainer.fit()
        recovered = failures_so_far()
    except KeyboardInterrupt:
        if not terminated:
            raise
        from mlctl.checkpoint import CheckpointDir

        newest = None if object_store else CheckpointDir(run_dir).latest(quiet=True)
        where = (
            f"from {newest}" if newest else "from its newest checkpoint" if object_store else "from the start"
        )
        stopped = Stopped(terminated[0])
        print(f"[mlctl] run {name} stopped by {stopped}; the same command resumes it {where}", flush=True)
        raise stopped from None
    except Exception as e:  # Ray wraps worker errors; say what a user needs to act on
        from mlctl.checkpoint import CheckpointDir

        last = (
            f"the newest one Ray registered under {cfg.ray.storage_path}"
            if object_store
            else CheckpointDir(run_dir).latest(quiet=True)
        )
        try:
            failures: int | str = failures_so_far()
        except Exception:  # the count is a courtesy; never hide the real error behind it
            failures = "an unknown number of"
        raise RuntimeError(
            f"training failed after {failures} worker failure(s) (max_failures={cfg.ray.max_failures}); "
            f"last good checkpoint: {last or 'none'}; cause: {_root_cause(e)}"
        ) from e
    finally:
        from launcher.monitoring import retract_service_discovery

        watcher.stop()
        retract_service_discovery(run_dir)  # Prometheus stops scraping workers that are gone
        if started_here:
            ray.shutdown()
        if previous is not False:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    print(f"[mlctl] run {name} finished; {recovered} worker failure(s) recovered", flush=True)
    return run_dir


def _embedded_ray_auth() -> None:
    """Token auth for an embedded Ray without a token file.

    NOTE: Ray (2.5x+) turns token auth on for a new local cluster, writes a fresh token to
    ``~/.ray/auth_token`` and warns about it. That file then switches every later Ray on the machine
    (other users' included) to token auth. A token in the environment of this process (inherited by
    the Ray processes it starts) keeps the embedded cluster protected without the file or the
    warning. An explicit RAY_AUTH_MODE or token is left as it is."""
    if "RAY_AUTH_MODE" in os.environ or "RAY_AUTH_TOKEN" in os.environ:
        return
    import secrets

    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def _root_cause(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1][:300] if text else type(error).__name__
