"""Prepare's global shuffle with bounded memory: records are spilled to ``SHUFFLE_BUCKETS`` files on
disk by a hash of (seed, key), and each bucket is read back and permuted on its own, so the shards
hold a shuffle of the whole corpus (deterministic from the seed) while memory holds one bucket.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path

SHUFFLE_BUCKETS = 256  # spill files of the global shuffle: 25M pairs -> ~100k records (~300 MB) each


class Shuffler:
    """Global shuffle with bounded memory: records go to ``SHUFFLE_BUCKETS`` spill files by a hash of
    (seed, key); :meth:`drain` reads one bucket at a time, permutes it with ``rng(seed, bucket)`` and
    yields its records. The spill format is length-prefixed raw bytes (no pickle)."""

    _HEAD = struct.Struct("<IIII")

    def __init__(self, folder: Path, seed: int) -> None:
        self.dir, self.seed = folder, seed
        folder.mkdir(parents=True, exist_ok=True)
        self.files = [open(folder / f"bucket-{i:03d}.bin", "wb") for i in range(SHUFFLE_BUCKETS)]

    def add(self, key: str, meta: bytes, src: bytes, tgt: bytes) -> None:
        h = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=8).digest()
        k = key.encode("utf-8")
        f = self.files[int.from_bytes(h, "little") % SHUFFLE_BUCKETS]
        f.write(self._HEAD.pack(len(k), len(meta), len(src), len(tgt)) + k + meta + src + tgt)

    def drain(self):
        import numpy as np

        for f in self.files:
            f.close()
        for i, f in enumerate(self.files):
            raw = Path(f.name).read_bytes()
            Path(f.name).unlink()
            recs, pos = [], 0
            while pos < len(raw):
                lens = self._HEAD.unpack_from(raw, pos)
                pos += self._HEAD.size
                parts = []
                for n in lens:
                    parts.append(raw[pos : pos + n])
                    pos += n
                recs.append(parts)
            del raw
            for j in np.random.default_rng([self.seed, i]).permutation(len(recs)):
                key, meta, src, tgt = recs[j]
                yield key.decode("utf-8"), meta, src, tgt

    def close(self) -> None:
        for f in self.files:
            f.close()
        shutil.rmtree(self.dir, ignore_errors=True)
