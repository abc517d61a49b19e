"""`cluster/slurm.sbatch`, as shipped, under a real Slurm (Debian `slurm-wlm` + `munge`).

Two Slurm nodes, each a network namespace (sharing the machine's hostname, which slurmctld checks) (tests/netns.py) running its own `slurmd`; `slurmctld` runs
in the first one and a private `munged` serves both over a socket in the test's folder. `sbatch`
submits the shipped script with only what the cluster forces on the command line (one CPU per node,
no GPUs) and a tiny config; the job starts Ray on both nodes through `srun`, waits for them, trains
two workers (one per node) and finishes.

Runs in `make test-cluster` (MLCTL_TEST_CLUSTER=1); skipped otherwise, and when Slurm is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from netns import NetnsCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.multinode]

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent  # the project's venv: the job activates it


def slurm_conf(c: NetnsCluster, state: Path, munge_socket: Path) -> str:
    nodes = "\n".join(
        f"NodeName={c.tag}s{i} NodeAddr={ip} NodeHostname={c.tag}s{i} CPUs=1 State=UNKNOWN"
        for i, ip in enumerate(c.ips)
    )
    return f"""
ClusterName={c.tag}
SlurmctldHost={socket.gethostname()}({c.ips[0]})
MailProg=/bin/true
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
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


@pytest.mark.skipif(os.environ.get("MLCTL_TEST_CLUSTER") != "1", reason="run by `make test-cluster`")
def test_slurm_sbatch_trains_on_two_nodes(tmp_path, tiny_model_dir, tiny_shards):
    for tool in ("slurmctld", "slurmd", "sbatch", "munged"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` not installed (Debian: apt-get install -y slurm-wlm munge)")
    with NetnsCluster(2) as c:
        state = c.root / "slurm"
        state.mkdir()
        sock = c.root / "munge.sock"
        c.started.append(
            subprocess.Popen(
                ["munged", "-F", "-f", f"--socket={sock}", f"--pid-file={c.root}/munged.pid",
                 f"--log-file={c.root}/munged.log", f"--seed-file={c.root}/munged.seed"],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
            )
        )  # fmt: skip
        conf = c.root / "slurm.conf"
        conf.write_text(slurm_conf(c, state, sock))
        (c.root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")
        env = {"SLURM_CONF": str(conf)}
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        c.popen(0, ["slurmctld", "-D", "-f", conf], c.root / "slurmctld.out", **env)
        for i in range(2):
            (state / f"d{c.tag}s{i}").mkdir()
            # NOTE: `ip netns exec` gives each command a private mount namespace with a fresh /sys,
            # without /sys/fs/cgroup, and slurmd refuses to start without a cgroup folder even
            # when no cgroup plugin is used (proctrack/linuxproc, task/none). An empty tmpfs there,
            # private to this slurmd, is enough: the machine's cgroups are never touched.
            slurmd = f"mount -t tmpfs none /sys/fs/cgroup && exec slurmd -D -f {conf} -N {c.tag}s{i}"
            c.popen(i, ["sh", "-c", slurmd], c.root / f"slurmd{i}.out", **env)
        # Both nodes idle.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = c.run(0, ["sinfo", "-h", "-o", "%T %D"], timeout=20, **env)
            if out.stdout.split() == ["idle", "2"]:
                break
            time.sleep(1)
        else:
            pytest.fail(
                f"Slurm nodes not idle: {out.stdout} {out.stderr}\n"
                + "".join(
                    p.read_text()[-1500:]
                    for p in sorted(c.root.glob("slurmd*.out")) + sorted(state.glob("d*.log"))
                )
            )

        storage = tmp_path / "runs"
        config = tmp_path / "tiny.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "model": {"name_or_path": str(tiny_model_dir)},
                    "data": {"shards": str(tiny_shards), "batch_size": 4, "shuffle_buffer": 16},
                    "train": {"max_steps": 6, "warmup_steps": 2, "log_every": 1},
                    "checkpoint": {"every_steps": 3},
                }
            )
        )
        log = tmp_path / "job.log"
        t0 = time.monotonic()
        out = c.run(
            0,
            [
                "sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", "--gpus-per-node=0",
                f"--output={log}", f"--chdir={ROOT}", str(ROOT / "cluster" / "slurm.sbatch"),
                str(config), f"ray.storage_path={storage}", "ray.name=slurm", "ray.max_failures=0",
            ],
            timeout=30, MLCTL_VENV=str(VENV), MLCTL_IFACE="eth0", **env,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip().split(";")[0]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            q = c.run(0, ["squeue", "-h", "-j", job, "-o", "%T"], timeout=20, **env)
            if not q.stdout.strip():
                break
            time.sleep(2)
        elapsed = time.monotonic() - t0
        text = log.read_text(errors="replace") if log.exists() else ""
        (tmp_path / "ctld.log").write_text((state / "ctld.log").read_text(errors="replace"))
        acct = c.run(0, ["scontrol", "show", "job", job], timeout=20, **env).stdout
        print(f"\nmeasured: sbatch -> job finished {elapsed:.1f}s")
        assert "[mlctl] 2 Ray nodes up" in text, text[-4000:]
        assert "[mlctl] done:" in text, text[-4000:] + acct
        ranks = json.loads((storage / "slurm" / "prometheus_sd.json").read_text())
        assert sorted(t for e in ranks for t in e["targets"]) == [f"{ip}:9400" for ip in c.ips]
        assert (storage / "slurm" / "checkpoints" / "latest").read_text().strip() == "step_00000006"
