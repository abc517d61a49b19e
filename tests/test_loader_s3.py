"""ShardLoader over an object store (a moto S3 server on 127.0.0.1): the same batches as from the
local folder, with and without DataLoader workers; damaged and missing objects skipped and counted
as local files are; one size lookup per shard at start-up; a missing manifest named."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from mlctl import storage
from mlctl.data.dataset import ShardLoader

pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")

B = 4


def upload(folder: Path, uri: str) -> str:
    for f in sorted(folder.iterdir()):
        storage.upload_file(f, storage.join(uri, f.name))
    return uri


@pytest.fixture(scope="module")
def s3_shards(s3_bucket, tiny_shards) -> str:
    return upload(tiny_shards, s3_bucket.uri("tiny"))


def _ids(batches) -> list[list[str]]:
    return [b["pair_ids"] for b in batches]


def _take(loader: ShardLoader, n: int) -> list[dict]:
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    loader.close()
    return out


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (1, 2), (2, 2)])
def test_same_batches_as_the_local_folder(tiny_shards, s3_shards, world, workers):
    kw = dict(batch_size=B, world_size=world, num_workers=workers, seed=11, shuffle_buffer=12)
    for rank in range(world):
        local = ShardLoader(tiny_shards, rank=rank, **kw)
        remote = ShardLoader(s3_shards, rank=rank, **kw)
        n = local.batches_per_epoch + 2  # into the second epoch
        a, b = _take(local, n), _take(remote, n)
        assert _ids(a) == _ids(b)
        assert all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(a, b, strict=True))
        assert remote.skipped == local.skipped == {}


def test_start_up_is_one_size_lookup_per_shard(s3_shards, tiny_shards, monkeypatch):
    import mlctl.data.blocks as ds

    sizes: list[str] = []
    real_size = storage.size
    monkeypatch.setattr(storage, "size", lambda loc: sizes.append(str(loc)) or real_size(loc))
    monkeypatch.setattr(ds, "_read_verified", None)  # would fail if start-up read an object
    lo = ShardLoader(s3_shards, batch_size=B)
    shards = json.loads((tiny_shards / "manifest.json").read_text())["shards"]
    assert sorted(sizes) == sorted(storage.join(s3_shards, e["name"]) for e in shards)
    assert lo.plan.total == sum(e["samples"] for e in shards)


def _damage(folder: Path) -> None:
    """The same three kinds of damage as tests/test_data_loader.py: truncated (size differs),
    garbage header and one flipped byte (same size: only the checksum sees them)."""
    victim = folder / "shard-000003.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    garbage = folder / "shard-000001.tar"
    garbage.write_bytes(b"\x13" * 2048 + garbage.read_bytes()[2048:])
    flipped = folder / "shard-000006.tar"
    raw = bytearray(flipped.read_bytes())
    raw[1100] ^= 0xFF
    flipped.write_bytes(bytes(raw))
    (folder / "shard-000004.tar").unlink()  # and one shard gone altogether


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_and_missing_objects_are_skipped_like_local_files(
    s3_bucket, tiny_shards, tmp_path, workers, caplog
):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_shards, bad)
    _damage(bad)
    uri = upload(bad, s3_bucket.uri(f"bad-{workers}"))
    kw = dict(batch_size=B, world_size=2, num_workers=workers, seed=2, shuffle_buffer=8)
    for rank in range(2):
        local = ShardLoader(bad, rank=rank, **kw)
        with caplog.at_level(logging.WARNING):
            remote = ShardLoader(uri, rank=rank, **kw)
        # the truncated and the missing shard are found at start-up (size lookup)
        assert remote.skipped == local.skipped == {"corrupt_shard": 2}
        n = 2 * local.batches_per_epoch + 1
        assert _ids(_take(local, n)) == _ids(_take(remote, n))
        assert remote.skipped == local.skipped and remote.skipped["corrupt_shard"] > 2
    # locations in messages carry no endpoint or region (storage.display)
    assert "endpoint_override" not in caplog.text and f"s3://{s3_bucket.name}/bad-{workers}/" in caplog.text


def test_missing_manifest_names_the_uri(s3_bucket, tiny_shards):
    uri = s3_bucket.uri("nothing-here")
    storage.upload_file(tiny_shards / "shard-000000.tar", storage.join(uri, "shard-000000.tar"))
    with pytest.raises(FileNotFoundError, match="mlctl prepare") as e:
        ShardLoader(uri, batch_size=B)
    assert f"s3://{s3_bucket.name}/nothing-here" in str(e.value) and "endpoint_override" not in str(e.value)


def test_old_manifest_in_a_store_is_refused(s3_bucket, tiny_shards, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_shards, old)
    m = json.loads((old / "manifest.json").read_text())
    m["shards"] = [{"name": e["name"], "samples": e["samples"]} for e in m["shards"]]
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="re-run `mlctl prepare`"):
        ShardLoader(upload(old, s3_bucket.uri("old")), batch_size=B)
