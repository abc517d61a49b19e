"""`cluster/Dockerfile`, built for real by a Docker daemon, and the image run.

The build uses the host's network (`--network=host`) and the package sources this machine uses:
apt inside the image reads the base image's sources, pip gets the PyPI index from the build's
environment, and the local wheels this machine installs torch from (pip's `find-links`, e.g. the
CPU build of torch) are served to the build over HTTP on 127.0.0.1, with a constraint that pins
torch to the version installed here. `MLCTL_DOCKER_BASE` names the FROM image (default:
`python:3.11-slim`, which needs a registry); without a registry, a `docker import` of a Debian
debootstrap does (cluster/README.md has the commands).

Runs in `make test-cluster` (MLCTL_TEST_CLUSTER=1); skipped without a reachable Docker daemon or
without the base image, with the reason.
"""

from __future__ import annotations

import configparser
import functools
import http.server
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
BASE = os.environ.get("MLCTL_DOCKER_BASE", "python:3.11-slim")
IMAGE = "mlctl-test:latest"


def docker(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *argv], capture_output=True, text=True, timeout=timeout)


def find_links_dirs() -> list[Path]:
    """Local folders pip takes wheels from here: PIP_FIND_LINKS, then the pip config files."""
    values = os.environ.get("PIP_FIND_LINKS", "").split()
    parser = configparser.ConfigParser()
    parser.read(
        [
            "/etc/pip.conf",
            "/etc/xdg/pip/pip.conf",
            os.path.expanduser("~/.pip/pip.conf"),
            os.path.expanduser("~/.config/pip/pip.conf"),
        ]
    )
    values += parser.get("global", "find-links", fallback="").split()
    dirs = [Path(v.removeprefix("file://")) for v in values if "://" not in v or v.startswith("file://")]
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


@pytest.fixture
def wheel_server(tmp_path):
    """http://127.0.0.1:PORT/: this machine's local wheels (links) and a constraints file pinning
    torch to the installed version, so the image gets the same torch build."""
    import torch

    served = tmp_path / "wheels"
    served.mkdir()
    for d in find_links_dirs():
        for whl in d.glob("*.whl"):
            if not (served / whl.name).exists():
                (served / whl.name).symlink_to(whl)
    torch_version = torch.__version__.split("+")[0]
    (served / "constraints.txt").write_text(f"torch=={torch_version}\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", torch_version
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(os.environ.get("MLCTL_TEST_CLUSTER") != "1", reason="run by `make test-cluster`")
def test_dockerfile_builds_and_the_image_runs_mlctl(wheel_server):
    if shutil.which("docker") is None:
        pytest.skip("no `docker` command")
    info = docker("info", "--format", "{{.ServerVersion}}")
    if info.returncode != 0:
        pytest.skip(f"no Docker daemon reachable (`docker info`: {info.stderr.strip()[-300:]})")
    if docker("image", "inspect", BASE).returncode != 0:
        pulled = docker("pull", BASE, timeout=600)
        if pulled.returncode != 0:
            pytest.skip(
                f"base image {BASE} not available ({pulled.stderr.strip()[-300:]}); set MLCTL_DOCKER_BASE "
                "to a local image (cluster/README.md: a debootstrap + `docker import`)"
            )
    url, torch_version = wheel_server
    pip_args = {
        "PIP_FIND_LINKS": url,
        "PIP_CONSTRAINT": url + "constraints.txt",
        # Only network indexes reach the build; file:// ones are this machine's folders.
        "PIP_INDEX_URL": os.environ.get("PIP_INDEX_URL", ""),
    }
    build_args = [f"--build-arg={k}={v}" for k, v in pip_args.items() if v]
    t0 = time.monotonic()
    out = subprocess.run(
        ["docker", "build", "--network=host", "-f", "cluster/Dockerfile", "-t", IMAGE,
         f"--build-arg=BASE={BASE}", f"--build-arg=TORCH_SPEC=torch=={torch_version}", *build_args, "."],
        cwd=ROOT, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    build_s = time.monotonic() - t0
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    print(f"\nmeasured: docker build {build_s:.0f}s (base {BASE})")
    # One container for every check: with the vfs storage driver each one copies the whole image.
    # Ray from the image's venv, first on PATH, is what the KubeRay manifest runs in the pods.
    checks = (
        "python -c 'import mlctl, ray, deepspeed, torch; "
        "print(torch.__version__, ray.__version__, deepspeed.__version__)' && command -v ray && mlctl --help"
    )
    try:
        t0 = time.monotonic()
        out = docker("run", "--rm", "--network=none", IMAGE, "sh", "-c", checks, timeout=900)
        run_s = time.monotonic() - t0
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        # DeepSpeed prints its accelerator warning on stdout.
        versions, ray_path, *usage = [x for x in out.stdout.splitlines() if "[WARNING]" not in x]
        assert versions.split()[0].startswith(torch_version), versions
        assert ray_path == "/opt/mlctl/.venv/bin/ray", ray_path
        for verb in ("prepare", "train", "eval", "export"):
            assert any(line.strip().startswith(verb) for line in usage), out.stdout
        print(f"measured: docker run {run_s:.0f}s; image torch, ray, deepspeed: {versions}")
    finally:
        docker("image", "rm", "-f", IMAGE, timeout=300)
