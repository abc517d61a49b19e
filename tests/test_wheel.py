"""What `pip install mlctl` gets: the wheel, built from a copy of the source tree (nothing is written
into the checkout) and installed with ``--no-deps`` into a fresh venv outside it. The dependencies
are this interpreter's: one ``.pth`` line puts its site-packages on the new venv's path, and since a
folder named in a ``.pth`` file does not have its own ``.pth`` files run, the checkout's editable
install (``__editable__*.pth``) stays inactive there; ``import mlctl`` comes from the wheel, which
each test asserts. Everything runs from an empty folder, with no PYTHONPATH, and starts no Ray.

``python -m build`` is not installed here and the build backend cannot be fetched offline, so the
wheel is ``pip wheel --no-build-isolation`` with this interpreter's setuptools.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a wheel build, two venvs and a few fresh interpreters: ~1 min

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ("pyproject.toml", "README.md", "mlctl", "launcher", "configs")


def _copy_source(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in SOURCE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst / name)
    return dst


def _pip(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _fresh_venv(where: Path) -> Path:
    """A venv without pip whose site-packages also sees this interpreter's (the dependencies)."""
    venv.EnvBuilder(with_pip=False).create(where)
    python = where / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "_mlctl_test_deps.pth").write_text("".join(p + "\n" for p in site.getsitepackages()))
    return python


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


PROBE = """
import importlib.resources, json, sys
import launcher, mlctl
from launcher.demo import config_files
from mlctl.stock import stock_config, stock_dir, stock_names
print(json.dumps({
    "mlctl": mlctl.__file__,
    "launcher": launcher.__file__,
    "resources": str(importlib.resources.files("mlctl.configs")),
    "stock_dir": str(stock_dir()),
    "names": stock_names(),
    "paper": str(stock_config("paper")),
    "demo_default": [str(p) for p in config_files(None)],
}))
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    src = _copy_source(tmp_path_factory.mktemp("source"))
    dist = tmp_path_factory.mktemp("dist")
    _pip("wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), "-q")
    (wheel,) = dist.glob("mlctl-*.whl")
    return wheel


def test_the_wheel_holds_every_package_and_the_stock_configs(built):
    names = set(zipfile.ZipFile(built).namelist())
    packages = [
        p.parent.relative_to(ROOT) for pkg in ("mlctl", "launcher") for p in (ROOT / pkg).rglob("__init__.py")
    ]
    missing = [str(p) for p in packages if f"{p.as_posix()}/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel (pyproject.toml's packages list): {missing}"
    configs = [p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml")]
    assert {"demo.yaml", "paper.yaml", "proof.yaml", "cluster.yaml"} <= set(configs)
    assert {f"mlctl/configs/{c}" for c in configs} <= names
    assert not [n for n in names if n.startswith(("configs/", "tests/"))]


def test_the_installed_wheel_runs_with_its_own_stock_configs(built, tmp_path):
    python = _fresh_venv(tmp_path / "venv")
    _pip("--python", str(python), "install", "--no-deps", "--no-index", "-q", str(built))
    work = tmp_path / "elsewhere"
    work.mkdir()
    installed = tmp_path / "venv"

    probe = _run([str(python), "-c", PROBE], work)
    assert probe.returncode == 0, probe.stderr
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    print(json.dumps(got, indent=1))
    for key in ("mlctl", "launcher", "resources", "stock_dir", "paper"):
        assert Path(got[key]).is_relative_to(installed), (key, got[key])
    package_configs = Path(got["mlctl"]).parent / "configs"
    assert Path(got["stock_dir"]) == Path(got["resources"]) == package_configs
    assert got["demo_default"] == [str(package_configs / "demo.yaml")]
    assert {"demo", "paper", "proof", "cluster", "ablation/ml-ctl", "deepspeed/zero2"} <= set(got["names"])

    helped = _run([str(installed / "bin" / "mlctl"), "--help"], work)
    assert helped.returncode == 0, helped.stderr
    assert all(v in helped.stdout for v in ("prepare", "train", "eval", "export", "stop", "demo"))
    print(helped.stdout)

    # A verb that reads a stock config by name and stops, before Ray, at the first thing the
    # config points to that is not here: paper.yaml's shards.
    train = _run([str(installed / "bin" / "mlctl"), "train", "-c", "paper", "-c", "deepspeed/zero2"], work)
    print(train.stdout, train.stderr)
    assert train.returncode == 2, train.stdout + train.stderr
    assert train.stderr.strip().splitlines()[-1] == (
        "mlctl train: error: no manifest.json in /shared/un6way-shards: run `mlctl prepare` first"
    )
    demo_help = _run([str(installed / "bin" / "mlctl"), "demo", "--help"], work)
    assert demo_help.returncode == 0 and "stock config demo" in " ".join(demo_help.stdout.split())


def test_an_editable_install_finds_the_stock_configs(tmp_path):
    src = _copy_source(tmp_path / "checkout")
    python = _fresh_venv(tmp_path / "venv")
    _pip(
        "--python",
        str(python),
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-e",
        str(src),
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    probe = _run([str(python), "-c", PROBE], work)
    assert probe.returncode == 0, probe.stderr
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(got["mlctl"]) == src / "mlctl" / "__init__.py"
    # importlib.resources through the editable install's mapping, and the resolver, agree
    assert Path(got["resources"]) == Path(got["stock_dir"]) == src / "configs"
    assert Path(got["paper"]) == src / "configs" / "paper.yaml"
