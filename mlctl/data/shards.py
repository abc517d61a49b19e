"""WebDataset shards: a deterministic writer (same records -> byte-identical tars, written under a
temporary name and renamed when closed) and the member rules the reader enforces.

A record is ``KEY.json`` (languages, texts, anchors with token spans, source), ``KEY.src.npy`` and
``KEY.tgt.npy`` (int32 token ids). Nothing else is ever written or accepted: no pickle."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

MEMBER_EXTS = ("json", "src.npy", "tgt.npy")
SHARD_PATTERN = "shard-{:06d}.tar"


class ShardRefused(ValueError):
    """A shard holds a member that is not json/npy (pickles are never decoded)."""


_NPY_HEADERS: dict[int, bytes] = {}


def npy_bytes(ids) -> bytes:
    """``np.save`` of a 1-D int32 array, byte for byte; the header is cached per length because
    np.save's own header formatting costs more than the data here."""
    arr = np.asarray(ids, dtype="<i4")
    n = len(arr)
    header = _NPY_HEADERS.get(n)
    if header is None:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        header = _NPY_HEADERS[n] = buf.getvalue()[: -4 * n or None]
    return header + arr.tobytes()


def json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")


def split_member(name: str) -> tuple[str, str]:
    """``"en_de_000000001.src.npy"`` -> (key, "src.npy"); keys never contain dots."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext


BLOCK = 512
RECORD = 20 * BLOCK  # tar files end on a 10 KiB record boundary, as tarfile and GNU tar write them


def ustar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header for a regular file with fixed mode/owner/mtime (deterministic output).

    Written by hand because ``tarfile.addfile`` costs ~70 us a member, which made the main process
    the bottleneck of `mlctl prepare` (three members per pair)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name too long (> 100 bytes): {name!r}")
    head = (
        raw.ljust(100, b"\0")
        + b"0000644\0"
        + b"0000000\0"
        + b"0000000\0"
        + b"%011o\0" % size
        + b"00000000000\0"
    )
    tail = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * 32 + b"\0" * 32 + b"0000000\0" * 2 + b"\0" * 155
    header = head + b" " * 8 + tail
    checksum = sum(header)
    header = head + b"%06o\0 " % checksum + tail
    return header.ljust(BLOCK, b"\0")


class ShardWriter:
    """Writes records into ``shard-NNNNNN.tar`` files of ``samples_per_shard`` records each.

    :meth:`close` returns one manifest entry per shard: ``name``, ``samples`` (records), ``bytes``
    (file size) and ``sha256`` (of the whole file)."""

    def __init__(self, out_dir: str | Path, samples_per_shard: int) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out = Path(out_dir)
        self.per_shard = samples_per_shard
        self.shards: list[dict] = []
        self._f: BinaryIO | None = None
        self._tmp: Path | None = None
        self._n = 0
        self._size = 0
        self._hash = hashlib.sha256()

    def _open(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        self._tmp = self.out / f".{name}.tmp"
        self._f = open(self._tmp, "wb")
        self.shards.append({"name": name, "samples": 0})
        self._n = self._size = 0
        self._hash = hashlib.sha256()

    def _add(self, name: str, data: bytes) -> None:
        pad = -len(data) % BLOCK
        chunk = ustar_header(name, len(data)) + data + b"\0" * pad
        self._f.write(chunk)  # type: ignore[union-attr]
        self._hash.update(chunk)
        self._size += len(chunk)

    def write(self, key: str, meta: bytes, src_npy: bytes, tgt_npy: bytes) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"shard key {key!r} must not contain dots or slashes")
        if self._f is None:
            self._open()
        self._add(f"{key}.json", meta)
        self._add(f"{key}.src.npy", src_npy)
        self._add(f"{key}.tgt.npy", tgt_npy)
        self._n += 1
        self.shards[-1]["samples"] = self._n
        if self._n >= self.per_shard:
            self._close_current()

    def _close_current(self) -> None:
        if self._f is None:
            return
        end = self._size + 2 * BLOCK
        tail = b"\0" * (2 * BLOCK + (-end % RECORD))
        self._f.write(tail)
        self._hash.update(tail)
        self._f.close()
        # What the loader trusts instead of re-reading the shard at start-up: its exact size (a cheap
        # stat) and a checksum it verifies while streaming.
        self.shards[-1]["bytes"] = self._size + len(tail)
        self.shards[-1]["sha256"] = self._hash.hexdigest()
        self._f = None
        # NOTE: the rename is what makes a shard visible; a crash before it leaves only a dot-tmp file.
        os.replace(self._tmp, self.out / self.shards[-1]["name"])  # type: ignore[arg-type]

    def close(self) -> list[dict]:
        self._close_current()
        return self.shards

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
            if self._tmp is not None and self._tmp.exists():
                self._tmp.unlink()


def scan_shard(path: Path) -> int:
    """Number of complete records in a shard, reading tar headers only.

    Raises :class:`ShardRefused` for a member that is not json/npy, and ``tarfile.TarError`` /
    ``OSError`` / ``ValueError`` for a corrupt or truncated file."""
    counts: dict[str, set[str]] = {}
    size = path.stat().st_size
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = split_member(m.name)
            if ext not in MEMBER_EXTS:
                raise ShardRefused(
                    f"shard {path} holds member {m.name!r}: only {', '.join(MEMBER_EXTS)} "
                    "members are read (never pickles); refusing this shard"
                )
            if m.offset_data + m.size > size:
                raise tarfile.ReadError(f"member {m.name} runs past the end of the file (truncated)")
            counts.setdefault(key, set()).add(ext)
    incomplete = [k for k, exts in counts.items() if len(exts) != len(MEMBER_EXTS)]
    if incomplete:
        raise tarfile.ReadError(f"{len(incomplete)} record(s) miss members, e.g. {incomplete[0]}")
    return len(counts)
