"""ShardLoader: batch contract, equal batches per rank, exactly-once epochs, exact resume with 0/1/2
workers and 1/2 ranks, refusal of non-json/npy members, corrupt shards skipped, bucketing."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from ranks import run_ranks

from mlctl.data.dataset import ShardLoader
from mlctl.data.shards import ShardWriter, split_member

B = 4


def _records(shards_dir: Path) -> list[tuple[str, dict[str, bytes]]]:
    """All records of a shard folder in manifest order: (key, {ext: bytes})."""
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    out: list[tuple[str, dict[str, bytes]]] = []
    for entry in manifest["shards"]:
        with tarfile.open(shards_dir / entry["name"]) as tar:
            for m in tar:
                key, ext = split_member(m.name)
                if not out or out[-1][0] != key:
                    out.append((key, {}))
                out[-1][1][ext] = tar.extractfile(m).read()
    return out


def reshard(src: Path, out: Path, sizes: list[int]) -> Path:
    """Rewrite ``src``'s records into shards of the given (uneven) sizes, with a matching manifest."""
    recs = _records(src)
    assert sum(sizes) <= len(recs)
    out.mkdir(parents=True, exist_ok=True)
    shards, i = [], 0
    for n, size in enumerate(sizes):
        w = ShardWriter(out, size)
        for key, members in recs[i : i + size]:
            w.write(key, members["json"], members["src.npy"], members["tgt.npy"])
        written = w.close()
        # ShardWriter numbers from 0; give each file its own index
        (out / written[0]["name"]).rename(out / f"part-{n:03d}.tar")
        shards.append({**written[0], "name": f"part-{n:03d}.tar"})
        i += size
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["shards"] = shards
    manifest["num_samples"] = sum(sizes)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def uneven(tiny_shards, tmp_path_factory) -> Path:
    # 7 shards of very different sizes: no rank x worker count divides them
    return reshard(tiny_shards, tmp_path_factory.mktemp("uneven"), [3, 120, 7, 61, 150, 1, 44])


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> None:
    assert [x["pair_ids"] for x in a] == [x["pair_ids"] for x in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["spans"], y["spans"])
        assert x["epoch"] == y["epoch"]


def test_batch_contract(tiny_shards, tiny_tokenizer):
    loader = ShardLoader(tiny_shards, batch_size=B, shuffle_buffer=16)
    batch = next(iter(loader))
    ids, mask, spans = batch["input_ids"], batch["attention_mask"], batch["spans"]
    assert ids.dtype == torch.long and ids.shape[0] == 2 * B and mask.shape == ids.shape
    assert spans.shape == (2 * B, 2)
    assert ids.shape[1] == int(mask.sum(1).max())  # padded to the longest row only
    assert (ids[mask == 0] == tiny_tokenizer.pad_token_id).all()
    assert batch["num_tokens"] == int(mask.sum())
    assert len(batch["pair_ids"]) == len(batch["langs"]) == B
    assert set(batch["langs"]) <= {"en-de", "en-fr", "en-es"}
    records = {k: v for k, v in _records(tiny_shards)}
    for i, pid in enumerate(batch["pair_ids"]):
        meta = json.loads(records[pid]["json"])
        spans_here = {(tuple(a["src_span"]), tuple(a["tgt_span"])) for a in meta["anchors"]}
        assert (tuple(spans[i].tolist()), tuple(spans[B + i].tolist())) in spans_here
        # the span really covers the anchor word's tokens
        s0, s1 = spans[i].tolist()
        anchor = next(a for a in meta["anchors"] if a["src_span"] == [s0, s1])
        text = tiny_tokenizer.decode(ids[i, s0 : s1 + 1]).replace(" ", "").replace("##", "")
        assert text.lower() == anchor["src"].replace(" ", "").lower()
        real = int(mask[i].sum())
        assert 0 < s0 <= s1 < real - 1  # never a special token


def test_tokenizer_hash_mismatch_names_both(tiny_shards):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    with pytest.raises(ValueError) as e:
        ShardLoader(tiny_shards, batch_size=B, expected_tokenizer_hash="0123456789abcdef")
    msg = str(e.value)
    assert (
        "0123456789abcdef" in msg
        and manifest["tokenizer"]["hash"] in msg
        and manifest["tokenizer"]["name"] in msg
    )
    ShardLoader(tiny_shards, batch_size=B, expected_tokenizer_hash=manifest["tokenizer"]["hash"])


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2), (3, 1)])
def test_exactly_once_and_equal_batches(uneven, world, workers):
    loaders = [
        ShardLoader(
            uneven, batch_size=B, rank=r, world_size=world, num_workers=workers, seed=3, shuffle_buffer=10
        )
        for r in range(world)
    ]
    n = loaders[0].batches_per_epoch
    assert all(lo.batches_per_epoch == n for lo in loaders) and n > 0
    keys = [k for k, _ in _records(uneven)]
    for epoch in (0, 1):
        seen = []
        for lo in loaders:
            it = iter(lo) if epoch == 0 else lo._live
            batches = _take(it, n)
            assert {b["epoch"] for b in batches} == {epoch}
            seen += [p for b in batches for p in b["pair_ids"]]
        assert len(seen) == len(set(seen)), "a pair was yielded twice in one epoch"
        # expected: the epoch's global order minus its dropped tail
        plan = loaders[0].plan
        order = [(name, i) for name, n in plan.epoch_shards(epoch)[0] for i in range(n)]
        starts, acc = {}, 0
        for entry in json.loads((uneven / "manifest.json").read_text())["shards"]:
            starts[entry["name"]] = acc
            acc += entry["samples"]
        global_keys = [keys[starts[name] + i] for name, i in order]
        dropped = plan.total - plan.consumers * plan.nb * B  # the tail that makes batches equal
        kept = len(global_keys) - dropped
        assert 0 <= dropped < world * max(1, workers) * B
        assert set(seen) == set(global_keys[:kept])
    for lo in loaders:
        lo.close()


def test_new_partition_every_epoch(uneven):
    lo = ShardLoader(uneven, batch_size=B, world_size=2, shuffle_buffer=10)
    it = iter(lo)
    e0 = [p for b in _take(it, lo.batches_per_epoch) for p in b["pair_ids"]]
    e1 = [p for b in _take(it, lo.batches_per_epoch) for p in b["pair_ids"]]
    assert set(e0) != set(e1)  # rank 0 sees a different half of the data
    assert e0 != e1


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_exact_resume(uneven, tmp_path, world, workers):
    kwargs = dict(batch_size=B, world_size=world, num_workers=workers, seed=7, shuffle_buffer=12)
    ref = [ShardLoader(uneven, rank=r, **kwargs) for r in range(world)]
    n = ref[0].batches_per_epoch
    k = n - 3  # stop a few batches before the epoch ends, resume across the boundary
    m = 7
    expected = []
    for lo in ref:
        it = iter(lo)
        _take(it, k)
        expected.append(_take(it, m))
        lo.close()
    for r in range(world):
        first = ShardLoader(uneven, rank=r, **kwargs)
        it = iter(first)
        _take(it, k)
        path = tmp_path / f"state{r}.json"
        path.write_text(json.dumps(first.state_dict()))
        first.close()
        resumed = ShardLoader(uneven, rank=r, **kwargs)
        resumed.load_state_dict(json.loads(path.read_text()))
        got = _take(iter(resumed), m)
        resumed.close()
        _same(got, expected[r])
    assert expected[0][-1]["epoch"] == 1  # the comparison did cross into the next epoch


def test_resume_at_every_position_small(uneven):
    """Every k within the first epoch and a half: state after k batches continues like the reference."""
    kwargs = dict(batch_size=B, seed=1, shuffle_buffer=8)
    ref_loader = ShardLoader(uneven, **kwargs)
    n = ref_loader.batches_per_epoch
    ref = _take(iter(ref_loader), n + n // 2 + 1)
    for k in range(0, n + n // 2, 5):
        lo = ShardLoader(uneven, **kwargs)
        lo.load_state_dict({**lo.state_dict(), "epoch": k // n, "batch_in_epoch": k % n})
        _same([next(iter(lo))], [ref[k]])


def test_state_from_other_settings_is_refused(uneven):
    lo = ShardLoader(uneven, batch_size=B, num_workers=0)
    other = ShardLoader(uneven, batch_size=B, num_workers=2)
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(lo.state_dict())


def test_anchor_draw_changes_with_epoch_but_is_deterministic(tiny_shards):
    a = ShardLoader(tiny_shards, batch_size=B, shuffle_buffer=16)
    b = ShardLoader(tiny_shards, batch_size=B, shuffle_buffer=16)
    n = a.batches_per_epoch
    span = {}
    for lo in (a, b):
        it = iter(lo)
        for epoch in range(3):
            for batch in _take(it, n):
                for i, pid in enumerate(batch["pair_ids"]):
                    key = (id(lo), epoch, pid)
                    span[key] = tuple(batch["spans"][i].tolist()) + tuple(batch["spans"][B + i].tolist())
    assert all(
        span[(id(a), e, p)] == span[(id(b), e, p)]
        for (_lo, e, p) in span
        if _lo == id(a) and (id(b), e, p) in span
    )
    per_pair: dict[str, set] = {}
    for (lo_id, _e, pid), s in span.items():
        if lo_id == id(a):
            per_pair.setdefault(pid, set()).add(s)
    assert any(len(v) > 1 for v in per_pair.values()), "multi-anchor pairs never switched anchor"


def _legacy(manifest_dir: Path) -> None:
    """Strip the per-shard size/checksum, as a manifest of an older `mlctl prepare` had none."""
    mpath = manifest_dir / "manifest.json"
    m = json.loads(mpath.read_text())
    m["shards"] = [{"name": e["name"], "samples": e["samples"]} for e in m["shards"]]
    mpath.write_text(json.dumps(m))


def _add_pickle(path: Path) -> None:
    with tarfile.open(path, "a") as tar:
        data = pickle.dumps({"x": 1})
        info = tarfile.TarInfo("en-de-000000999.pyd")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_pickle_member_is_refused(tiny_shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_shards, bad)
    m = json.loads((bad / "manifest.json").read_text())
    name = m["shards"][1]["name"]
    _add_pickle(bad / name)
    # a current manifest: the file no longer matches what prepare wrote (size, else checksum), so it
    # is a skipped shard and its bytes are never decoded
    lo = ShardLoader(bad, batch_size=B, shuffle_buffer=8)
    _take(iter(lo), lo.batches_per_epoch)
    assert lo.skipped == {"corrupt_shard": 1}
    lo.close()
    # an older manifest (no sizes): the header scan refuses the whole shard set, naming the member
    _legacy(bad)
    with pytest.raises(ValueError, match=r"en-de-000000999\.pyd"):
        ShardLoader(bad, batch_size=B)


def test_start_up_reads_no_shard(tiny_shards, tmp_path, monkeypatch):
    """Start-up is one stat per shard: no shard file is opened, whatever the corpus size."""
    import builtins

    import mlctl.data.manifest as ds

    opened: list[str] = []
    real_open = builtins.open

    def spy(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(ds, "scan_shard", None)  # would fail if the old header scan ran
    lo = ShardLoader(tiny_shards, batch_size=B, world_size=2, rank=1)
    assert not [p for p in opened if p.endswith(".tar")]
    assert lo.plan.total == json.loads((tiny_shards / "manifest.json").read_text())["num_samples"]


def test_legacy_manifest_still_loads(uneven, tmp_path, caplog):
    old = tmp_path / "old"
    shutil.copytree(uneven, old)
    _legacy(old)
    with caplog.at_level("WARNING"):
        lo = ShardLoader(old, batch_size=B, shuffle_buffer=8)
    assert "re-run prepare" in caplog.text
    new = ShardLoader(uneven, batch_size=B, shuffle_buffer=8)
    _same(_take(iter(lo), 5), _take(iter(new), 5))
    lo.close()
    new.close()


def test_bad_manifest_entry_is_named(uneven, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(uneven, bad)
    m = json.loads((bad / "manifest.json").read_text())
    del m["shards"][2]["samples"]
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"shards\[2\].*'samples'"):
        ShardLoader(bad, batch_size=B)


def _damage(bad: Path) -> None:
    victim = bad / "part-004.tar"  # the biggest shard: truncated mid-member (size differs)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    garbage = bad / "part-001.tar"  # header block destroyed, same size: only the checksum sees it
    garbage.write_bytes(b"\x13" * 2048 + garbage.read_bytes()[2048:])
    flipped = bad / "part-005.tar"  # the 1-record shard: one byte of its data flipped
    raw = bytearray(flipped.read_bytes())
    raw[1100] ^= 0xFF
    flipped.write_bytes(bytes(raw))


SIZES = (3, 120, 7, 61, 150, 1, 44)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_is_skipped_and_counted(uneven, tmp_path, workers):
    bad = tmp_path / "bad"
    shutil.copytree(uneven, bad)
    _damage(bad)
    los = [
        ShardLoader(bad, batch_size=B, rank=r, world_size=2, num_workers=workers, shuffle_buffer=8)
        for r in range(2)
    ]
    # the truncated shard is found at start-up (size); the others only while streaming
    assert los[0].skipped == los[1].skipped == {"corrupt_shard": 1}
    n = los[0].batches_per_epoch
    assert n == los[1].batches_per_epoch
    assert n == (sum(SIZES) - 150) // (2 * max(1, workers) * B) * max(1, workers)
    batches = [_take(iter(lo), 2 * n + 1) for lo in los]  # two epochs and one more step
    good = {
        p
        for name in ("part-000.tar", "part-002.tar", "part-003.tar", "part-006.tar")
        for p, _ in [(k, None) for k, _ in _records_of(uneven / name)]
    }
    for bs in batches:
        assert len(bs) == 2 * n + 1 and all(len(b["pair_ids"]) == B for b in bs)
        assert {p for b in bs for p in b["pair_ids"]} <= good  # nothing from a damaged shard
    seen = sum(lo.skipped.get("corrupt_shard", 0) for lo in los)
    assert seen >= 1 + 2 * 2  # start-up + both streaming-detected shards, in each of 2 epochs
    # deterministic: the same loaders again yield the same batches (what resuming relies on)
    again = ShardLoader(bad, batch_size=B, rank=1, world_size=2, num_workers=workers, shuffle_buffer=8)
    _same(batches[1][: n + 1], _take(iter(again), n + 1))
    for lo in [*los, again]:
        lo.close()


def _records_of(path: Path) -> list[tuple[str, None]]:
    with tarfile.open(path) as tar:
        return sorted({(split_member(m.name)[0], None) for m in tar})


def test_bucketing_reduces_padding_and_resumes(uneven):
    plain = ShardLoader(uneven, batch_size=B, shuffle_buffer=32)
    bucketed = ShardLoader(uneven, batch_size=B, shuffle_buffer=32, bucket_by_length=True, bucket_size=32)
    n = plain.batches_per_epoch

    def padding(lo):
        return sum(b["input_ids"].numel() - b["num_tokens"] for b in _take(iter(lo), n))

    assert padding(bucketed) < 0.8 * padding(plain)
    ref = ShardLoader(uneven, batch_size=B, shuffle_buffer=32, bucket_by_length=True, bucket_size=32)
    expected = _take(iter(ref), 20)[9:]
    lo = ShardLoader(uneven, batch_size=B, shuffle_buffer=32, bucket_by_length=True, bucket_size=32)
    lo.load_state_dict({**lo.state_dict(), "batch_in_epoch": 9})
    _same(_take(iter(lo), 11), expected)


def test_no_manifest_and_too_little_data(tmp_path, uneven):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShardLoader(tmp_path, batch_size=B)
    with pytest.raises(ValueError, match="too few"):
        ShardLoader(uneven, batch_size=200, world_size=2)


def test_workers_shut_down_when_closed(uneven):
    import multiprocessing

    before = set(multiprocessing.active_children())
    lo = ShardLoader(uneven, batch_size=B, num_workers=2, shuffle_buffer=8)
    it = iter(lo)
    _take(it, 3)
    assert len(set(multiprocessing.active_children()) - before) == 2
    lo.close()
    assert set(multiprocessing.active_children()) - before == set()
    with pytest.raises(StopIteration):
        next(it)


def test_resume_in_a_new_process(uneven, tmp_path):
    """The state goes through a JSON file into a fresh interpreter, as after a crash."""
    import subprocess
    import sys

    kwargs = dict(batch_size=B, world_size=2, rank=1, num_workers=2, seed=5, shuffle_buffer=12)
    ref = ShardLoader(uneven, **kwargs)
    it = iter(ref)
    _take(it, 11)
    (tmp_path / "state.json").write_text(json.dumps(ref.state_dict()))
    expected = [b["pair_ids"] for b in _take(it, 5)]
    ref.close()
    code = (
        "import json, sys\n"
        "from mlctl.data.dataset import ShardLoader\n"
        f"lo = ShardLoader({str(uneven)!r}, **{kwargs!r})\n"
        f"lo.load_state_dict(json.load(open({str(tmp_path / 'state.json')!r})))\n"
        "it = iter(lo)\n"
        "print(json.dumps([next(it)['pair_ids'] for _ in range(5)]))\n"
        "lo.close()\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def _rank(rank: int, world: int, shards: str, workers: int) -> dict:
    """One rank of a real gloo group: builds the loader (rank 0 decides, then broadcasts) and runs
    one all_reduce per batch, as the trainer's step does; a rank with fewer batches would hang."""
    import torch.distributed as dist

    if rank == 1:  # prove rank 1 takes rank 0's decision instead of checking the files itself
        ShardLoader._check_manifest = lambda self: (_ for _ in ()).throw(AssertionError("rank 1 checked"))
    res: dict = {}
    try:
        lo = ShardLoader(
            shards, batch_size=B, rank=rank, world_size=world, num_workers=workers, shuffle_buffer=8
        )
    except ValueError as e:
        res["error"] = str(e)
    else:
        res["start_skipped"] = dict(lo.skipped)
        steps = 2 * lo.batches_per_epoch + 1
        total = torch.zeros(1)
        ids = []
        for batch in _take(iter(lo), steps):
            t = torch.ones(1)
            dist.all_reduce(t)  # one collective per step: equal counts or a hang
            total += t
            ids.append(batch["pair_ids"])
        lo.close()
        res.update(steps=steps, collectives=float(total), ids=ids, skipped=dict(lo.skipped))
    return res


def _spawn_gloo(shards: Path, workers: int = 0) -> list[dict]:
    # A short collective timeout: a rank left waiting for a collective its peer never makes fails.
    return run_ranks(_rank, 2, str(shards), workers, timeout=120)


@pytest.mark.slow
def test_corrupt_shards_on_real_gloo_ranks(uneven, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(uneven, bad)
    _damage(bad)
    r0, r1 = _spawn_gloo(bad)
    assert r0["start_skipped"] == r1["start_skipped"] == {"corrupt_shard": 1}
    assert r0["steps"] == r1["steps"] and r0["collectives"] == r1["collectives"] == 2 * r0["steps"]
    good = {
        k
        for name in ("part-000.tar", "part-002.tar", "part-003.tar", "part-006.tar")
        for k, _ in _records_of(uneven / name)
    }
    for r in (r0, r1):
        assert {p for b in r["ids"] for p in b} <= good and all(len(b) == B for b in r["ids"])
    # the same as two loaders built in one process without a process group
    local = ShardLoader(bad, batch_size=B, rank=1, world_size=2, shuffle_buffer=8)
    assert [b["pair_ids"] for b in _take(iter(local), r1["steps"])] == r1["ids"]
    local.close()
    # an error found by rank 0 reaches every rank (no rank waits for a broadcast that never comes)
    m = json.loads((bad / "manifest.json").read_text())
    m["shards"][0]["samples"] = "many"
    (bad / "manifest.json").write_text(json.dumps(m))
    e0, e1 = _spawn_gloo(bad)
    assert "shards[0]" in e0["error"] and e0["error"] == e1["error"]
