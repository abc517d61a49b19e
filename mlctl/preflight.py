"""Cheap checks of a verb's input files and output paths, made before anything slow (loading a
model takes seconds to minutes): a wrong path should not cost that wait, nor a finished evaluation
be lost because its report cannot be written."""

from __future__ import annotations

import os
from pathlib import Path


def check_input_file(path: str | Path, what: str) -> Path:
    """``path`` is a file this process can read; FileNotFoundError / PermissionError naming it."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} is not a file")
    if not os.access(p, os.R_OK):
        raise PermissionError(f"{what} {p} is not readable (permission denied)")
    return p


def check_new_folder(path: str | Path) -> Path:
    """``path`` can become a new folder's: absent, or an empty folder; otherwise ValueError."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"{p} exists and is not a folder; choose a new folder")
        if any(p.iterdir()):
            raise ValueError(f"{p} exists and is not empty; choose a new folder")
        _check_can_write(p, p)
        return p
    _check_can_write(p, _nearest_existing(p))
    return p


def check_output_file(path: str | Path) -> Path:
    """``path`` can be written as a file: not a folder, and its folder exists or can be made."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p} is a folder; give a file name for the report")
    if p.exists():
        _check_can_write(p, p)
    else:
        _check_can_write(p, _nearest_existing(p.parent))
    return p


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_can_write(target: Path, where: Path) -> None:
    """ValueError unless ``target`` can be created or written at ``where`` (itself, or the existing
    folder it would be made in)."""
    if where != target and not where.is_dir():
        raise ValueError(f"cannot write {target}: {where} is not a folder")
    if os.access(where, os.W_OK | (os.X_OK if where.is_dir() else 0)):
        return
    # NOTE: root passes os.access on any local folder except a read-only mount; say which it is.
    read_only = bool(os.statvfs(where).f_flag & os.ST_RDONLY)
    why = "is on a read-only file system" if read_only else "is not writable (permission denied)"
    raise ValueError(f"cannot write {target}: {where} {why}")
