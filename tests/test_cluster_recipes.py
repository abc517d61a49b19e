"""Static checks of the cluster recipes (no Slurm, SSH hosts, Kubernetes or Docker daemon in `make
test`): they parse, and they agree with each other and with how mlctl serves metrics. What these do
NOT prove is written in cluster/README.md. The Ray commands and flags run in tests/test_multinode.py;
`make test-cluster` runs slurm.sbatch (tests/test_slurm_recipe.py) and ray-cluster.yaml
(tests/test_rayup_recipe.py) for real."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


def test_slurm_script_is_valid_bash_and_waits_for_nodes():
    bash = shutil.which("bash")
    out = subprocess.run([bash, "-n", str(CLUSTER / "slurm.sbatch")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = (CLUSTER / "slurm.sbatch").read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    assert "--requeue" in directives and any(d.startswith("--signal=B:USR1@") for d in directives)
    # The trap stops the driver and every node's Ray before it requeues (tests/test_slurm_recipe.py runs it).
    assert "trap requeue USR1" in text and "scontrol requeue" in text and "stop_ray" in text
    assert 'source "$VENV/bin/activate"' in text
    for flag in ("--num-cpus=", "--num-gpus=", "--node-ip-address=", "--temp-dir="):
        assert flag in text, flag
    assert "RAY_AUTH_TOKEN" in text and "RAY_AUTH_MODE=token" in text
    assert not re.search(r"^\s*sleep \d+\s*$", text, flags=re.M), "wait for nodes, not a fixed sleep"


def test_ray_up_config_uses_the_venv_and_ray_exec():
    text = (CLUSTER / "ray-cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["provider"]["type"] == "local"
    env = ". ~/.mlctl/ray-cluster.env && "
    for cmd in cfg["setup_commands"] + cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        # ssh passes no environment: every command reads the cluster's settings first.
        assert cmd.startswith(env), cmd
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert cmd[len(env) :].startswith('"$MLCTL_DIR/.venv/bin/ray" '), cmd
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if " start " in c]
    assert len(starts) == 2 and all(c.endswith(" $MLCTL_RAY_START_ARGS") for c in starts), starts
    assert "--address=$RAY_HEAD_IP:6379" in starts[1]
    # The env file and the token reach every host (the head's autoscaler copies them on to workers).
    assert cfg["file_mounts"]["~/.mlctl/ray-cluster.env"] == "cluster/ray-cluster.env"
    assert "~/.mlctl/ray_auth_token" in cfg["file_mounts"]
    assert "ray submit" not in re.sub(r"\(`ray submit`[^)]*\)", "", text)
    assert "ray exec cluster/ray-cluster.yaml '. ~/.mlctl/ray-cluster.env && " in text


def test_ray_up_env_file_sets_token_auth_and_the_node_address(tmp_path):
    env = CLUSTER / "ray-cluster.env"
    bash = shutil.which("bash")
    assert subprocess.run([bash, "-n", str(env)], capture_output=True).returncode == 0
    show = (
        'echo "$MLCTL_DIR|$RAY_AUTH_MODE|$RAY_AUTH_TOKEN_PATH|${GLOO_SOCKET_IFNAME:-}|$MLCTL_RAY_START_ARGS"'
    )

    def run(**variables: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [bash, "-c", f". {env} && {show}"],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path), **variables},
        )

    def source(**variables: str) -> list[str]:
        out = run(**variables)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split("|")

    assert source() == [f"{tmp_path}/mlctl", "token", f"{tmp_path}/.mlctl/ray_auth_token", "", ""]
    # What a host's ~/.bashrc exported is kept; an interface adds this host's address on it.
    got = source(MLCTL_DIR="/opt/mlctl", MLCTL_IFACE="lo", MLCTL_RAY_START_ARGS="--num-gpus=4")
    assert got[0] == "/opt/mlctl" and got[3] == "lo"
    assert got[4].split() == ["--node-ip-address=127.0.0.1", "--num-gpus=4"]
    out = run(MLCTL_IFACE="no-such-if0")
    assert out.returncode != 0 and "MLCTL_IFACE=no-such-if0" in out.stderr


def test_kuberay_manifest_matches_the_dockerfile_and_scrapes_every_rank():
    job, monitor = yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text())
    docker = (CLUSTER / "Dockerfile").read_text()
    built = re.search(r"-t (\S+) \.", docker).group(1)
    spec = job["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == built, (container["image"], built)
        shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm, f"{container['name']}: /dev/shm is not sized"
        vol = next(v for v in pod["volumes"] if v["name"] == shm[0]["name"])
        assert vol["emptyDir"]["medium"] == "Memory" and vol["emptyDir"]["sizeLimit"]
    # Every rank of a worker pod (one per GPU) serves on 9400 + local rank; each port is declared and
    # scraped.
    (workers,) = spec["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    ranks = int(container["resources"]["limits"]["nvidia.com/gpu"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"] if p["name"].startswith("mlctl-")}
    assert sorted(ports.values()) == [9400 + r for r in range(ranks)]
    scraped = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert set(ports) <= scraped
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= workers["template"]["metadata"]["labels"].items()
    )
    replicas = workers["replicas"]
    assert f"--num-workers {replicas * ranks}" in job["spec"]["entrypoint"]


def test_kuberay_pods_save_before_they_go_and_share_no_disk():
    """Every pod's preStop hook asks the run to stop (save at its step) and waits for the save,
    inside the pod's grace period; the job is retried to resume; nothing mounts a shared volume."""
    from launcher.stop import add_arguments

    job, _ = yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text())
    spec = job["spec"]
    assert spec["backoffLimit"] >= 1
    assert "s3://" in spec["entrypoint"] and "--storage s3://" in spec["entrypoint"]
    groups = [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        hook = container["lifecycle"]["preStop"]["exec"]["command"]
        assert hook[:3] == ["mlctl", "stop", "--all"], hook
        # the hook's wait must end before Kubernetes kills the pod
        parser = __import__("argparse").ArgumentParser()
        add_arguments(parser)
        waited = parser.parse_args(hook[2:]).wait
        assert 0 < waited < pod["terminationGracePeriodSeconds"], (
            waited,
            pod["terminationGracePeriodSeconds"],
        )
        assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v], "a shared volume is mounted"
