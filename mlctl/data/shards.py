"""WebDataset shards: a deterministic writer (same records -> byte-identical tars, written under a
temporary name and renamed when closed) and the member rules the reader enforces.

A record is ``KEY.json`` (languages, texts, anchors with token spans, source), ``KEY.src.npy`` and
``KEY.tgt.npy`` (int32 token ids). Nothing else is ever written or accepted: no pickle."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

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


class ShardWriter:
    """Writes records into ``shard-NNNNNN.tar`` files of ``samples_per_shard`` records each."""

    def __init__(self, out_dir: str | Path, samples_per_shard: int) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out = Path(out_dir)
        self.per_shard = samples_per_shard
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._n = 0

    def _open(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        self._tmp = self.out / f".{name}.tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "samples": 0})
        self._n = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]

    def write(self, key: str, meta: bytes, src_npy: bytes, tgt_npy: bytes) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"shard key {key!r} must not contain dots or slashes")
        if self._tar is None:
            self._open()
        self._add(f"{key}.json", meta)
        self._add(f"{key}.src.npy", src_npy)
        self._add(f"{key}.tgt.npy", tgt_npy)
        self._n += 1
        self.shards[-1]["samples"] = self._n
        if self._n >= self.per_shard:
            self._close_current()

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        # NOTE: the rename is what makes a shard visible; a crash before it leaves only a dot-tmp file.
        final = self.out / self.shards[-1]["name"]
        os.replace(self._tmp, final)  # type: ignore[arg-type]
        self._tar = None

    def close(self) -> list[dict]:
        self._close_current()
        return self.shards

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
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
                raise ShardRefused(f"shard {path} holds member {m.name!r}: only {', '.join(MEMBER_EXTS)} "
                                   "members are read (never pickles); refusing this shard")
            if m.offset_data + m.size > size:
                raise tarfile.ReadError(f"member {m.name} runs past the end of the file (truncated)")
            counts.setdefault(key, set()).add(ext)
    incomplete = [k for k, exts in counts.items() if len(exts) != len(MEMBER_EXTS)]
    if incomplete:
        raise tarfile.ReadError(f"{len(incomplete)} record(s) miss members, e.g. {incomplete[0]}")
    return len(counts)
