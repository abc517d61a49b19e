"""The run's control point: one small Ray actor per launch, on the driver's node, that the driver,
every worker and ``mlctl stop`` reach through Ray. Nothing the run coordinates lives in a file that
only one node can see, so a cluster needs no shared filesystem for it.

What it holds:

* the stop request (a signal to the driver, or ``mlctl stop`` from a draining node), which rank 0
  reads between steps and the step's all-reduce hands to every rank;
* the attempt count (worker-group starts of this launch) and the failure count;
* what the driver shows: each rank's metrics endpoint, rank 0's step / evaluation / checkpoint
  records, the data each rank skipped, the last published checkpoint;
* a fatal error: a failure a worker knows retrying cannot fix (another model's checkpoint, no
  readable data, a full disk); the driver then ends the run at once instead of retrying.

:class:`RunControl` is a plain class (tests use it as it is); :func:`start_control` makes it the
named actor ``mlctl-control-RUN`` in namespace ``mlctl``, which is also the cluster-wide guard
against a second driver of the same run.
"""

from __future__ import annotations

from typing import Any

NAMESPACE = "mlctl"
KEEP_RECORDS = 10_000  # unread records the actor keeps (a driver polls every second)


def actor_name(run: str) -> str:
    return f"mlctl-control-{run}"


class RunControl:
    def __init__(self, run: str) -> None:
        self.run = run
        self.stop_signal: str | None = None
        self.attempts = 0
        self.failures = 0
        self.endpoints: dict[int, dict[str, Any]] = {}
        self.records: list[dict[str, Any]] = []
        self.first_record = 0  # index of records[0] in the run's record stream
        self.skipped: dict[int, dict[str, int]] = {}
        self.saved: dict[str, Any] | None = None
        self.fatal: str | None = None

    # ---- the driver and `mlctl stop` ----------------------------------------------------------

    def request_stop(self, signal_name: str) -> bool:
        """Ask the run to stop after its current step and save; True the first time."""
        if self.stop_signal is not None:
            return False
        self.stop_signal = signal_name
        return True

    def snapshot(self, since: int = 0) -> dict[str, Any]:
        """Everything the driver shows, with the records from index ``since`` on (older ones are
        dropped: the driver has them)."""
        drop = max(0, min(since, self.first_record + len(self.records)) - self.first_record)
        del self.records[:drop]
        self.first_record += drop
        return {
            "endpoints": dict(self.endpoints),
            "records": list(self.records),
            "next": self.first_record + len(self.records),
            "skipped": {r: dict(c) for r, c in self.skipped.items()},
            "saved": self.saved,
            "fatal": self.fatal,
            "stop": self.stop_signal,
            "attempts": self.attempts,
            "failures": self.failures,
        }

    def status(self) -> dict[str, Any]:
        """The stop request, the last saved checkpoint and a fatal error (no records consumed)."""
        return {"stop": self.stop_signal, "saved": self.saved, "fatal": self.fatal}

    def add_failure(self) -> int:
        self.failures += 1
        return self.failures

    # ---- the workers --------------------------------------------------------------------------

    def stop_requested(self) -> str | None:
        return self.stop_signal

    def begin_attempt(self) -> int:
        """Rank 0, once per worker-group start: returns this launch's attempt number (1, 2, ...)."""
        self.attempts += 1
        return self.attempts

    def attempt(self) -> int:
        return self.attempts

    def put_endpoint(self, rank: int, info: dict[str, Any]) -> None:
        self.endpoints[rank] = info

    def put_records(self, records: list[dict[str, Any]]) -> None:
        self.records.extend(records)
        if len(self.records) > KEEP_RECORDS:  # no driver reading: keep the newest
            cut = len(self.records) - KEEP_RECORDS
            del self.records[:cut]
            self.first_record += cut

    def put_skipped(self, rank: int, counts: dict[str, int]) -> None:
        self.skipped[rank] = dict(counts)

    def put_saved(self, step: int, where: str) -> None:
        self.saved = {"step": step, "where": where}

    def put_fatal(self, rank: int, message: str) -> None:
        if self.fatal is None:
            self.fatal = f"rank {rank}: {message}"


def start_control(run: str):
    """The run's control actor, pinned to this (the driver's) node. Raises RuntimeError when a
    live driver already holds the run (the same run name on the same cluster)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        ray.get_actor(actor_name(run), namespace=NAMESPACE)
    except ValueError:
        pass
    else:
        raise RuntimeError(
            f"run {run} is already being trained on this Ray cluster (its control actor "
            f"{actor_name(run)} is alive): stop that driver first, or choose another --name"
        )
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    remote = ray.remote(num_cpus=0, max_restarts=0)(RunControl)
    return remote.options(name=actor_name(run), namespace=NAMESPACE, scheduling_strategy=here).remote(run)


def find_control(run: str):
    """The control actor of a running launch (from a worker or ``mlctl stop``), or None."""
    import ray

    try:
        return ray.get_actor(actor_name(run), namespace=NAMESPACE)
    except ValueError:
        return None


def list_runs() -> list[str]:
    """Names of the runs whose driver is alive on the connected Ray cluster."""
    from ray.util import list_named_actors

    prefix = actor_name("")
    return sorted(
        a["name"][len(prefix) :]
        for a in list_named_actors(all_namespaces=True)
        if a.get("namespace") == NAMESPACE and a["name"].startswith(prefix)
    )


def failure_callback(control):
    """A Ray Train callback (it runs in Ray Train's controller, another process) that counts each
    worker-group failure on the control actor and says so on the console."""
    import ray
    from ray.train import UserCallback

    class CountFailures(UserCallback):
        def __init__(self, control) -> None:
            self.control = control

        def after_exception(self, run_context, worker_exceptions) -> None:
            # The controller's own console lines are kept below ERROR by the driver: this line is
            # how a user (and the tests) see a failure being handled.
            ranks = ", ".join(str(r) for r in sorted(worker_exceptions or {})) or "?"
            cause = next(iter((worker_exceptions or {}).values()), None)
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[-1][:200]
            print(f"[mlctl] worker group failed (rank {ranks}): {first}; Ray Train handles it", flush=True)
            try:
                ray.get(self.control.add_failure.remote(), timeout=30)
            except Exception as e:  # never let the bookkeeping fail the run it is counting
                print(f"[mlctl] could not count this failure: {e}", flush=True)

    return CountFailures(control)
