"""Separate "hosts" on one machine for multi-node tests: one Linux network namespace per node.

Layout: a bridge in the root namespace, and per node a namespace holding one end of a veth pair
(named ``eth0`` inside) with an address from ``10.231.57.0/24`` and ``lo`` up. That subnet exists
only inside these namespaces (the bridge itself has no address and there is no default route), so
nothing a test starts can reach, or be reached from, any other network. Each node's processes see
their own ``127.0.0.1``: a loopback endpoint really is unreachable from the other nodes, as on real
hosts. The filesystem is shared, which stands in for the shared storage a cluster mounts.

Names carry a short prefix, the test process id and a counter (``mlt<pid>c<n>...``) so clusters of
concurrent test processes never collide, and a cluster left behind by a killed test process is
removed by the next one (:func:`sweep_stale`).

Every process started here runs with ``RAY_AUTH_MODE=token`` and the cluster's one
``RAY_AUTH_TOKEN`` (Ray 2.60 turns token auth on by itself when ``~/.ray/auth_token`` exists, and a
node without the token cannot join), ``GLOO_SOCKET_IFNAME=eth0`` (the hostname resolves to
127.0.0.1, so gloo would otherwise bind loopback) and ``RAY_ADDRESS`` of the head.

Teardown SIGKILLs every process of each namespace (``ip netns pids``) and the processes started
here, then deletes the namespaces, the bridge and the Ray temp folders. Never ``ray stop``: it stops
every Ray on the machine.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

SUBNET = "10.231.57"
PREFIX = "mlt"
RAY = Path(sys.executable).parent / "ray"
_counter = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_until(
    what: str,
    done: Callable[[], bool],
    timeout: float,
    poll: float = 0.2,
    detail: Callable[[], str] = lambda: "",
) -> float:
    """Poll ``done()`` every ``poll`` seconds until it is true; returns the seconds waited. Fails the
    test after ``timeout`` seconds, naming ``what`` it waited for, with ``detail()`` (logs, state)."""
    t0 = time.monotonic()
    while not done():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"no {what} within {timeout:.0f}s\n{detail()}")
        time.sleep(poll)
    return time.monotonic() - t0


def netns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []


def kill_netns(ns: str, timeout: float = 20.0) -> None:
    """SIGKILL every process in namespace ``ns`` until none is left (Ray respawns nothing once
    its raylet is gone, but a process may fork while we kill)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = netns_pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    raise RuntimeError(f"processes left in namespace {ns}: {netns_pids(ns)}")


def sweep_stale() -> None:
    """Remove namespaces and bridges of this helper whose creating process is gone."""
    pattern = re.compile(rf"^{PREFIX}(\d+)c\d+")
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = pattern.match(name)
        if m and not _pid_alive(int(m.group(1))):
            kill_netns(name)
            _ip("netns", "delete", name, check=False)
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        m = pattern.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _ip("link", "delete", name, check=False)


class NetnsCluster:
    """``nodes`` network namespaces on one bridge; node ``i`` has address ``10.231.57.(10+i)``.

    Use as a context manager (teardown also runs when the body raises). Skips the calling test
    when namespaces cannot be created here (not root, no ``ip``, or a sandbox without CAP_NET_ADMIN).
    """

    def __init__(self, nodes: int, root: Path | None = None):
        if not 1 <= nodes <= 200:
            raise ValueError(f"nodes must be in 1..200, got {nodes}")
        tag = f"{PREFIX}{os.getpid()}c{next(_counter)}"
        # NOTE: Linux interface names are at most 15 characters: "mlt" + pid (<= 7) + "c" + n + 1.
        self.tag = tag
        self.bridge = f"{tag}b"
        self.namespaces = [f"{tag}n{i}" for i in range(nodes)]
        self.ips = [f"{SUBNET}.{10 + i}" for i in range(nodes)]
        # Ray puts AF_UNIX sockets under its temp dir (107-byte path limit): keep it short.
        self.root = Path(root) if root else Path("/tmp") / tag
        self.token = secrets.token_hex(32)
        self.head_port = 6379
        self.started: list[subprocess.Popen] = []
        self._made: list[str] = []

    @property
    def address(self) -> str:
        """The head's GCS address (node 0)."""
        return f"{self.ips[0]}:{self.head_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for any process of the cluster (drivers included)."""
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "GLOO_SOCKET_IFNAME": "eth0",
            "RAY_ADDRESS": self.address,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        # NOTE: set by an embedded Ray in this process (launch() without an address): with it,
        # `ray start` refuses to join a second node.
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        env.update(extra)
        return env

    # ---- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> NetnsCluster:
        if shutil.which("ip") is None:
            pytest.skip("multi-node tests need `ip` (iproute2) to make network namespaces")
        sweep_stale()
        probe = _ip("netns", "add", self.namespaces[0], check=False)
        if probe.returncode != 0:
            pytest.skip(
                f"`ip netns add` is not permitted here ({probe.stderr.strip()}); needs root/CAP_NET_ADMIN"
            )
        self._made.append(self.namespaces[0])
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for i, ns in enumerate(self.namespaces):
            if ns not in self._made:
                _ip("netns", "add", ns)
                self._made.append(ns)
            veth = f"{self.tag}v{i}"
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.ips[i]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for p in self.started:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    p.kill()
        for ns in self._made:
            try:
                kill_netns(ns)
            finally:
                _ip("netns", "delete", ns, check=False)
        for p in self.started:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._made.clear()
        _ip("link", "delete", self.bridge, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- processes ---------------------------------------------------------------------------

    def cmd(self, node: int | None, argv: list) -> list[str]:
        """``argv`` run inside node ``node``; ``None``: on the machine itself, outside every node."""
        argv = [str(a) for a in argv]
        return argv if node is None else ["ip", "netns", "exec", self.namespaces[node], *argv]

    def run(
        self, node: int, argv: list[str], timeout: float = 300, **env: str
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` inside node ``node`` and wait; output captured."""
        return subprocess.run(
            self.cmd(node, argv), env=self.env(**env), capture_output=True, text=True, timeout=timeout
        )

    def popen(self, node: int | None, argv: list, log: Path, **env: str) -> subprocess.Popen:
        """Start ``argv`` inside node ``node`` (``None``: on the machine) in its own session, output
        to ``log``; the teardown kills it."""
        with open(log, "w") as f:
            p = subprocess.Popen(
                self.cmd(node, argv),
                env=self.env(**env),
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append(p)
        return p

    def daemon(
        self,
        node: int,
        argv: list,
        log: Path,
        *,
        setup: list[str] = (),
        ready: Callable[[], bool] | None = None,
        timeout: float = 30,
        **env: str,
    ) -> subprocess.Popen:
        """A server of node ``node`` (sshd, slurmd), started like :meth:`popen` in a private mount
        namespace of its own: the shell commands ``setup`` run there first (mounts that only this
        server and its children see, never the machine), then ``argv`` replaces the shell. Waits
        until ``ready()`` when given (failing the test with ``log`` after ``timeout`` seconds)."""
        script = " && ".join([*setup, f"exec {shlex.join(map(str, argv))}"])
        p = self.popen(
            node, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script], log, **env
        )
        if ready is not None:
            wait_until(
                f"{Path(str(argv[0])).name} ready on node {node}", ready, timeout, detail=log.read_text
            )
        return p

    def temp_dir(self, node: int) -> Path:
        """A fresh short Ray temp folder per `ray start` (a restarted node gets a new one)."""
        return self.root / f"r{node}-{next(_counter)}"

    def node_tmp(self, node: int) -> Path:
        """A temp folder of node ``node``'s own (its processes get it as TMPDIR when a test asks):
        what each host's /tmp is on a real cluster, where the filesystem is not shared."""
        path = self.root / f"tmp{node}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start_ray(self, node: int, num_cpus: int, **env: str) -> float:
        """``ray start`` on node ``node`` (the head when 0); returns the seconds it took. ``env``
        reaches the node's raylet and so every worker it starts."""
        argv = [
            str(RAY),
            "start",
            f"--node-ip-address={self.ips[node]}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--temp-dir={self.temp_dir(node)}",
            "--disable-usage-stats",
        ]
        if node == 0:
            argv += ["--head", f"--port={self.head_port}", "--include-dashboard=false"]
        else:
            argv += [f"--address={self.address}"]
        t0 = time.monotonic()
        out = self.run(node, argv, timeout=180, **env)
        if out.returncode != 0:
            raise RuntimeError(f"ray start on node {node} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        return time.monotonic() - t0

    def wait_for_nodes(self, count: int, timeout: float = 120) -> float:
        """Block until the head reports ``count`` alive nodes; returns the seconds waited."""
        probe = (
            "import ray; ray.init(address='auto', logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        t0 = time.monotonic()
        last = ""
        while time.monotonic() - t0 < timeout:
            out = self.run(0, [sys.executable, "-c", probe], timeout=60)
            last = out.stdout.strip().splitlines()[-1:] or [out.stderr[-500:]]
            if out.returncode == 0 and last[0] == str(count):
                return time.monotonic() - t0
            time.sleep(1)
        raise RuntimeError(f"cluster did not reach {count} alive nodes in {timeout}s (last: {last})")

    def ray_left(self, node: int) -> list[str]:
        """The Ray processes still running on node ``node`` (those `ray stop` would stop, and a
        blocking `ray start`), each as "name: start of its command line"."""
        import psutil

        left = []
        for proc in ray_processes(netns_pids(self.namespaces[node]), cli=True):
            try:
                left.append(f"{proc.name()}: {' '.join(proc.cmdline())[:160]}")
            except psutil.Error:
                pass
        return left

    def keep(self, dest: Path, *patterns: str) -> list[Path]:
        """Copy the files of the cluster folder that match ``patterns`` (globs relative to it) into
        ``dest``, named by their path there with "-" for "/": the teardown deletes the folder, and
        these are the logs that explain a failure. Returns the copies."""
        kept = []
        for pattern in patterns:
            for f in sorted(self.root.glob(pattern)):
                if f.is_file():
                    kept.append(Path(shutil.copy(f, dest / "-".join(f.relative_to(self.root).parts))))
        return kept

    def kill_node(self, node: int) -> list[int]:
        """SIGKILL every process of node ``node`` (its raylet, object store, workers): a node
        failure. Returns the pids that were killed."""
        pids = netns_pids(self.namespaces[node])
        kill_netns(self.namespaces[node])
        return pids


def is_ray_process(proc) -> bool:
    """Whether `ray stop` would stop this psutil process (it matches Ray's own list of names)."""
    from ray.autoscaler._private.constants import RAY_PROCESSES

    args = subprocess.list2cmdline(proc.cmdline())
    return any(word in (proc.name() if by_name else args) for word, by_name in RAY_PROCESSES)


def ray_processes(pids: list[int], cli: bool = False) -> list:
    """The Ray processes among ``pids`` (e.g. ``netns_pids(ns)``: the Ray of one node); with
    ``cli``, a `ray start` still running (``--block``) too."""
    import psutil

    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if pid == os.getpid():
                continue
            if is_ray_process(proc) or (cli and "ray start" in subprocess.list2cmdline(proc.cmdline())):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def ray_processes_here() -> list:
    """The Ray processes of the caller's network namespace."""
    own = os.readlink("/proc/self/ns/net")
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "ns" / "net") == own:
                pids.append(int(entry.name))
        except OSError:
            pass
    return ray_processes(pids)


def stop_ray_here(grace: float = 10.0) -> int:
    """`ray stop` for one namespace "host". The real one stops every Ray process of the machine, and
    the namespaces share the machine's process table: it would stop every other test's Ray too."""
    import psutil

    procs = ray_processes_here()
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return len(procs)


if __name__ == "__main__":
    # `python tests/netns.py stop-ray`: what the test hosts of tests/test_rayup_recipe.py run for `ray stop`.
    if sys.argv[1:] != ["stop-ray"]:
        sys.exit("usage: netns.py stop-ray")
    # Outside a namespace of this helper this would be the real `ray stop` (or another's): refuse.
    here = _ip("netns", "identify", str(os.getpid()), check=False).stdout.strip()
    if not here.startswith(PREFIX):
        sys.exit("netns.py stop-ray: not inside a test namespace (it would stop the machine's Ray)")
    print(f"stopped {stop_ray_here()} Ray processes in this network namespace")
