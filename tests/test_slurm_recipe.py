"""`cluster/slurm.sbatch`, as shipped, under a real Slurm (Debian `slurm-wlm` + `munge`).

Two Slurm nodes, each a network namespace (sharing the machine's hostname, which slurmctld checks) (tests/netns.py) running its own `slurmd`; `slurmctld` runs
in the first one and a private `munged` serves both over a socket in the test's folder. `sbatch`
submits the shipped script with only what the cluster forces on the command line (one CPU per node,
no GPUs) and a tiny config; the job starts Ray on both nodes through `srun`, waits for them, trains
two workers (one per node) and finishes.

The requeue test lets slurmctld itself send the script's `--signal=B:USR1@300` warning: once the
first checkpoint exists, the test shortens the running job's time limit (`scontrol update
TimeLimit=`) so that the limit is less than five minutes away, and slurmctld's periodic time-limit
check signals the batch shell as it would five minutes before any limit. The script's trap stops
the training and Ray on both nodes and requeues the job; the re-run resumes from the checkpoint.

Runs in `make test-cluster` (MLCTL_TEST_CLUSTER=1); skipped otherwise, and when Slurm is not installed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from netns import NetnsCluster, wait_until
from ray_runs import ROOT, slow_steps, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.multinode]

VENV = Path(sys.executable).parent.parent  # the project's venv: the job activates it


def slurm_conf(c: NetnsCluster, state: Path, munge_socket: Path) -> str:
    # cred_expire: also how long a requeued job waits before it may start again (120 s by default).
    # SlurmctldDebug=debug: slurmctld logs the time-limit warning signal it sends.
    nodes = "\n".join(
        f"NodeName={c.tag}s{i} NodeAddr={ip} NodeHostname={c.tag}s{i} CPUs=1 State=UNKNOWN"
        for i, ip in enumerate(c.ips)
    )
    # NOTE: job ids unique across test runs: the script names each node's Ray temp dir after the job,
    # and `ray start --head` refuses a temp dir whose last cluster address is in use by a GCS on this
    # machine (a namespace of another test may hold one at the same address).
    first_job_id = os.getpid() * 10
    return f"""
ClusterName={c.tag}
SlurmctldDebug=debug
FirstJobId={first_job_id}
SlurmctldHost={socket.gethostname()}({c.ips[0]})
MailProg=/bin/true
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=30
SlurmUser=root
SlurmdUser=root
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d%n
SlurmctldPidFile={state}/ctld.pid
SlurmdPidFile={state}/d%n.pid
SlurmctldLogFile={state}/ctld.log
SlurmdLogFile={state}/d%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
{nodes}
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Slurm:
    """A running two-node Slurm (see the module docstring); commands run on node 0."""

    def __init__(self, c: NetnsCluster, state: Path, env: dict[str, str]):
        self.c, self.state, self.env = c, state, env

    def cmd(self, *argv: str, **env: str) -> subprocess.CompletedProcess:
        return self.c.run(0, list(argv), timeout=30, **self.env, **env)

    def job(self, job: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, StartTime, ...); empty once purged."""
        out = self.cmd("scontrol", "-o", "show", "job", job).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def sbatch(self, log: Path, config: Path, *overrides: str, **env: str) -> str:
        out = self.cmd(
            "sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", "--gpus-per-node=0",
            f"--output={log}", f"--chdir={ROOT}", str(ROOT / "cluster" / "slurm.sbatch"),
            str(config), *overrides,
            MLCTL_VENV=str(VENV), MLCTL_IFACE="eth0", **env,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]

    def wait_gone(self, job: str, timeout: float) -> None:
        """Until the job has left the queue (finished, failed or cancelled)."""
        wait_until(
            f"end of job {job}",
            lambda: not self.cmd("squeue", "-h", "-j", job, "-o", "%T").stdout.strip(),
            timeout,
            poll=2,
            detail=lambda: f"still queued: {self.job(job)}",
        )

    def ray_processes(self) -> list[str]:
        """Ray processes still alive on any node."""
        return [f"node {i}: {p}" for i in range(len(self.c.namespaces)) for p in self.c.ray_left(i)]

    def ctld_log(self, dest: Path) -> str:
        """slurmctld's log, also copied into ``dest`` (the cluster folder goes with the teardown)."""
        (kept,) = self.c.keep(dest, "slurm/ctld.log")
        return kept.read_text(errors="replace")


@pytest.fixture(scope="module")
def slurm():
    if os.environ.get("MLCTL_TEST_CLUSTER") != "1":
        pytest.skip("run by `make test-cluster`")
    for tool in ("slurmctld", "slurmd", "sbatch", "munged"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` not installed (Debian: apt-get install -y slurm-wlm munge)")
    with NetnsCluster(2) as c:
        state = c.root / "slurm"
        state.mkdir()
        sock = c.root / "munge.sock"
        c.popen(
            None,
            ["munged", "-F", "-f", f"--socket={sock}", f"--pid-file={c.root}/munged.pid",
             f"--log-file={c.root}/munged.log", f"--seed-file={c.root}/munged.seed"],
            c.root / "munged.out",
        )  # fmt: skip
        conf = c.root / "slurm.conf"
        conf.write_text(slurm_conf(c, state, sock))
        (c.root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")
        env = {"SLURM_CONF": str(conf)}
        wait_until("munge socket", sock.exists, 30, detail=(c.root / "munged.out").read_text)
        c.popen(0, ["slurmctld", "-D", "-f", conf], c.root / "slurmctld.out", **env)
        for i in range(2):
            (state / f"d{c.tag}s{i}").mkdir()
            # NOTE: `ip netns exec` gives each command a private mount namespace with a fresh /sys,
            # without /sys/fs/cgroup, and slurmd refuses to start without a cgroup folder even
            # when no cgroup plugin is used (proctrack/linuxproc, task/none). An empty tmpfs there,
            # private to this slurmd, is enough: the machine's cgroups are never touched.
            c.daemon(
                i,
                ["slurmd", "-D", "-f", conf, "-N", f"{c.tag}s{i}"],
                c.root / f"slurmd{i}.out",
                setup=["mount -t tmpfs none /sys/fs/cgroup"],
                **env,
            )
        s = Slurm(c, state, env)
        wait_until(
            "two idle Slurm nodes",
            lambda: s.cmd("sinfo", "-h", "-o", "%T %D").stdout.split() == ["idle", "2"],
            60,
            poll=1,
            detail=lambda: (
                s.cmd("sinfo").stdout
                + "".join(
                    p.read_text()[-1500:]
                    for p in sorted(c.root.glob("slurmd*.out")) + sorted(state.glob("d*.log"))
                )
            ),
        )
        yield s


def test_slurm_sbatch_trains_on_two_nodes(slurm, tmp_path, tiny_model_dir, tiny_shards):
    storage = tmp_path / "runs"
    config = tiny_config(tmp_path / "tiny.yaml", tiny_model_dir, tiny_shards)
    log = tmp_path / "job.log"
    t0 = time.monotonic()
    job = slurm.sbatch(log, config, f"ray.storage_path={storage}", "ray.name=slurm", "ray.max_failures=0")
    slurm.wait_gone(job, timeout=600)
    elapsed = time.monotonic() - t0
    text = log.read_text(errors="replace") if log.exists() else ""
    slurm.ctld_log(tmp_path)
    acct = slurm.cmd("scontrol", "show", "job", job).stdout
    print(f"\nmeasured: sbatch -> job finished {elapsed:.1f}s")
    assert "[mlctl] 2 Ray nodes up" in text, text[-4000:]
    assert "[mlctl] done:" in text, text[-4000:] + acct
    assert "[mlctl] Ray stopped on 2 node(s)" in text, text[-4000:]
    ranks = json.loads((storage / "slurm" / "prometheus_sd.json").read_text())
    assert sorted(t for e in ranks for t in e["targets"]) == [f"{ip}:9400" for ip in slurm.c.ips]
    assert (storage / "slurm" / "checkpoints" / "latest").read_text().strip() == "step_00000006"


TRAPPED = "[mlctl] time limit near: stopping the run and requeueing"  # the script's trap
LEAD_S = 300  # the script's `#SBATCH --signal=B:USR1@300`
MAX_STEPS, STEP_SLEEP = 48, 1.5


def test_time_limit_signal_requeues_and_the_rerun_resumes(slurm, tmp_path, tiny_model_dir, tiny_shards):
    """The script's own requeue path, driven by slurmctld's time-limit warning (module docstring).
    No periodic checkpoint: the one the re-run resumes from is the save of the stop itself, at the
    step the signal found the run on."""
    assert f"--signal=B:USR1@{LEAD_S}" in (ROOT / "cluster" / "slurm.sbatch").read_text()
    storage = tmp_path / "runs"
    latest = storage / "slurm" / "checkpoints" / "latest"
    metrics = storage / "slurm" / "metrics.jsonl"
    config = tiny_config(
        tmp_path / "tiny.yaml", tiny_model_dir, tiny_shards, max_steps=MAX_STEPS, every_steps=0
    )
    log = tmp_path / "job.log"
    # Slowed steps (the test-only fault hook's sleep) leave room for the signal to land mid-run.
    slow = slow_steps(STEP_SLEEP)
    times: dict[str, float] = {}
    t0 = time.monotonic()
    job = slurm.sbatch(log, config, f"ray.storage_path={storage}", "ray.name=slurm", **slow)

    def text() -> str:
        return log.read_text(errors="replace") if log.exists() else ""

    def wait(what: str, cond, timeout: float, poll: float = 1.0) -> None:
        wait_until(what, cond, timeout, poll, detail=lambda: f"job: {slurm.job(job)}\n{text()[-4000:]}")
        times[what] = time.monotonic() - t0

    wait("training", lambda: metrics.is_file() and metrics.read_text().count('"event": "train"') >= 2, 600)
    assert not latest.exists(), "no periodic checkpoint in this test"
    # Less than LEAD_S seconds left from now: slurmctld's next time-limit check (every 30 s) sends
    # the warning signal, and the trap still has over four minutes before the hard limit.
    info = slurm.job(job)
    assert info["JobState"] == "RUNNING", info
    ran = (datetime.now() - datetime.fromisoformat(info["StartTime"])).total_seconds()
    limit_min = math.floor((ran + LEAD_S) / 60)
    out = slurm.cmd("scontrol", "update", f"JobId={job}", f"TimeLimit={limit_min}")
    assert out.returncode == 0, out.stderr
    t_limit = time.monotonic()
    wait("signal trapped", lambda: TRAPPED in text(), timeout=LEAD_S, poll=0.5)
    wait("requeued", lambda: slurm.job(job).get("Restarts") == "1", timeout=LEAD_S, poll=0.5)
    pending = slurm.job(job)
    first_run_ckpt = latest.read_text().strip()
    # The trap waited for each node's `ray start`; its reaper may take a moment more for the rest.
    deadline = time.monotonic() + 15
    while (ray_left := slurm.ray_processes()) and time.monotonic() < deadline:
        time.sleep(1)
    # Back to the script's own limit before the re-run starts (it waits cred_expire=30 s), or the
    # shortened limit would signal the re-run too.
    out = slurm.cmd("scontrol", "update", f"JobId={job}", "TimeLimit=24:00:00")
    assert out.returncode == 0, out.stderr
    slurm.wait_gone(job, timeout=900)
    times["job finished"] = time.monotonic() - t0
    final = slurm.job(job)
    log_text = text()
    ctld = slurm.ctld_log(tmp_path)
    print("\nmeasured (s from sbatch): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    shortened = t_limit - t0
    print(
        f"measured: limit shortened -> signal trapped {times['signal trapped'] - shortened:.1f}s, "
        f"-> requeued {times['requeued'] - shortened:.1f}s"
    )

    first, sep, second = log_text.partition(TRAPPED)
    assert sep, f"the trap never ran; job: {final}\n{log_text[-4000:]}"
    # The driver stopped on SIGTERM: every rank finished its step, the run saved there (exit 143).
    stopped = re.search(
        r"\[mlctl\] run slurm stopped by SIGTERM at step (\d+): checkpoint step_\d+ saved; "
        r"the same command resumes it from step \d+",
        second,
    )
    assert stopped, log_text[-4000:]
    assert pending["JobState"] in ("PENDING", "REQUEUED"), pending
    assert "[mlctl] Ray stopped on 2 node(s)" in second.split("[mlctl] 2 Ray nodes up")[0], log_text[-4000:]
    assert not ray_left, f"Ray processes outlived the first run: {ray_left}"
    assert "[mlctl] done:" not in first, "the first run finished before the signal"
    step = int(first_run_ckpt.removeprefix("step_"))
    assert 0 < step < MAX_STEPS, first_run_ckpt
    resumed = re.search(r"resumed from \S+/(step_\d+) at step (\d+)", second)
    assert resumed, log_text[-4000:]
    assert resumed.groups() == (first_run_ckpt, str(step)), resumed.group(0)
    assert int(stopped.group(1)) == step, stopped.group(0)  # the re-run starts at the signal's step
    assert "[mlctl] done:" in second, log_text[-4000:]
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", final
    assert latest.read_text().strip() == f"step_{MAX_STEPS:08d}"
    # slurmctld's own time-limit warning, not a signal from anyone else.
    assert re.search(rf"warning signal 10 to JobId={job}\b", ctld), "no time-limit warning in ctld.log"
