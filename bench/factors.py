"""Factor study: which part of the ML-CTL recipe costs retrieval accuracy, one factor at a time.

    python bench/factors.py NAME [key=value ...] [--steps 30] [--batch 64] [--max-pairs 300]
        [--batches stream|random|nn|lex] [--pairs-seed 0]

Trains ``configs/paper-proof`` settings (``configs/paper.yaml``'s method on the proof data, see
bench/alignment.py) with the given overrides, in a thin single-process loop over mlctl's own
pieces: :class:`~mlctl.model.MLCTLModel`, the step's inputs and loss from :mod:`mlctl.step` (MLM
copy included; what ``Trainer.micro_step`` calls), the streaming :class:`~mlctl.data.dataset.ShardLoader` (or, for
other batches, its :func:`~mlctl.data.collate.collate` and code-switching) and the engine's
learning-rate schedule. What it leaves out
is DeepSpeed and the process group, which do not change the arithmetic on one process (fp32,
ZeRO-1 on one rank is plain AdamW) but cost a minute of start-up per run on this machine.
``NAME=mnrl`` trains sentence-transformers' MultipleNegativesRankingLoss on the same pairs instead.
``--batches`` other than ``stream`` trains MNRL's own seeded sample of pairs (``--pairs-seed``) in
batches cut three ways (see :func:`pair_batches`) instead of the shard loader's stream.
Results go to ``runs/factors.json`` under NAME, evaluated with :mod:`mlctl.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
MAX_TOKENS = 64  # the random/nn/lex batches' rows (the proof shards' max_tokens is larger)


def train_mlctl(cfg, steps: int, pairs=None, mode: str = "stream", switch=((), 0.0)):
    from mlctl.data.dataset import ShardLoader
    from mlctl.deepspeed_setup import lr_lambda, param_groups
    from mlctl.hub import load_tokenizer
    from mlctl.model import MLCTLModel
    from mlctl.step import Vocab, host_inputs, mlm_copy, step_loss

    tok = load_tokenizer(cfg.model.name_or_path)
    torch.manual_seed(cfg.train.seed)
    model = MLCTLModel.from_pretrained(cfg.model.name_or_path, cfg.model.pool_layers, cfg.model.unpad)
    vocab = Vocab.of(tok, model.config.vocab_size)
    loader = ShardLoader(
        cfg.data.shards,
        batch_size=cfg.data.batch_size,
        num_workers=0,
        seed=cfg.data.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        bucket_by_length=cfg.data.bucket_by_length,
        bucket_size=cfg.data.bucket_size,
        code_switch=cfg.data.code_switch,
        switch_anchors=not cfg.model.word_level,
    )
    opt = torch.optim.AdamW(
        param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, betas=tuple(cfg.train.betas), fused=True
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    model.train()
    it = (
        iter(loader)
        if pairs is None
        else pair_batches(model, tok, pairs, cfg.data.batch_size, mode, cfg.data.seed, switch)
    )
    t0 = time.perf_counter()
    for step in range(steps):
        batch = next(it)
        # the training step's own pieces (mlctl.step), on one process: rank 0, micro-batch 0
        inputs, anchored, source_ids = host_inputs(batch, cfg, *mlm_copy(batch, cfg, vocab, step, 0, 0))
        loss, cl, mlm, _, _ = step_loss(cfg, model(inputs), anchored, 0, 1, source_ids)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        if (step + 1) % 10 == 0:
            print(f"step {step + 1} cl {float(cl):.3f} mlm {float(mlm):.3f}", flush=True)
    loader.close()
    return model.eval(), tok, time.perf_counter() - t0


# ---- lexical grouping (the `lex` batches): idf-weighted token overlap of the English side ----

MAX_POOL = 4096


def token_vectors(rows: Sequence[np.ndarray], ignore: Sequence[int] = ()) -> torch.Tensor:
    """Row-normalised idf-weighted bag-of-tokens vectors [n, V'] (sparse, V' = tokens in ``rows``)."""
    n = len(rows)
    ignored = np.asarray(sorted(set(ignore)), dtype=np.int64)
    uniq = [np.setdiff1d(np.unique(np.asarray(r, dtype=np.int64)), ignored) for r in rows]
    lengths = np.asarray([len(u) for u in uniq], dtype=np.int64)
    flat = np.concatenate(uniq) if n else np.zeros(0, dtype=np.int64)
    vocab, cols, df = np.unique(flat, return_inverse=True, return_counts=True)
    idf = np.log((1.0 + n) / (1.0 + df))  # a token in every row ([CLS], [SEP]) weighs nothing
    vals = idf[cols]
    row_of = np.repeat(np.arange(n), lengths)
    norms = np.sqrt(np.bincount(row_of, weights=vals**2, minlength=n))
    vals = vals / np.maximum(norms[row_of], 1e-12)
    idx = torch.from_numpy(np.stack([row_of, cols]))
    shape = (n, len(vocab))
    return torch.sparse_coo_tensor(
        idx, torch.from_numpy(vals).float(), shape, check_invariants=False
    ).coalesce()


def similar_batches(
    rows: Sequence[np.ndarray], batch_size: int, rng: np.random.Generator, ignore: Sequence[int] = ()
) -> list[list[int]]:
    """Indices of ``rows`` in groups of ``batch_size`` (a multiple of it is expected; a short last
    group takes the rest): a random free row and the free rows most similar to it, greedily.
    Later groups are built from what is left, so they are less alike; every row is used once.
    More than ``MAX_POOL`` rows are grouped in consecutive pools of about that size."""
    n = len(rows)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pool = max(batch_size, MAX_POOL // batch_size * batch_size)
    if n > pool:
        out = []
        for start in range(0, n, pool):
            part = similar_batches(rows[start : start + pool], batch_size, rng, ignore)
            out += [[start + i for i in g] for g in part]
        return out
    if n == 0:
        return []
    x = token_vectors(rows, ignore)
    sims = torch.sparse.mm(x, x.to_dense().T).numpy()  # [n, n]
    free = np.ones(n, dtype=bool)
    groups: list[list[int]] = []
    for seed in rng.permutation(n):
        if not free[seed]:
            continue
        cand = np.flatnonzero(free)
        # Most similar first; ties (rows sharing no token) in index order, so the result is exact.
        take = cand[np.argsort(-sims[seed, cand], kind="stable")[:batch_size]]
        if seed not in take:  # an all-ignored row has similarity 0 to itself: it still leads its group
            take = np.concatenate([[seed], take[: batch_size - 1]])
        free[take] = False
        groups.append(take.tolist())
    return groups


def switch_dictionaries(langs: Sequence[str], folder: Path | None = None) -> list:
    """Code-switch dictionaries from English into ``langs``: the paper's mlctl-usual-words lists
    (what ``configs/proof.yaml`` prepares its shards with), or the word lists in ``folder``."""
    from mlctl.data.dictionary import load_list_dictionary

    if folder is None:
        import alignment

        folder = alignment.DATA / "dict" / "mlctl-usual-words"
    return [load_list_dictionary(folder, "en", lg, what="code-switch dictionary") for lg in langs]


def pair_batches(
    model,
    tok,
    pairs: list[tuple[str, str]],
    batch: int,
    mode: str,
    seed: int,
    switch=((), 0.0),
):
    """``pairs`` cut into batches: ``random`` (their seeded order), ``nn`` (each batch one pair and
    its nearest unbatched neighbours by the starting encoder's English vectors: hard negatives) or
    ``lex`` (:func:`similar_batches` on the English token ids, per pool of ``POOL`` pairs).

    Each batch is what the loader hands the trainer (:func:`mlctl.data.collate.collate`), made from
    the pairs tokenized to 64 tokens: no anchor (a pair's spans are its whole sides), identical
    English sides sharing a source id (the same sentence is not a negative), and with ``switch`` =
    (dictionaries, p) > 0 the English words those dictionaries know code-switched with
    probability p, as ``mlctl prepare --code-switch`` and ``data.code_switch`` do."""
    import hashlib
    import random

    from mlctl.data.anchors import SpanMapper
    from mlctl.data.collate import collate
    from mlctl.data.switch import switch_candidates
    from mlctl.evaluate import encode_texts

    n = len(pairs) // batch
    order = list(range(n * batch))
    if mode == "nn":
        with torch.no_grad():
            v = torch.nn.functional.normalize(encode_texts(model.eval(), tok, [p[0] for p in pairs]), dim=-1)
        model.train()
        free = torch.ones(len(pairs), dtype=torch.bool)
        rnd = random.Random(seed)
        groups = []
        for _ in range(n):
            left = free.nonzero().squeeze(1)
            seed_row = int(left[rnd.randrange(len(left))])
            sims = v[left] @ v[seed_row]
            take = left[sims.topk(batch).indices]
            free[take] = False
            groups.append(take.tolist())
        rnd.shuffle(groups)
        order = [i for g in groups for i in g]
    if mode == "lex":
        pool = int(os.environ.get("POOL", "2048"))
        rows = [np.asarray(tok(p[0], add_special_tokens=False)["input_ids"]) for p in pairs]
        order = []
        for start in range(0, n * batch, pool):
            rng = np.random.default_rng([seed, start])
            part = list(range(start, min(start + pool, n * batch)))
            groups = similar_batches([rows[i] for i in part], batch, rng)
            groups = [groups[i] for i in rng.permutation(len(groups))]
            order += [part[i] for g in groups for i in g]
    dicts, p_switch = switch

    def phrase_ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def record(i: int) -> dict:
        src, tgt = pairs[i]
        enc = tok(src, truncation=True, max_length=MAX_TOKENS, return_offsets_mapping=True)
        same = src.strip().lower()  # identical English sides are the same sentence
        meta = {
            "id": str(i),
            "src_lang": "en",
            "tgt_lang": "xx",
            "anchors": [],
            "sid": hashlib.blake2b(same.encode("utf-8"), digest_size=8).hexdigest(),
        }
        if p_switch > 0:
            meta["switch"] = switch_candidates(src, dicts, SpanMapper(enc["offset_mapping"]), phrase_ids)
        tgt_ids = tok(tgt, truncation=True, max_length=MAX_TOKENS)["input_ids"]
        return {"meta": meta, "src": np.asarray(enc["input_ids"]), "tgt": np.asarray(tgt_ids)}

    for b in range(n):
        samples = [record(i) for i in order[b * batch : (b + 1) * batch]]
        yield collate(samples, tok.pad_token_id, seed, 0, p_switch, MAX_TOKENS)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-pairs", type=int, default=300)
    p.add_argument("--langs", default="de,fr,es")
    p.add_argument(
        "--batches",
        default="stream",
        choices=["stream", "random", "nn", "lex"],
        help="stream: the shard loader; random / nn: MNRL's pairs in random or nearest-neighbour batches",
    )
    p.add_argument(
        "--pairs-seed", type=int, default=0, help="which seeded sample of pairs random/nn/lex/mnrl train"
    )
    p.add_argument(
        "--code-switch",
        type=float,
        default=0.0,
        help="random/nn/lex: probability of switching each English word the --cs-langs word lists know",
    )
    p.add_argument("--cs-langs", default="ar,es,fr,ru,zh", help="--code-switch: languages switched into")
    p.add_argument("--peer-lr", type=float, default=5e-5, help="learning rate of NAME=mnrl")
    p.add_argument("--out", default=str(ROOT / "runs" / "factors.json"))
    args = p.parse_args()

    import alignment

    from mlctl.config import load_config
    from mlctl.evaluate import evaluate_files

    switch = (
        (switch_dictionaries(args.cs_langs.split(",")), args.code_switch)
        if args.code_switch > 0
        else ((), 0.0)
    )
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = ROOT / "runs" / "alignment"
    paths = [str(alignment.DATA / "dev" / f"{lg}.tsv.gz") for lg in args.langs.split(",")]
    base = [
        *alignment.recipe_overrides(ROOT / "configs" / "paper.yaml"),
        f"data.shards={work / 'shards-5000-anchored'}",
        f"train.max_steps={args.steps}",
        f"train.warmup_steps={max(1, args.steps // 5)}",
        f"data.batch_size={args.batch}",
        "train.lr=1e-4",  # the factor tables' base rate (proof.yaml moved to 2e-4 with code-switching)
    ]

    def pair_sample() -> list[tuple[str, str]]:  # MNRL's seeded sample, also what random/nn/lex cut
        return alignment.shard_pairs(
            work / "shards-5000-keep-no-anchor", args.steps * args.batch, args.pairs_seed
        )

    if args.name.startswith("untrained"):
        from mlctl.evaluate import load_encoder

        cfg = load_config(str(ROOT / "configs" / "proof.yaml"), [*base, *args.overrides])
        model, tok, _ = load_encoder(cfg.model.name_or_path, cfg.model.pool_layers)
        secs = 0.0
    elif args.name == "mnrl":
        pairs = pair_sample()
        run = work / f"factor-mnrl-s{args.steps}-lr{args.peer_lr:g}-p{args.pairs_seed}"
        secs = alignment.train_peer("mnrl", pairs, args.batch, run, 0, args.peer_lr)
        from mlctl.evaluate import load_encoder

        model, tok, _ = load_encoder(str(run), [-1])
    else:
        cfg = load_config(str(ROOT / "configs" / "proof.yaml"), [*base, *args.overrides])
        pairs = None if args.batches == "stream" else pair_sample()
        model, tok, secs = train_mlctl(cfg, args.steps, pairs, args.batches, switch)
    rep = evaluate_files(model, tok, paths, progress=False, max_pairs=args.max_pairs)
    res = {
        "overrides": args.overrides,
        "steps": args.steps,
        "batch": args.batch,
        "train_seconds": round(secs, 1),
        "langs": {
            e["lang"]: {
                "xx2en": e["retrieval"]["xx2en"],
                "en2xx": e["retrieval"]["en2xx"],
                "f1": e["mining"]["f1"],
            }
            for e in rep["files"].values()
        },
        "mean": rep["mean"],
    }
    out = Path(args.out)
    allres = json.loads(out.read_text()) if out.is_file() else {}
    allres[args.name] = res
    out.write_text(json.dumps(allres, indent=1))
    print(args.name, json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
