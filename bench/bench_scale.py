"""Start-up, restart and memory of the loader against corpus size; `prepare` pairs/s against workers.

Corpora of 1M, 5M and 25M pairs are generated in a temporary folder (never stored): a few real
shards written by ``ShardWriter`` (10,000 records each: random token ids of 8-64 tokens, a json
with texts, anchors and a source id) and the rest of the corpus as hard links to them, with a
``manifest.json`` as `mlctl prepare` writes it (records, bytes, sha256 per shard). The loader cannot
tell the difference (it trusts the manifest and verifies the shards it streams), and 25M pairs then
take a few hundred MB of disk instead of ~75 GB.
NOTE: the linked shards are in the page cache after the first read, so streaming costs here are
those of a warm cache; start-up itself reads no shard at all.

Measured, per corpus size, with 2 ranks in a real gloo process group (one process each):
- **start-up**: wall time and CPU time of the rank process (the CPU figure is what the loader does,
  less exposed to other jobs on a shared machine) from ``ShardLoader(...)`` (manifest read, rank 0 checks the shards with one stat
  each and broadcasts its decision) to the first batch in hand and one all_reduce done, i.e. the
  data side of `mlctl train` up to step 1 (model load and DeepSpeed set-up do not depend on corpus
  size and are left out);
- **peak RSS** of each rank process (``ru_maxrss``, includes torch);
- **restart**: a fresh loader restoring the state at batch k (as a resume does) to its next batch,
  for k = 0, 1,000 and the last batch of the epoch.
Then `prepare` pairs/s with 1 and 2 local worker processes on a generated TSV (vocabulary from the
test dictionary, so anchors exist) with the tiny test tokenizer.
Ratios are against the smallest corpus (and 1 worker) measured in the same run.

    .venv/bin/python bench/bench_scale.py [--sizes 1000000,5000000,25000000] [--prepare-pairs 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # mlctl, and the test helpers (tiny_models, ranks)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PER_SHARD = 10_000
DISTINCT = 4  # real shard files; the others are hard links to them
BATCH = 32


def write_base_shards(folder: Path, seed: int = 0) -> list[dict]:
    """DISTINCT real shards of PER_SHARD records each, as prepare would write them."""
    from mlctl.data.prepare import source_id
    from mlctl.data.shards import ShardWriter, json_bytes, npy_bytes

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(folder, PER_SHARD)
    for k in range(DISTINCT * PER_SHARD):
        ns, nt = rng.integers(8, 65, size=2)
        src = rng.integers(5, 30000, size=ns).tolist()
        tgt = rng.integers(5, 30000, size=nt).tolist()
        text = f"synthetic sentence {k // 5}"  # 5 pairs per source sentence, as a 6-way corpus
        meta = {
            "id": f"en-xx-{k:09d}",
            "sid": source_id(text),
            "src_lang": "en",
            "tgt_lang": "xx",
            "src": text,
            "tgt": f"phrase {k}",
            "anchors": [{"src": "synthetic", "tgt": "phrase", "src_span": [1, 1], "tgt_span": [1, 1]}],
            "source": "bench",
        }
        w.write(meta["id"], json_bytes(meta), npy_bytes(src), npy_bytes(tgt))
    return w.close()


def make_corpus(base: Path, base_shards: list[dict], pairs: int, out: Path) -> Path:
    out.mkdir(parents=True)
    shards = []
    for i in range(pairs // PER_SHARD):
        b = base_shards[i % DISTINCT]
        name = f"shard-{i:06d}.tar"
        os.link(base / b["name"], out / name)
        shards.append({**b, "name": name})
    manifest = {
        "format_version": 2,
        "tokenizer": {"name": "synthetic", "hash": "0" * 16, "pad_id": 0},
        "num_samples": pairs,
        "shards": shards,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def _rank(rank: int, world: int, corpus: str, ks: list[int]) -> dict:
    """One rank: start-up to step 1, then restarts at batch k (fresh loader each time)."""
    import torch
    import torch.distributed as dist

    from mlctl.data.dataset import ShardLoader

    dist.barrier()
    kw = dict(batch_size=BATCH, rank=rank, world_size=world, shuffle_buffer=1000, bucket_by_length=True)
    t0, c0 = time.perf_counter(), time.process_time()
    lo = ShardLoader(corpus, **kw)
    next(iter(lo))
    dist.all_reduce(torch.ones(1))
    startup, startup_cpu = time.perf_counter() - t0, time.process_time() - c0
    nb = lo.batches_per_epoch
    state = lo.state_dict()
    lo.close()
    restarts = {}
    for k in [k if k >= 0 else nb - 1 for k in ks]:
        dist.barrier()
        t0 = time.perf_counter()
        lo = ShardLoader(corpus, **kw)
        lo.load_state_dict({**state, "batch_in_epoch": k})
        next(iter(lo))
        dist.all_reduce(torch.ones(1))
        restarts[str(k)] = time.perf_counter() - t0
        lo.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    return {"startup": startup, "startup_cpu": startup_cpu, "rss_mb": rss, "restarts": restarts}


def measure(corpus: Path, ks: list[int]) -> list[dict]:
    """Each rank's figures, from 2 ranks in a real gloo group (one spawned process each)."""
    from ranks import run_ranks

    return run_ranks(_rank, 2, str(corpus), ks, timeout=3600)


def prepare_rate(tmp: Path, pairs: int, workers: int) -> float:
    from tiny_models import make_tiny_model

    from mlctl.config import PrepareConfig, PrepareInput
    from mlctl.data.prepare import prepare

    tok = tmp / "tiny"
    if not tok.exists():
        make_tiny_model(tok)
    tsv = tmp / "pairs.tsv"
    data = ROOT / "tests" / "data"
    if not tsv.exists():
        words = [
            line.split("\t")[:2]
            for line in (data / "dict.en-de.tsv").read_text(encoding="utf-8").splitlines()
            if "\t" in line and not line.startswith("#")
        ]
        rng = np.random.default_rng(0)
        with tsv.open("w", encoding="utf-8") as f:
            for i in range(pairs):
                pick = [words[j] for j in rng.integers(0, len(words), size=8)]
                f.write(" ".join(p[0] for p in pick) + f" {i}\t" + " ".join(p[1] for p in pick) + f" {i}\n")
    cfg = PrepareConfig(
        inputs=[PrepareInput(str(tsv), "tsv", "en", "de")],
        dictionaries=[f"de={data / 'dict.en-de.tsv'}"],
        out=str(tmp / f"prep{workers}"),
        workers=workers,
    )
    t0 = time.perf_counter()
    m = prepare(cfg, str(tok))
    dt = time.perf_counter() - t0
    shutil.rmtree(tmp / f"prep{workers}")
    return m["counts"]["read"] / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000000,5000000,25000000", help="corpus sizes in pairs")
    ap.add_argument("--restart-at", default="0,1000,-1", help="batches k to resume at (-1: last)")
    ap.add_argument("--prepare-pairs", type=int, default=20000, help="0 skips the prepare figures")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per size (median reported)")
    ap.add_argument("--legacy-pairs", type=int, default=100000, help="old-manifest start-up (0: skip)")
    ap.add_argument("--tmp", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    ks = [int(k) for k in args.restart_at.split(",")]
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="bench_scale_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        base_shards = write_base_shards(tmp / "base")
        print(f"{DISTINCT} base shards of {PER_SHARD:,} records written in {time.perf_counter() - t0:.1f} s")
        corpora = {}
        for n in sizes:
            t0 = time.perf_counter()
            corpora[n] = make_corpus(tmp / "base", base_shards, n, tmp / f"c{n}")
            print(f"{n:>11,} pairs: {n // PER_SHARD:,} shards linked in {time.perf_counter() - t0:.1f} s")
        # NOTE: rounds interleave the sizes, so a change of load on a shared machine hits all of them;
        # each figure is the median over rounds of the slowest (or largest) rank.
        runs: dict[int, list] = {n: [] for n in sizes}
        for rnd in range(args.rounds):
            for n in sizes:
                res = measure(corpora[n], ks)
                runs[n].append(res)
                print(
                    f"round {rnd + 1}, {n:>11,} pairs: start-up to step 1 "
                    + " / ".join(f"{r['startup']:.2f} s (CPU {r['startup_cpu']:.2f} s)" for r in res)
                    + ", peak RSS "
                    + " / ".join(f"{r['rss_mb']:.0f} MiB" for r in res)
                    + ", restart at k="
                    + ", ".join(
                        f"{k}: {max(r['restarts'][k] for r in res):.2f} s" for k in res[0]["restarts"]
                    ),
                    flush=True,
                )

        def med(n: int, f) -> float:
            return float(np.median([max(f(r) for r in res) for res in runs[n]]))

        base_n = sizes[0]
        b_start = med(base_n, lambda r: r["startup"])
        b_cpu = med(base_n, lambda r: r["startup_cpu"])
        b_rss = med(base_n, lambda r: r["rss_mb"])
        b_restart = med(base_n, lambda r: max(r["restarts"].values()))
        print(
            f"\nmedians over {args.rounds} round(s), ratios against {base_n:,} pairs (slowest / largest rank):"
        )
        for n in sizes:
            start, rss = med(n, lambda r: r["startup"]), med(n, lambda r: r["rss_mb"])
            cpu = med(n, lambda r: r["startup_cpu"])
            restart = med(n, lambda r: max(r["restarts"].values()))
            per_k = {k: med(n, lambda r, k=k: r["restarts"][k]) for k in runs[n][0][0]["restarts"]}
            print(
                f"{n:>11,}: start-up {start:.2f} s ({start / b_start:.2f}x; CPU {cpu:.2f} s, "
                f"{cpu / b_cpu:.2f}x), peak RSS {rss:.0f} MiB "
                f"({rss / b_rss:.2f}x), worst restart {restart:.2f} s ({restart / b_restart:.2f}x); "
                "restart by k: " + ", ".join(f"{k}: {v:.2f} s" for k, v in per_k.items())
            )
        if args.legacy_pairs:
            legacy = make_corpus(tmp / "base", base_shards, args.legacy_pairs, tmp / "legacy")
            m = json.loads((legacy / "manifest.json").read_text())
            m["shards"] = [{"name": e["name"], "samples": e["samples"]} for e in m["shards"]]
            (legacy / "manifest.json").write_text(json.dumps(m))
            from mlctl.data.dataset import ShardLoader

            t0 = time.perf_counter()
            ShardLoader(legacy, batch_size=BATCH)
            dt = time.perf_counter() - t0
            per = dt / (args.legacy_pairs // PER_SHARD)
            print(
                f"\nan old manifest (no sizes/checksums), {args.legacy_pairs:,} pairs: construction alone "
                f"{dt:.1f} s = {per:.2f} s a shard of {PER_SHARD:,} records, i.e. ~{per * 2500 / 60:.0f} min per "
                f"rank at 25M pairs, on every start (ratio to the new start-up at {base_n:,}: "
                f"{per * 2500 / b_start:.0f}x)"
            )
        if args.prepare_pairs:
            r1 = prepare_rate(tmp, args.prepare_pairs, 1)
            r2 = prepare_rate(tmp, args.prepare_pairs, 2)
            print(
                f"\nprepare, {args.prepare_pairs:,} pairs: 1 process {r1:,.0f} pairs/s, "
                f"2 processes {r2:,.0f} pairs/s ({r2 / r1:.2f}x)"
            )
    finally:
        if not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
