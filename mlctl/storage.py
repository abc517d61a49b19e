"""Paths that may be object-store URIs: one convention for shards, checkpoints and run storage.

A location is either a local path or a URI that ``pyarrow.fs.FileSystem.from_uri`` understands,
the same form Ray Train takes for ``ray.storage_path``::

    s3://bucket/prefix?endpoint_override=10.0.0.1:9000&scheme=http&region=us-east-1
    gs://bucket/prefix

The query string (endpoint, scheme, region) belongs to the whole location: :func:`join` keeps it on
every child, so ``join("s3://b/p?x=1", "shard-000000.tar")`` is ``s3://b/p/shard-000000.tar?x=1``.
Credentials come from the environment as usual for each store (``AWS_ACCESS_KEY_ID``, ...).

Reading goes through WebDataset's URL opening: :func:`register_gopen` adds these schemes to
``webdataset.gopen.gopen_schemes``, so ``webdataset.gopen(url)`` streams an object as it would a
``pipe:`` or an ``http`` URL. Nothing here downloads a whole corpus to local disk.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

# Schemes pyarrow opens natively; a URI with another scheme (http:, pipe:) is left to WebDataset.
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")


def is_remote(location: str | Path) -> bool:
    """True for an object-store URI (``s3://...``), False for a local path or ``file://``."""
    scheme = urlsplit(str(location)).scheme
    return scheme in OBJECT_STORE_SCHEMES


def join(base: str | Path, *names: str) -> str:
    """``base`` / ``names``, keeping a URI's query string at the end."""
    if not is_remote(base):
        return str(Path(base).joinpath(*names))
    parts = urlsplit(str(base))
    path = "/".join([parts.path.rstrip("/"), *(n.strip("/") for n in names)])
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def display(location: str | Path) -> str:
    """The location without its query string (endpoints and regions are noise in messages)."""
    if not is_remote(location):
        return str(location)
    parts = urlsplit(str(location))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


@functools.lru_cache(maxsize=32)
def _filesystem(pid: int, scheme: str, netloc: str, query: str) -> Any:
    # NOTE: cached per process: a DataLoader worker forked after the parent used a store would
    # otherwise share the parent's client, and with it its pooled keep-alive connections.
    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri(urlunsplit((scheme, netloc, "/", query, "")))
    return fs


def filesystem(location: str | Path) -> tuple[Any, str]:
    """``(pyarrow filesystem, path inside it)`` for a URI; a local filesystem for a plain path."""
    if not is_remote(location):
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    parts = urlsplit(str(location))
    fs = _filesystem(os.getpid(), parts.scheme, parts.netloc, parts.query)
    return fs, f"{parts.netloc}{parts.path}".rstrip("/")


def open_input(location: str | Path) -> IO[bytes]:
    """A readable binary stream (local file or object)."""
    if not is_remote(location):
        return open(location, "rb")
    fs, path = filesystem(location)
    try:
        return fs.open_input_stream(path)
    except OSError as e:
        raise _not_found(location, e) from e


def read_bytes(location: str | Path) -> bytes:
    with open_input(location) as f:
        return f.read()


def read_text(location: str | Path, encoding: str = "utf-8") -> str:
    return read_bytes(location).decode(encoding)


def size(location: str | Path) -> int:
    """Size in bytes; FileNotFoundError when there is no such file or object."""
    if not is_remote(location):
        return Path(location).stat().st_size
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no object at {display(location)}")
    return int(info.size)


def exists(location: str | Path) -> bool:
    if not is_remote(location):
        return Path(location).exists()
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a whole file or object (an object appears whole or not at all)."""
    if not is_remote(location):
        Path(location).write_bytes(data)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:
        f.write(data)


def upload_file(local: str | Path, location: str | Path) -> None:
    """Copy one local file to ``location`` (a URI or a local path)."""
    if not is_remote(location):
        shutil.copyfile(local, location)
        return
    fs, path = filesystem(location)
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        shutil.copyfileobj(src, dst, length=8 << 20)


def list_names(location: str | Path) -> list[str]:
    """Names of the files directly under ``location`` (empty when it does not exist)."""
    if not is_remote(location):
        p = Path(location)
        return sorted(c.name for c in p.iterdir() if c.is_file()) if p.is_dir() else []
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File)


def delete(location: str | Path) -> None:
    """Remove one file or object; no error when it is already gone."""
    if not is_remote(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def _not_found(location: str | Path, error: OSError) -> OSError:
    text = str(error)
    if "NoSuchKey" in text or "Path does not exist" in text or "not found" in text.lower():
        return FileNotFoundError(f"no object at {display(location)}")
    return OSError(f"{display(location)}: {text.splitlines()[0] if text else type(error).__name__}")


def _gopen_store(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    if mode != "rb":
        raise ValueError(f"{display(url)}: only reading is supported through gopen")
    return open_input(url)


def register_gopen() -> None:
    """Let ``webdataset.gopen`` open object-store URIs (idempotent)."""
    import importlib

    wds_gopen = importlib.import_module("webdataset.gopen")  # the module; the package re-exports the function

    for scheme in OBJECT_STORE_SCHEMES:
        wds_gopen.gopen_schemes.setdefault(scheme, _gopen_store)
