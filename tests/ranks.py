"""Real process groups for tests: ``run_ranks`` runs a function in spawned local processes joined in
one group (gloo on CPU, NCCL on GPUs) and hands back what each rank returned; ``free_port`` is the
one way tests (and bench scripts) get a port to listen on.

    def _rank(rank, world, data):  # module level: the spawned processes import it by name
        ...
        return float(loss)

    losses = run_ranks(_rank, 2, data)  # [rank 0's loss, rank 1's loss]
"""

from __future__ import annotations

import datetime
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the OS's pick; free when this returns)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RankFailed(RuntimeError):
    """A rank of :func:`run_ranks` failed: its traceback text, or how it ended without one."""


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    backend: str = "gloo",
    init: Literal["tcp", "env"] = "tcp",
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> list[Any]:
    """``fn(rank, world, *args)`` in ``world`` spawned processes; each rank's return value, in rank
    order (it must pickle, as must ``fn`` and ``args``).

    The group: with ``init="tcp"`` the harness joins it (``init_process_group(backend)`` over TCP on
    loopback; NCCL: rank r on ``cuda:r``) before ``fn`` runs. With ``init="env"`` it only sets what
    torch's ``env://`` and DeepSpeed read (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE), and ``fn`` makes the group itself (``deepspeed.init_distributed``,
    ``Trainer.setup``). ``env`` is set in each rank before ``fn`` runs, but after the rank imported
    ``fn``'s module: whatever must see it (DeepSpeed reads DS_ACCELERATOR when first imported) is
    imported inside ``fn``. Each rank runs with one torch thread.

    After ``fn`` returns, the rank hands its result over, waits at a barrier for the others,
    destroys the group and leaves through :func:`exit_rank`. An exception in a rank is raised here
    (its own type where it pickles), caused by a :class:`RankFailed` holding the rank's traceback;
    the other ranks are killed. A rank that dies without one (a signal, an abort), or a run still
    going after ``timeout`` seconds (also each collective's timeout), raises :class:`RankFailed`.
    """
    import multiprocessing.connection

    import torch.multiprocessing as mp

    if world < 1:
        raise ValueError(f"world must be at least 1, got {world}")
    if init not in ("tcp", "env"):
        raise ValueError(f"init must be 'tcp' or 'env', got {init!r}")
    ctx = mp.get_context("spawn")
    out = Path(tempfile.mkdtemp(prefix="ranks-"))
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world, args, backend, init, port, dict(env or {}), timeout, str(out)),
            name=f"rank{rank}",
        )
        for rank in range(world)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        running = set(range(world))
        while running:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RankFailed(f"rank(s) {sorted(running)} of {world} still running after {timeout:.0f}s")
            multiprocessing.connection.wait([procs[r].sentinel for r in running], timeout=left)
            ended = [r for r in sorted(running) if procs[r].exitcode is not None]
            running.difference_update(ended)
            failed = [r for r in ended if procs[r].exitcode != 0]
            if failed:
                # The first to fail is the cause: a peer's "Connection closed by peer" follows it.
                first = min(failed, key=lambda r: _failed_at(out, r))
                _raise_failure(out, first, world, procs[first].exitcode)
        return [_read(out, rank)[1] for rank in range(world)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=30)
        shutil.rmtree(out, ignore_errors=True)


def exit_rank() -> None:
    """Leave a spawned rank that has written its results and destroyed its process group.

    torch 2.13's gloo can abort the first rank to exit ("terminate called without an active
    exception", SIGABRT, no Python frame) while a peer still holds its connections: about one run
    in 15 of a two-rank test here, always after the rank had printed that its group was destroyed.
    Nothing is left to do at that point, so the rank skips the interpreter's and C++'s teardown.
    Call it only on the success path: a rank that raised must exit with its traceback.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---- inside a rank ---------------------------------------------------------------------------------


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world: int,
    args: tuple,
    backend: str,
    init: str,
    port: int,
    env: dict[str, str],
    timeout: float,
    out: str,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        **env,
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if init == "tcp":
            extra = {}
            if backend == "nccl":
                device = torch.device("cuda", rank)
                torch.cuda.set_device(device)
                extra["device_id"] = device  # binds the communicator now (and the barrier's device)
            dist.init_process_group(
                backend,
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=timeout),
                **extra,
            )
        _write(out, rank, ("ok", fn(rank, world, *args)))
    except BaseException as e:
        _write(out, rank, ("error", _picklable(e), traceback.format_exc(), time.time()))
        raise  # and the rank exits with its traceback on stderr too
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    exit_rank()


def _picklable(e: BaseException) -> BaseException | None:
    try:
        return pickle.loads(pickle.dumps(e))
    except Exception:
        return None


def _write(out: str, rank: int, record: tuple) -> None:
    tmp = Path(out) / f".rank{rank}"
    tmp.write_bytes(pickle.dumps(record))
    os.replace(tmp, Path(out) / f"rank{rank}")  # whole or absent, even if the rank is killed


# ---- back in the test --------------------------------------------------------------------------------


def _read(out: Path, rank: int) -> tuple:
    path = out / f"rank{rank}"
    if not path.exists():
        raise RankFailed(f"rank {rank} exited without a result")
    return pickle.loads(path.read_bytes())


def _failed_at(out: Path, rank: int) -> float:
    path = out / f"rank{rank}"
    record = pickle.loads(path.read_bytes()) if path.exists() else None
    # A rank that died without a Python exception (a signal) broke its peers' connections first.
    return record[3] if record and record[0] == "error" else float("-inf")


def _raise_failure(out: Path, rank: int, world: int, code: int) -> None:
    path = out / f"rank{rank}"
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    record = pickle.loads(path.read_bytes()) if path.exists() else None
    if record is None or record[0] != "error":
        # NOTE: a result followed by a failure is gloo's teardown abort (see exit_rank) or worse.
        ran = "after returning its result" if record else "without a Python exception"
        raise RankFailed(f"rank {rank} of {world} ended with {how} {ran}")
    _, exc, text, _ = record
    cause = RankFailed(f"rank {rank} of {world} raised ({how}):\n{text}")
    if exc is None:
        raise cause
    raise exc from cause


def run_engine_worker(run_dir: Path, fault: dict | None, overrides: list[str]):
    """tests/engine_worker.py in a subprocess: one standalone training process (world size 1, gloo)
    on ``run_dir`` with a fault of tests/fault_injection.py (or None); its CompletedProcess."""
    import json
    import subprocess

    tests = Path(__file__).resolve().parent
    return subprocess.run(
        [sys.executable, str(tests / "engine_worker.py"), str(run_dir), json.dumps(fault), *overrides],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tests.parent,
    )
