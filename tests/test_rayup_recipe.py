"""`cluster/ray-cluster.yaml` through `ray up`, `ray exec` and `ray down`, over real SSH.

Three network namespaces (tests/netns.py): node 0 is the head host, node 1 a worker host, node 2 the
machine a user runs `ray up` from. Each host runs its own `sshd` (Debian's openssh-server) on its
address, logging in `root` with a key made here, and has a home folder of its own: the sshd runs in a
private mount namespace where a folder of the test is mounted over /root (every folder of the real
/root is mounted into it, so the venv's interpreter and the caches stay reachable). `~` therefore
means that host's home for everything Ray does there, `ssh -i ~/ray_bootstrap_key.pem` of the head's
autoscaler included, and the files `ray up` copies never touch the machine's /root.

`ray up` runs with RAY_UP_enable_autoscaler_v2=0, as the yaml says (with Ray 2.60's default v2
autoscaler the head never started the worker). The yaml and cluster/ray-cluster.env are used as
shipped, except:
- the placeholders: head_ip, worker_ips, ssh_user (root), ssh_private_key;
- the `ray stop` of the start commands becomes a bare `ray stop`, which on these hosts is a shell
  function of their ~/.bashrc that stops only the Ray processes of that host's namespace
  (``python tests/netns.py stop-ray``). The real `ray stop` stops every Ray process of the machine,
  and the namespaces share one process table. `ray down`'s own `ray stop` (a bare one, run by Ray on
  the head) reaches the same function.

What each host's ~/.bashrc sets (Ray sources it before every command; cluster/ray-cluster.env
keeps these values): MLCTL_DIR (this checkout with its venv), MLCTL_IFACE=eth0, and
MLCTL_RAY_START_ARGS="--num-cpus=1 --num-gpus=0 --temp-dir=$RAY_TMPDIR/ray" (one CPU per host forces
one worker per host); and for this machine only: RAY_TMPDIR, a short folder per host (real hosts each
have their own /tmp), PYTHONPATH (the checkout under test) and the variables `make` exports. The client runs with a home,
RAY_TMPDIR and TMPDIR of its own: Ray's cluster state file (cluster-mlctl.state) and config cache
land there and go with the cluster folder; the test removes Ray's SSH ControlPath folder in /tmp.

After `ray exec` trained two workers, one per host, `ray down` must stop the head; it does not reach
the worker (the local provider only marks it terminated), whose raylet must exit by itself once it
has lost the head. The teardown kills what is left (the worker's agents and log monitor), sshd
included, by `ip netns pids`, also when the test fails.

Runs in `make test-cluster` (MLCTL_TEST_CLUSTER=1); skipped otherwise, and without sshd/rsync.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from netns import NetnsCluster, wait_until
from ray_runs import ROOT, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.multinode]

VENV = Path(sys.executable).parent.parent
SSHD = "/usr/sbin/sshd"
STOP = '"$MLCTL_DIR/.venv/bin/ray" stop'
TIMES: dict[str, float] = {}


def checkout(c: NetnsCluster) -> Path:
    """This repository with its environment built: the checkout itself when its .venv is the one
    running this test, otherwise a folder of links to the checkout's files plus `.venv`."""
    if (ROOT / ".venv").resolve() == VENV.resolve():
        return ROOT
    farm = c.root / "mlctl"
    farm.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".venv", ".git"):
            (farm / entry.name).symlink_to(entry)
    (farm / ".venv").symlink_to(VENV)
    return farm


def host_bashrc(c: NetnsCluster, node: int, mlctl_dir: Path) -> str:
    make_env = "DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false"
    return f"""
export MLCTL_DIR={mlctl_dir}
export MLCTL_IFACE=eth0
export RAY_TMPDIR={c.root}/t{node}
export MLCTL_RAY_START_ARGS="--num-cpus=1 --num-gpus=0 --temp-dir=$RAY_TMPDIR/ray"
export PYTHONPATH={ROOT}
export {make_env}
ray() {{
  if [ "$1" = stop ]; then {VENV}/bin/python {ROOT}/tests/netns.py stop-ray
  else {VENV}/bin/ray "$@"; fi
}}
"""


def start_sshd(c: NetnsCluster, node: int, mlctl_dir: Path) -> None:
    home = c.root / f"home{node}"
    home.mkdir()
    (c.root / f"t{node}").mkdir()
    bound = [
        entry
        for entry in sorted(Path("/root").iterdir())
        if entry.is_dir() and not entry.is_symlink() and entry.name not in (".ssh", ".ray", ".mlctl")
    ]
    for entry in bound:
        (home / entry.name).mkdir()
    binds = [f"mount --bind {entry} {home / entry.name}" for entry in bound]
    (home / ".bashrc").write_text(host_bashrc(c, node, mlctl_dir))
    conf = c.root / f"sshd{node}.conf"
    conf.write_text(
        f"""ListenAddress {c.ips[node]}
HostKey {c.root}/host_key
PidFile {c.root}/sshd{node}.pid
AuthorizedKeysFile {c.root}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
PrintLastLog no
"""
    )
    # In sshd's own mount namespace, /root is this host's home; every session and every Ray
    # process of the host inherits it.
    log = c.root / f"sshd{node}.log"
    c.daemon(
        node,
        [SSHD, "-D", "-e", "-f", conf],
        log,
        setup=[*binds, f"mount --rbind {home} /root"],
        ready=lambda: "Server listening" in log.read_text(errors="replace"),
    )
    # The mounts must not be visible here: the teardown deletes these folders.
    leaked = [entry.name for entry in bound if any((home / entry.name).iterdir())]
    assert not leaked, f"mounts of node {node} are visible outside its namespace: {leaked}"


def cluster_yaml(c: NetnsCluster, key: Path, out: Path) -> dict:
    """The shipped yaml with the placeholders filled and `ray stop` scoped to each host."""
    cfg = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    cfg["provider"]["head_ip"] = c.ips[0]
    cfg["provider"]["worker_ips"] = [c.ips[1]]
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    for section in ("head_start_ray_commands", "worker_start_ray_commands"):
        stops = [cmd for cmd in cfg[section] if cmd.endswith(STOP)]
        assert len(stops) == 1, cfg[section]
        cfg[section] = [cmd.replace(STOP, "ray stop") for cmd in cfg[section]]
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def ray_cli(c: NetnsCluster, args: list[str], home: Path, log: Path, timeout: float) -> tuple[int, str]:
    """The `ray` command on the client host (node 2), from the repository root (the yaml's file
    mounts are relative to it), with the client's own home and Ray temp folder."""
    tmp = str(c.root / "t2")
    env = c.env(HOME=str(home), RAY_TMPDIR=tmp, TMPDIR=tmp, RAY_UP_enable_autoscaler_v2="0")
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # what reaches the hosts is the yaml's
        env.pop(name)
    with open(log, "w") as f:
        out = subprocess.run(
            c.cmd(2, [VENV / "bin" / "ray", *args]),
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    return out.returncode, log.read_text(errors="replace")


def keep_logs(c: NetnsCluster, dest: Path) -> None:
    """Keep the hosts' Ray logs that explain a failure (autoscaler, raylet, GCS) and sshd's logs."""
    logs = "t[01]/ray/session_latest/logs"
    c.keep(dest, *(f"{logs}/{p}" for p in ("monitor*", "raylet*.out", "raylet*.err", "gcs_server.out")))
    c.keep(dest, "sshd[01].log")


def ssh_control_dir(cluster_name: str) -> Path:
    """Where Ray's SSH runner keeps its ControlMaster sockets (command_runner.SSHCommandRunner)."""
    user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    return Path(f"/tmp/ray_ssh_{user}") / hashlib.sha256(cluster_name.encode()).hexdigest()[:10]


@pytest.mark.skipif(os.environ.get("MLCTL_TEST_CLUSTER") != "1", reason="run by `make test-cluster`")
def test_ray_up_exec_down_on_two_hosts(tmp_path, tiny_model_dir, tiny_shards):
    for tool in (SSHD, "ssh", "rsync", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` not installed (Debian: apt-get install -y openssh-server rsync)")
    if not Path("/run/sshd").is_dir():
        pytest.skip("sshd needs /run/sshd (mkdir -p /run/sshd; `make test-cluster` makes it)")
    cfg_path = tmp_path / "ray-cluster.yaml"
    shipped = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    control = ssh_control_dir(shipped["cluster_name"])
    try:
        with NetnsCluster(3) as c, contextlib.ExitStack() as stack:
            stack.callback(keep_logs, c, tmp_path)
            mlctl_dir = checkout(c)
            # `make setup` is a setup command: here it must find the venv up to date, not install.
            q = subprocess.run(["make", "-q", "-C", mlctl_dir, "setup"], capture_output=True, timeout=60)
            if q.returncode != 0:
                pytest.fail(f"{VENV} is older than pyproject.toml: run `make setup` first")
            key = c.root / "id_ed25519"
            for path in (c.root / "host_key", key):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
            shutil.copy(key.with_suffix(".pub"), c.root / "authorized_keys")
            for node in (0, 1):
                start_sshd(c, node, mlctl_dir)
            client = c.root / "client"
            (client / ".mlctl").mkdir(parents=True)
            (c.root / "t2").mkdir()
            token = client / ".mlctl" / "ray_auth_token"
            token.write_text(c.token + "\n")
            token.chmod(0o600)
            cluster_yaml(c, key, cfg_path)

            t0 = time.monotonic()
            rc, text = ray_cli(c, ["up", "-y", str(cfg_path)], client, tmp_path / "up.log", timeout=600)
            TIMES["ray up (head set up, Ray started)"] = time.monotonic() - t0
            assert rc == 0, text[-6000:]
            # The head's autoscaler sets up the worker host after `ray up` returns.
            TIMES["ray up returned -> worker joined"] = c.wait_for_nodes(2, timeout=180)

            storage = tmp_path / "runs"
            config = tiny_config(tmp_path / "tiny.yaml", tiny_model_dir, tiny_shards)
            train = (
                '. ~/.mlctl/ray-cluster.env && cd "$MLCTL_DIR" && .venv/bin/mlctl train '
                f"-c {config} --address auto --num-workers 2 --cpus-per-worker 1 "
                f"ray.storage_path={storage} ray.name=rayup ray.max_failures=0"
            )
            t1 = time.monotonic()
            rc, text = ray_cli(c, ["exec", str(cfg_path), train], client, tmp_path / "exec.log", timeout=900)
            TIMES["ray exec mlctl train -> training done"] = time.monotonic() - t1
            assert rc == 0, text[-6000:]
            assert "[mlctl] done:" in text, text[-6000:]
            placed = {
                ip: r
                for r, ip in re.findall(r"\[mlctl\] rank (\d) on \S+: metrics at http://([\d.]+):", text)
            }
            assert set(placed) == {c.ips[0], c.ips[1]}, text[-6000:]
            sd = json.loads((storage / "rayup" / "prometheus_sd.json").read_text())
            assert {t.split(":")[0] for e in sd for t in e["targets"]} == {c.ips[0], c.ips[1]}
            latest = (storage / "rayup" / "checkpoints" / "latest").read_text().strip()
            assert latest == "step_00000006"

            assert c.ray_left(1), "the worker host has no Ray before `ray down`"
            t2 = time.monotonic()
            rc, text = ray_cli(c, ["down", "-y", str(cfg_path)], client, tmp_path / "down.log", timeout=300)
            TIMES["ray down"] = time.monotonic() - t2
            assert rc == 0, text[-6000:]
            assert not c.ray_left(0), f"Ray still runs on the head: {c.ray_left(0)}"
            # `ray down` does not reach the workers (the local provider only marks them terminated);
            # the worker's raylet exits by itself once it has lost the head for a minute.
            wait_until(
                "exit of the worker's raylet",
                lambda: not any(p.startswith("raylet") for p in c.ray_left(1)),
                150,
                poll=1,
                detail=lambda: f"raylet still runs on the worker: {c.ray_left(1)}",
            )
            left = c.ray_left(1)
            TIMES["ray down -> worker's raylet exited by itself"] = time.monotonic() - t2
            print(f"\nleft on the worker (the teardown kills them by namespace): {left}")
            TIMES["total (ray up to worker gone)"] = time.monotonic() - t0
    finally:
        print("\nmeasured: " + json.dumps({k: round(v, 1) for k, v in TIMES.items()}))
        shutil.rmtree(control, ignore_errors=True)
        try:
            control.parent.rmdir()
        except OSError:
            pass
