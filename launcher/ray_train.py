"""``launch()``: one training run under Ray Train, from the driver.

The sequence: name the run and find its folder (launcher/naming.py), check on the driver what would
fail on every worker (launcher/preflight.py), lock the run folder, start or join Ray
(launcher/cluster.py), start the run's control actor (launcher/control.py), build the TorchTrainer,
watch the run (launcher/monitoring.py) while Ray Train runs the workers (launcher/worker.py) and
handle signals as stops that save (launcher/stopping.py); then say how it ended.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from launcher.naming import is_object_store, run_dir_of, run_name
from mlctl.config import Config

log = logging.getLogger(__name__)

CODE_ROOT = str(Path(__file__).resolve().parent.parent)


class Stopped(BaseException):
    """A signal stopped the run (it saved first unless the signal came twice). A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` reports it as a training failure."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _scaling_workers(cfg: Config) -> int | tuple[int, int]:
    """``ScalingConfig.num_workers``: an int, or ``(min, max)`` for Ray Train V2 elastic training."""
    n = cfg.ray.num_workers
    return (n[0], n[1]) if isinstance(n, list) else n


def launch(cfg: Config, *, num_cpus: int | None = None) -> Path:
    """Run (or resume) training under Ray; returns the run folder.

    Raises RuntimeError with the failure count and the last good checkpoint when the run fails for
    good (or with the one line a worker gave for a failure no retry can fix), and :class:`Stopped`
    after a signal (the run saved at the step it reached)."""
    from launcher.cluster import connect, prepare_embedded, worker_env
    from launcher.preflight import preflight
    from mlctl.lock import RunLock

    prepare_embedded(cfg)
    import ray

    name = run_name(cfg)  # from the config as given, before paths are made absolute
    run_dir = run_dir_of(cfg)
    cfg = preflight(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir / ".lock", what=f"run {name}"):
        cfg.save(run_dir / "config.yaml")
        runtime_env = {
            "env_vars": worker_env(cfg, CODE_ROOT),
            "worker_process_setup_hook": "launcher.worker.quiet_ray_logs",
        }
        started_here = connect(cfg, runtime_env, num_cpus)
        try:
            return _run(cfg, name, run_dir)
        finally:
            if started_here:
                ray.shutdown()


def _trainer(cfg: Config, name: str, run_dir: Path, control):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from launcher.control import failure_callback
    from launcher.worker import train_loop_per_worker

    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller) -> None:
            # NOTE: Ray Train's fit() would take SIGINT over and abort the workers at once;
            # launcher.stopping makes Ctrl-C what SIGTERM is, a stop that saves first.
            pass

    object_store = is_object_store(cfg.ray.storage_path)
    return Trainer(
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
        torch_config=TorchConfig(
            backend="nccl" if cfg.ray.gpus_per_worker > 0 else "gloo",
            timeout_s=int(cfg.ray.collective_timeout_s),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=cfg.ray.storage_path if object_store else str(run_dir.parent),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            callbacks=[failure_callback(control)],
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


def _run(cfg: Config, name: str, run_dir: Path) -> Path:
    """Start the control actor and the trainer, watch, and say how the run ended."""
    import ray

    from launcher.control import start_control
    from launcher.monitoring import RunWatcher, retract_service_discovery
    from launcher.stopping import StopSignals

    object_store = is_object_store(cfg.ray.storage_path)
    control = start_control(name)
    print(f"[mlctl] run {name}: {run_dir}", flush=True)
    trainer = _trainer(cfg, name, run_dir, control)
    watcher: RunWatcher
    signals = StopSignals(
        say=lambda text: watcher.progress.write(text), can_wait=lambda: watcher.workers_seen
    )
    forwarded: list[bool] = []

    def feed(since: int) -> dict:
        if signals.requested.is_set() and not forwarded:
            forwarded.append(bool(ray.get(control.request_stop.remote(signals.name), timeout=30)))
        return ray.get(control.snapshot.remote(since), timeout=30)

    watcher = RunWatcher(
        run_dir,
        cfg,
        feed,
        resources=ray.cluster_resources,
        write_jsonl=object_store,  # the workers' own run folders are on their nodes
        on_fatal=lambda reason: signals.fail(f"final failure: {reason}"),
    )
    watcher.start()
    signals.install()
    try:
        try:
            trainer.fit()
        finally:
            signals.waiting = False
    except KeyboardInterrupt:
        if signals.abort is None:
            raise
        _abort(cfg, name, run_dir, watcher, signals)
    except Exception as e:  # Ray wraps worker errors; say what a user needs to act on
        if watcher.last.get("fatal"):
            raise RuntimeError(f"training stopped: {watcher.last['fatal']}") from None
        raise RuntimeError(_failure_text(cfg, run_dir, control, e)) from e
    finally:
        watcher.stop()
        retract_service_discovery(run_dir)  # Prometheus stops scraping workers that are gone
        signals.restore()
    end = watcher.last
    if end.get("fatal"):
        raise RuntimeError(f"training stopped: {end['fatal']}")
    saved = end.get("saved") or {}
    if end.get("stop") and saved.get("step", 0) < cfg.train.max_steps:
        where = f"checkpoint {Path(saved['where']).name} saved" if saved else "no checkpoint saved"
        step = saved.get("step", "its newest checkpoint")
        print(
            f"[mlctl] run {name} stopped by {end['stop']} at step {step}: {where}; "
            f"the same command resumes it from step {step}",
            flush=True,
        )
        # a stop from outside (`mlctl stop` on a draining node) reads as the scheduler's SIGTERM
        raise Stopped(signals.signum or signal.SIGTERM)
    skipped = watcher.skipped_total()
    data = "; data skipped: " + ", ".join(f"{r} {n}" for r, n in sorted(skipped.items())) if skipped else ""
    print(
        f"[mlctl] run {name} finished; {end.get('failures', 0)} worker failure(s) recovered{data}", flush=True
    )
    return run_dir


def _abort(cfg: Config, name: str, run_dir: Path, watcher, signals) -> None:
    """The main thread was interrupted for ``signals.abort``: say so and raise."""
    fatal = watcher.last.get("fatal")
    if fatal:
        raise RuntimeError(f"training stopped: {fatal}") from None
    where = _newest(cfg, run_dir, watcher)
    print(f"[mlctl] run {name} aborted ({signals.abort}); the same command resumes it {where}", flush=True)
    raise Stopped(signals.signum or signal.SIGINT) from None


def _newest(cfg: Config, run_dir: Path, watcher) -> str:
    from mlctl.checkpoint_dir import CheckpointDir

    saved = watcher.last.get("saved")
    if is_object_store(cfg.ray.storage_path):
        return f"from step {saved['step']}" if saved else "from its newest checkpoint"
    newest = CheckpointDir(run_dir).latest(quiet=True)
    return f"from {newest}" if newest else "from the start"


def _failure_text(cfg: Config, run_dir: Path, control, error: BaseException) -> str:
    import ray

    from mlctl.checkpoint_dir import CheckpointDir

    last = (
        f"the newest one Ray registered under {cfg.ray.storage_path}"
        if is_object_store(cfg.ray.storage_path)
        else CheckpointDir(run_dir).latest(quiet=True)
    )
    try:
        failures: int | str = ray.get(control.snapshot.remote(0), timeout=30)["failures"]
    except Exception:  # the count is a courtesy; never hide the real error behind it
        failures = "an unknown number of"
    return (
        f"training failed after {failures} worker failure(s) (max_failures={cfg.ray.max_failures}); "
        f"last good checkpoint: {last or 'none'}; cause: {_root_cause(error)}"
    )


def _root_cause(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1][:300] if text else type(error).__name__
