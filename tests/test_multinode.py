"""mlctl across real Ray nodes: each node is a network namespace with its own address (tests/netns.py).

One module-wide cluster of three namespaces: node 0 runs the Ray head and the driver
(`mlctl train --address`), node 1 a second Ray node, node 2 only a Prometheus server (a separate
host that must reach both nodes' workers over the network). Each Ray node offers one CPU, so the
two one-CPU workers are forced onto different nodes.

Compared with a one-node run of the same config (embedded Ray, two workers): the final weights must
be equal bitwise (CPU, fixed seeds, same world size; gloo's two-rank sum is exact in either order).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from netns import NetnsCluster
from ray_runs import ROOT, final_weights, meta, run_overrides, slow_steps
from s3_server import BUCKET, CREDENTIALS, Bucket

from mlctl.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.multinode]

MAX_STEPS = 8
EVERY = 4
# The launcher's failure callback (in Ray Train's controller) prints this for every worker-group failure.
FAILURE_SEEN = r"\[mlctl\] worker group failed"  # printed by the launcher's failure counter
TIMES: dict[str, float] = {}  # measured durations, printed at the end of the module (README numbers)


# This module's runs: 8 steps, checkpoints every 4, a log line per step, one worker per node.
METRICS_PORT = 9700
RUN = {
    "train.max_steps": MAX_STEPS,
    "train.log_every": 1,
    "checkpoint.every_steps": EVERY,
    "ray.cpus_per_worker": 1,
    # below Ray's default worker-port range (10002-19999): a Ray worker process on a node may hold
    # any port in it, and the rank would then serve on the next one (seen once: 19701 on node 1)
    "metrics.port": METRICS_PORT,
}


def overrides(model_dir: Path, shards: Path, **extra) -> list[str]:
    return run_overrides(model_dir, shards, **{**RUN, **extra})


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = final_weights(a_dir), final_weights(b_dir)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ from the one-node run: {different[:5]}"


def train_argv(cluster: NetnsCluster, storage: Path, name: str, model_dir, shards, **extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launcher.cli",
        "train",
        "--address",
        cluster.address,
        "--storage",
        str(storage),
        "--name",
        name,
        *overrides(model_dir, shards, **extra),
    ]


def wait_for(pattern: str, log: Path, proc, timeout: float) -> float:
    """Seconds until ``pattern`` (a regex) appears in ``log``; fails if ``proc`` exits first."""
    return wait_after(log, 0, time.monotonic(), pattern, proc, timeout)


def wait_after(log: Path, offset: int, t0: float, pattern: str, proc, timeout: float) -> float:
    """Seconds from ``t0`` until ``pattern`` appears in ``log`` past ``offset``; fails if ``proc``
    exits first."""
    rx = re.compile(pattern)
    while time.monotonic() - t0 < timeout:
        if rx.search(log.read_text(errors="replace")[offset:]):
            return time.monotonic() - t0
        if proc.poll() is not None:
            pytest.fail(f"driver exited ({proc.returncode}) before {pattern!r}:\n" + log.read_text()[-4000:])
        time.sleep(0.2)
    pytest.fail(f"no {pattern!r} within {timeout}s:\n" + log.read_text()[-4000:])


@pytest.fixture(scope="module")
def one_node_run(tmp_path_factory, tiny_model_dir, tiny_shards):
    """The reference: the same config on one node (embedded Ray in this process)."""
    from launcher.ray_train import launch

    storage = tmp_path_factory.mktemp("one_node")
    cfg = load_config(
        None, overrides(tiny_model_dir, tiny_shards, **{"ray.storage_path": storage, "ray.name": "ref"})
    )
    return launch(cfg)


# A moto S3 server on node 0's address: the object store of the tests that share no path.
S3_PORT = 9000


def node_env(cluster: NetnsCluster, node: int) -> dict[str, str]:
    """What every process of node ``node`` gets: its own temp folder (a host's /tmp is its own; a
    run whose storage is s3:// keeps its working folder there) and the store's credentials."""
    return {"TMPDIR": str(cluster.node_tmp(node)), **CREDENTIALS}


def s3_uri(cluster: NetnsCluster, prefix: str) -> str:
    return Bucket(BUCKET, S3_PORT, cluster.ips[0]).uri(prefix)


def start_node(cluster: NetnsCluster, node: int) -> float:
    return cluster.start_ray(node, num_cpus=1, **node_env(cluster, node))


def start_s3(cluster: NetnsCluster) -> None:
    """moto's server on node 0's address, with an empty bucket (created from inside node 0: the
    test process itself cannot reach the namespaces' subnet)."""
    moto = Path(sys.executable).parent / "moto_server"
    cluster.popen(0, [moto, "-H", cluster.ips[0], "-p", str(S3_PORT)], cluster.root / "moto.log")
    create = (
        "import sys, time, boto3\n"
        "for _ in range(100):\n"
        "    try:\n"
        f"        boto3.client('s3', endpoint_url=sys.argv[1]).create_bucket(Bucket='{BUCKET}'); break\n"
        "    except Exception:\n"
        "        time.sleep(0.2)\n"
        "else:\n"
        "    raise SystemExit('moto did not answer')\n"
    )
    out = cluster.run(
        0, [sys.executable, "-c", create, f"http://{cluster.ips[0]}:{S3_PORT}"], timeout=60, **CREDENTIALS
    )
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.fixture(scope="module")
def cluster():
    with NetnsCluster(3) as c:
        start_s3(c)
        TIMES["ray start, head"] = start_node(c, 0)
        TIMES["ray start, second node"] = start_node(c, 1)
        c.wait_for_nodes(2)
        yield c
    print("\nmeasured: " + json.dumps({k: round(v, 1) for k, v in TIMES.items()}))


PROM_QUERY = """
import json, sys, urllib.parse, urllib.request
url = sys.argv[1] + "/api/v1/query?" + urllib.parse.urlencode({"query": sys.argv[2]})
print(urllib.request.urlopen(url, timeout=5).read().decode())
"""


def prometheus_query(cluster: NetnsCluster, node: int, base: str, expr: str) -> list[dict]:
    """Run a PromQL query from inside ``node`` (the API listens only on that namespace's address)."""
    out = cluster.run(node, [sys.executable, "-c", PROM_QUERY, base, expr], timeout=30)
    assert out.returncode == 0, out.stderr[-2000:]
    answer = json.loads(out.stdout)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory, cluster, tiny_model_dir, tiny_shards):
    """The two-node run, with a real Prometheus on node 2 following the run's discovery file.

    Steps are slowed (the test-only fault hook's sleep) only so that Prometheus scrapes each worker several
    times; the sleep does not touch the numbers. `metrics.bind` keeps its default (127.0.0.1): on a
    networked node the workers must serve and advertise the node address instead.
    """
    from test_prometheus_server import scrape_config_for

    storage = tmp_path_factory.mktemp("two_node")
    prom = None
    binary = shutil.which("prometheus")
    prom_base = f"http://{cluster.ips[2]}:9090"
    if binary:
        config = storage.parent / "prometheus.yml"
        prom_cfg = scrape_config_for(storage)
        # NOTE: 2 s, not the 1 s of scrape_config_for: on a loaded 2-core machine a worker busy in
        # a step can miss a 1 s scrape timeout, and then that scrape records nothing.
        (job,) = [j for j in prom_cfg["scrape_configs"] if j["job_name"] == "mlctl"]
        job["scrape_interval"] = job["scrape_timeout"] = "2s"
        config.write_text(yaml.safe_dump(prom_cfg, sort_keys=False))
        prom = cluster.popen(
            2,
            [
                binary,
                f"--config.file={config}",
                f"--web.listen-address={cluster.ips[2]}:9090",
                f"--storage.tsdb.path={storage.parent / 'tsdb'}",
            ],
            storage.parent / "prometheus.log",
        )
    log = storage.parent / "driver.log"
    argv = train_argv(cluster, storage, "two", tiny_model_dir, tiny_shards)
    t0 = time.monotonic()
    driver = cluster.popen(0, argv, log, **slow_steps(1.5), **node_env(cluster, 0))
    TIMES["driver start -> first step logged"] = wait_for(r"step 1/", log, driver, timeout=400)
    driver.wait(timeout=400)
    TIMES["two-node run, total"] = time.monotonic() - t0
    text = log.read_text(errors="replace")
    assert driver.returncode == 0, text[-4000:]
    return {
        "run_dir": storage / "two",
        "log": text,
        "prometheus": prom,
        "prom_base": prom_base,
        "prom_log": storage.parent / "prometheus.log",
    }


def test_two_nodes_two_workers_match_a_one_node_run(cluster, two_node_run, one_node_run):
    text = two_node_run["log"]
    # The driver prints every rank's endpoint at the address of the node it runs on.
    placed = {ip: r for r, ip in re.findall(r"\[mlctl\] rank (\d) on \S+: metrics at http://([\d.]+):", text)}
    assert set(placed) == {cluster.ips[0], cluster.ips[1]}, text[-4000:]
    run_dir = two_node_run["run_dir"]
    endpoints = [json.loads(p.read_text()) for p in sorted((run_dir / "endpoints").glob("rank*.json"))]
    assert [e["rank"] for e in endpoints] == [0, 1]
    assert {e["host"] for e in endpoints} == {cluster.ips[0], cluster.ips[1]}
    assert len({e["node"] for e in endpoints}) == 2
    m = meta(run_dir)
    assert m["step"] == MAX_STEPS and m["restarts"] == 0
    assert_same_weights(one_node_run, run_dir)


def test_prometheus_scrapes_every_worker_on_both_nodes(cluster, two_node_run):
    if two_node_run["prometheus"] is None:
        pytest.skip("the `prometheus` binary is not on PATH (Debian/Ubuntu: apt-get install -y prometheus)")
    assert two_node_run["prometheus"].poll() is None, two_node_run["prom_log"].read_text()[-2000:]
    # Never a loopback address in what the run advertised.
    sd = json.loads((two_node_run["run_dir"] / "prometheus_sd.json").read_text())
    targets = sorted(t for entry in sd for t in entry["targets"])
    assert targets == sorted(f"{ip}:{METRICS_PORT}" for ip in cluster.ips[:2]), sd
    assert "is unreachable from other nodes; rank" in two_node_run["log"]
    # Prometheus (on a third host) scraped each worker through the discovery file while it ran.
    res = prometheus_query(
        cluster, 2, two_node_run["prom_base"], 'max_over_time(mlctl_train_steps_total{run="two"}[15m])'
    )
    scraped = {r["metric"]["instance"]: (r["metric"]["rank"], float(r["value"][1])) for r in res}
    assert sorted(scraped) == targets, res
    assert sorted(rank for rank, _ in scraped.values()) == ["0", "1"]
    assert all(steps >= 1 for _, steps in scraped.values()), scraped
    up = prometheus_query(cluster, 2, two_node_run["prom_base"], 'max_over_time(up{run="two"}[15m])')
    assert len(up) == 2 and all(float(r["value"][1]) == 1 for r in up), up


def test_node_failure_waits_for_the_node_and_resumes_to_the_same_weights(
    tmp_path, cluster, one_node_run, tiny_model_dir, tiny_shards
):
    """SIGKILL every process of node 1 (raylet, object store, its worker) after the first
    checkpoint; the run waits for two CPUs, node 1 rejoins, and training resumes from the checkpoint
    and ends where the one-node run ends."""
    storage = tmp_path / "runs"
    log = tmp_path / "driver.log"
    argv = train_argv(cluster, storage, "fail", tiny_model_dir, tiny_shards)
    # Slowed steps leave time to kill the node between the checkpoint at step 4 and the end.
    driver = cluster.popen(0, argv, log, **slow_steps(1.0), **node_env(cluster, 0))
    latest = storage / "fail" / "checkpoints" / "latest"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and not latest.exists():
        if driver.poll() is not None:
            pytest.fail("driver exited before the first checkpoint:\n" + log.read_text()[-4000:])
        time.sleep(0.1)
    assert latest.read_text().strip() == f"step_{EVERY:08d}"
    killed = cluster.kill_node(1)
    t_kill = time.monotonic()
    offset = len(log.read_text(errors="replace"))
    assert killed, "node 1 had no processes"

    def after_kill(pattern: str, timeout: float) -> float:
        return wait_after(log, offset, t_kill, pattern, driver, timeout)

    TIMES["node kill -> failure in driver log"] = after_kill(FAILURE_SEEN, timeout=120)
    # The run must wait for the node (two workers, one CPU per node) rather than end.
    time.sleep(3)
    assert driver.poll() is None, "the driver gave up instead of waiting:\n" + log.read_text()[-4000:]
    t_back = time.monotonic()
    start_node(cluster, 1)
    TIMES["node restart (ray start)"] = time.monotonic() - t_back
    TIMES["node restart -> resumed from checkpoint"] = after_kill(r"resumed from", timeout=400) - (
        t_back - t_kill
    )
    driver.wait(timeout=400)
    text = log.read_text(errors="replace")
    assert driver.returncode == 0, text[-4000:]
    run_dir = storage / "fail"
    m = meta(run_dir)
    assert m["step"] == MAX_STEPS and m["restarts"] == 1, m
    assert f"step_{EVERY:08d}" in text[offset:].split("resumed from", 1)[1].splitlines()[0]
    assert_same_weights(one_node_run, run_dir)


def test_elastic_run_continues_on_the_surviving_node(tmp_path, cluster, tiny_model_dir, tiny_shards):
    """`ray.num_workers=[1, 2]`: when node 1 dies the run does not wait for it; Ray Train restarts
    the worker group with the one worker that fits, it resumes from the checkpoint and says so.
    (ZeRO-0: an elastic run must be able to load a checkpoint written by another number of ranks.)
    The epoch goes on where the two ranks had got to: no pair is seen twice, none is skipped."""
    storage = tmp_path / "runs"
    log = tmp_path / "driver.log"
    argv = train_argv(
        cluster,
        storage,
        "elastic",
        tiny_model_dir,
        tiny_shards,
        **{"ray.num_workers": "[1,2]", "deepspeed.zero_stage": 0, "train.log_pair_ids": "true"},
    )
    driver = cluster.popen(0, argv, log, **slow_steps(1.0), **node_env(cluster, 0))
    latest = storage / "elastic" / "checkpoints" / "latest"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and not latest.exists():
        if driver.poll() is not None:
            pytest.fail("driver exited before the first checkpoint:\n" + log.read_text()[-4000:])
        time.sleep(0.1)
    assert "elastic: training on 2 worker(s)" in log.read_text(errors="replace")
    offset = len(log.read_text(errors="replace"))
    assert cluster.kill_node(1), "node 1 had no processes"
    t_kill = time.monotonic()
    # Node 1 stays down.
    TIMES["elastic: node kill -> restarted on one worker"] = wait_after(
        log, offset, t_kill, r"elastic: training on 1 worker", driver, timeout=300
    )
    TIMES["elastic: node kill -> resumed from checkpoint"] = wait_after(
        log, offset, t_kill, r"resumed from", driver, timeout=300
    )
    driver.wait(timeout=400)
    TIMES["elastic: node kill -> run finished on one node"] = time.monotonic() - t_kill
    text = log.read_text(errors="replace")
    assert driver.returncode == 0, text[-4000:]
    after = text.split("elastic: training on 2 worker(s)", 1)[1]
    assert "elastic: training on 1 worker(s)" in after, text[-4000:]
    assert re.search(r"resumed from \S+step_\d+", after), text[-4000:]
    m = meta(storage / "elastic")
    assert m["step"] == MAX_STEPS and m["restarts"] == 1 and m["world_size"] == 1, m
    resumed_at = int(re.search(r"resumed from \S+step_(\d+)", after).group(1))
    assert_no_replay(storage / "elastic", tiny_shards, resumed_at)
    # Restore the second node for anything that runs after this test.
    start_node(cluster, 1)


def assert_no_replay(run_dir: Path, shards: Path, resumed_at: int) -> None:
    """The pairs the run trained on (two ranks up to the checkpoint, then one rank) are exactly what
    the loader gives for a 2 -> 1 resize at that step: the old ranks' batches, then the rest of their
    epoch re-split, with no pair twice and none skipped."""
    from mlctl.data.dataset import ShardLoader

    logged: dict[tuple[int, int], list[str]] = {}
    for f in sorted((run_dir / "pair_ids").glob("rank*.jsonl")):
        rank = int(f.stem[4:])
        for rec in records(f):
            # the first attempt's steps past the checkpoint were redone by the second
            if rec["restarts"] == 0 and rec["step"] <= resumed_at or rec["restarts"] == 1:
                logged[(rank, rec["step"])] = rec["pair_ids"]
    kw = dict(batch_size=4, shuffle_buffer=16, bucket_by_length=True, seed=0)
    old = [ShardLoader(shards, rank=r, world_size=2, **kw) for r in range(2)]
    expected = {}
    for r, loader in enumerate(old):
        it = iter(loader)
        for step in range(1, resumed_at + 1):
            expected[(r, step)] = next(it)["pair_ids"]
        loader.close()
    new = ShardLoader(shards, rank=0, world_size=1, **kw)
    new.load_resized_state([loader.state_dict() for loader in old])
    it = iter(new)
    for step in range(resumed_at + 1, MAX_STEPS + 1):
        expected[(0, step)] = next(it)["pair_ids"]
    new.close()
    assert logged == expected
    seen = [p for ids in logged.values() for p in ids]
    assert len(seen) == len(set(seen)), "a pair was trained twice within the epoch"


FETCH = """
import sys, pyarrow.fs as pafs
fs, base = pafs.FileSystem.from_uri(sys.argv[1])
with fs.open_input_stream(base + "/" + sys.argv[2]) as src, open(sys.argv[3], "wb") as out:
    out.write(src.read())
"""


def fetch_from_s3(cluster: NetnsCluster, uri: str, key: str, dest: Path) -> Path:
    """Copy one object out of the store (from node 0: only the namespaces reach it)."""
    out = cluster.run(0, [sys.executable, "-c", FETCH, uri, key, str(dest)], timeout=60, **CREDENTIALS)
    assert out.returncode == 0, out.stderr[-2000:]
    return dest


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_no_shared_path_prepare_train_and_node_loss_through_s3(
    tmp_path, cluster, one_node_run, tiny_model_dir
):
    """The cluster shares no path the run writes: prepare writes the shards to S3, training streams
    them from S3 and checkpoints to S3, each node keeps its working folder in its own temp folder,
    and the driver learns everything through Ray. SIGKILL node 1 after a checkpoint, bring it back:
    the run resumes from the store and ends with the one-node run's weights."""
    shards = s3_uri(cluster, "shards")
    runs = s3_uri(cluster, "runs")
    prep = (
        "import sys; sys.path.insert(0, sys.argv[3])\n"
        "from fixture_data import prepare_fixture_shards\n"
        "prepare_fixture_shards(sys.argv[1], sys.argv[2])\n"
    )
    t0 = time.monotonic()
    out = cluster.run(
        0,
        [sys.executable, "-c", prep, shards, str(tiny_model_dir), str(ROOT / "tests")],
        **node_env(cluster, 0),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    TIMES["s3: prepare to the store"] = time.monotonic() - t0

    log = tmp_path / "driver.log"
    argv = train_argv(cluster, Path("unused"), "s3two", tiny_model_dir, "unused")
    argv[argv.index("--storage") + 1] = runs
    argv = [a if not a.startswith("data.shards=") else f"data.shards={shards}" for a in argv]
    driver = cluster.popen(0, argv, log, **slow_steps(1.0), **node_env(cluster, 0))
    # The driver keeps rank 0's records on its own node (the workers' folders are on theirs), and
    # says when a checkpoint is committed to the store (what a restart gets back).
    driver_records = cluster.node_tmp(0) / "mlctl-runs" / "s3two" / "metrics.jsonl"
    wait_for(rf"checkpoint at step {EVERY} saved: ", log, driver, timeout=400)
    offset = len(log.read_text(errors="replace"))
    assert cluster.kill_node(1), "node 1 had no processes"
    t_kill = time.monotonic()
    TIMES["s3: node kill -> failure in driver log"] = wait_after(
        log, offset, t_kill, FAILURE_SEEN, driver, 120
    )
    t_back = time.monotonic()
    start_node(cluster, 1)
    TIMES["s3: node restart -> resumed from the store"] = wait_after(
        log, offset, t_kill, r"resumed from \S+restored/step_00000004 at step 4", driver, 400
    ) - (t_back - t_kill)
    driver.wait(timeout=400)
    text = log.read_text(errors="replace")
    assert driver.returncode == 0, text[-4000:]
    assert "finished; 1 worker failure(s) recovered" in text
    # both workers' endpoints reached the driver through the control actor, not a shared folder
    placed = set(re.findall(r"metrics at http://([\d.]+):", text))
    assert placed == {cluster.ips[0], cluster.ips[1]}, text[-4000:]
    assert [r["step"] for r in records(driver_records) if r.get("event") == "train"][-1] == MAX_STEPS

    weights = fetch_from_s3(
        cluster,
        runs,
        f"s3two/step_{MAX_STEPS:08d}/engine/state/mp_rank_00_model_states.pt",
        tmp_path / "w.pt",
    )
    mine = torch.load(weights, map_location="cpu", weights_only=False)["module"]
    ref = final_weights(one_node_run)
    different = [k for k in ref if not torch.equal(ref[k], mine[k])]
    assert not different, f"weights differ from the one-node run after a node loss over S3: {different[:5]}"

    # Each node worked in its own folder, and left no staged checkpoint nor downloaded copy behind.
    folders = [cluster.node_tmp(n) / "mlctl-runs" / "s3two" for n in (0, 1)]
    for folder in folders:
        assert sorted(p.name for p in (folder / "logs").glob("rank*.log")), folder
        assert not [p for p in (folder / "checkpoints").glob("*step_*")], folder
        assert not any((folder / "restored").glob("*")) if (folder / "restored").exists() else True
    # After the restart each rank downloaded what it loads: the shared files once per node, and
    # its own optimizer shard only.
    downloads = {}
    for folder in folders:
        for rank_log in (folder / "logs").glob("rank*.log"):
            for m in re.finditer(r"rank (\d) downloaded (.+?) from ", rank_log.read_text()):
                downloads[int(m.group(1))] = set(m.group(2).split(", "))
    assert sorted(downloads) == [0, 1], downloads
    for rank, files in downloads.items():
        shards_seen = {f for f in files if "zero_pp_rank_" in f}
        assert shards_seen == {f"engine/state/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"}, files
        assert {"meta.json", "engine/state/mp_rank_00_model_states.pt"} <= files, files
