"""The stock configs that ship with mlctl, and ``-c NAME`` for them.

The repository keeps them in its top-level ``configs/`` (``demo.yaml``, ``paper.yaml``,
``proof.yaml``, ``cluster.yaml``, ``ablation/*.yaml``, ``deepspeed/*.yaml``); a wheel installs that
folder inside the package as ``mlctl.configs`` (pyproject.toml's ``package-dir``), read here through
:mod:`importlib.resources`. So ``mlctl train -c paper`` and ``mlctl demo`` work wherever mlctl is
installed, not only from a checkout.

A ``-c`` value is a path when that file exists (a path always wins); otherwise it names a stock
config: ``paper``, ``ablation/ml-ctl``, ``deepspeed/zero2``, also written ``paper.yaml`` or
``configs/paper.yaml`` as the docs' commands do. An unknown name is an error that lists the stock
names.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from mlctl.config import ConfigError

PACKAGE = "mlctl.configs"
SUFFIX = ".yaml"


def stock_dir() -> Path:
    """The folder of the stock configs this mlctl runs with.

    NOTE: in a source checkout (run through PYTHONPATH, or installed editable) that is the
    checkout's own ``configs/``, found beside the package before ``mlctl.configs`` is imported:
    another checkout's editable install on the same interpreter would otherwise answer for
    ``mlctl.configs`` with its own configs. An installed wheel is a folder on disk, so the resource
    is a real path that :func:`mlctl.config.load_config` can open."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs" / "__init__.py").is_file():
        return checkout / "configs"
    return Path(str(importlib.resources.files(PACKAGE)))


def stock_names() -> list[str]:
    """Every stock config's name: its path under the stock folder without ``.yaml``, sorted."""
    root = stock_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob(f"*{SUFFIX}"))


def stock_config(name: str) -> Path:
    """The file of the stock config ``name`` (``paper``, ``ablation/ml-ctl``, ``paper.yaml``,
    ``configs/paper.yaml``); :class:`~mlctl.config.ConfigError` listing the stock names when there
    is none of that name."""
    key = name.strip().removeprefix("./").removeprefix("configs/").removesuffix(SUFFIX)
    path = stock_dir() / f"{key}{SUFFIX}"
    if key and path.is_file():
        return path
    raise ConfigError(
        f"config {name!r} is neither a file nor a stock config; stock configs: {', '.join(stock_names())}"
    )


def config_path(name_or_path: str | Path) -> Path:
    """A ``-c`` value as a file: the path itself when it exists, else the stock config of that name."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    return stock_config(str(name_or_path))


def config_paths(values: list[str] | None) -> list[str | Path]:
    """:func:`config_path` of every ``-c`` value, in order (later files win when merged), typed as
    :func:`mlctl.config.load_config` takes them."""
    return [config_path(v) for v in values or []]
