"""The cached micro-step (mlctl.gradcache, ``loss.cache_chunk``) is the plain step, exactly.

* Float64, dropout off, on 1 and 2 real gloo ranks: for every loss option, the cached step's loss
  and every parameter gradient equal the plain step's on the same batch, chunked unevenly.
* With dropout: replaying each chunk's random state makes the cached step equal a plain step whose
  forward runs chunk by chunk (and the plain step itself with one chunk); without the replay it
  does not, so the test can tell.
* Through the real Trainer and DeepSpeed engine (ZeRO 0 to 3; 2 ranks; gradient accumulation):
  in fp32 the parameters after two optimizer steps equal the plain run's, with one gradient
  reduction per optimizer step under ZeRO 0 and 1; in bf16 the gradient norms are fp32's, to bf16
  rounding.
* Killed mid-run and resumed, a cached run ends with the uninterrupted cached run's weights, bitwise.
* tests/test_cuda_rules.py runs the cached step under CUDA's device rules (recipe ``cached``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from fixture_data import DATA, prepare_fixture_shards
from ranks import run_engine_worker, run_ranks

from mlctl.config import load_config
from mlctl.gradcache import cached_backward, split_batch
from mlctl.losses import contrastive_terms
from mlctl.model import EncoderInputs, MLCTLModel, mask_tokens

PAIRS = 12  # global batch of the exactness tests
ANCHORLESS = (1, 4, 7, 10)  # pairs whose "word" is the whole side (prepared with keep_no_anchor)
SHARED_SOURCES = ((0, 3, 8), (5, 6))  # translations of one sentence (a multiway corpus)

# Every loss option the step composes (mlctl.losses.contrastive_terms, the MLM term).
OPTIONS: dict[str, list[str]] = {
    "info_nce": ["loss.kind=info_nce", "model.word_level=false", "loss.mlm_weight=0"],
    "cz_nce": ["loss.kind=cz_nce", "model.word_level=false", "loss.mlm_weight=0"],
    "cross_language_only": [
        "loss.kind=cz_nce",
        "loss.same_language_negatives=false",
        "model.word_level=false",
        "loss.mlm_weight=0",
    ],
    "source_ids": ["loss.kind=info_nce", "model.word_level=false", "loss.mlm_weight=0"],
    "margin": [
        "loss.kind=info_nce",
        "loss.margin=0.2",
        "loss.temperature=0.05",
        "model.word_level=false",
        "loss.mlm_weight=0",
    ],
    # the paper's word-level term: anchorless pairs take part with their whole sides
    "paper_word_level": ["model.word_level=true", "loss.mlm_weight=0"],
    # both terms: anchorless pairs are out of the word-level term (the `valid` mask)
    "word_and_sentence": ["model.word_level=true", "loss.sentence_weight=0.5", "loss.mlm_weight=0"],
    "mlm": ["model.word_level=true", "loss.sentence_weight=0.5", "loss.mlm_weight=0.1"],
    # the transformers forward over the padded grid (model.unpad=false), MLM included
    "mlm_padded": ["model.word_level=false", "loss.mlm_weight=0.5", "model.unpad=false"],
}


def _cfg(option: str):
    return load_config(None, OPTIONS[option])


def make_batch(tokenizer, pairs: int, *, source_ids: bool = False) -> dict:
    """``pairs`` fixture pairs in collate's layout: source rows, then target rows, anchor spans
    (the whole side for ANCHORLESS pairs), anchored flags and source ids."""
    lines = []
    for lang in ("de", "fr", "es"):
        lines += (DATA / f"pairs.en-{lang}.tsv").read_text(encoding="utf-8").splitlines()[10:14]
    texts = [line.split("\t")[:2] for line in lines[:pairs]]
    enc = tokenizer([t[0] for t in texts] + [t[1] for t in texts], padding=True, return_tensors="pt")
    lengths = enc["attention_mask"].sum(1)
    spans = torch.zeros(2 * pairs, 2, dtype=torch.long)
    anchored = torch.ones(pairs, dtype=torch.bool)
    for row in range(2 * pairs):
        pair = row % pairs
        if pair in ANCHORLESS:
            spans[row] = torch.tensor([0, int(lengths[row]) - 1])
            anchored[pair] = False
        else:
            spans[row] = torch.tensor([1, min(2, int(lengths[row]) - 2)])
    sids = torch.arange(pairs, dtype=torch.long) + 100
    if source_ids:
        for group in SHARED_SOURCES:
            sids[list(group)] = group[0]
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "spans": spans,
        "anchored": anchored,
        "source_ids": sids,
    }


def rank_rows(batch: dict, rank: int, world: int) -> dict:
    """Rank ``rank``'s share of a global batch (its pairs, both sides)."""
    b = batch["anchored"].shape[0]
    n = b // world
    pairs = torch.arange(rank * n, (rank + 1) * n)
    rows = torch.cat([pairs, b + pairs])
    return {
        "input_ids": batch["input_ids"][rows],
        "attention_mask": batch["attention_mask"][rows],
        "spans": batch["spans"][rows],
        "anchored": batch["anchored"][pairs],
        "source_ids": batch["source_ids"][pairs],
    }


def tiny_model(model_dir: Path, cfg, dtype=torch.float64) -> MLCTLModel:
    torch.manual_seed(0)
    model = MLCTLModel.from_pretrained(str(model_dir), cfg.model.pool_layers, cfg.model.unpad)
    return model.to(dtype)


class Step:
    """The plain micro-step's loss and the cached one's on one batch, for one model."""

    def __init__(self, cfg, model: MLCTLModel, tokenizer, batch: dict, rank: int, world: int):
        self.cfg, self.model, self.rank, self.world = cfg, model, rank, world
        word = cfg.model.word_level
        self.spans = batch["spans"] if word else None
        self.anchored = batch["anchored"] if word else None
        self.sids = batch["source_ids"]
        self.ids, self.mask = batch["input_ids"], batch["attention_mask"]
        self.mlm_ids = self.mlm_labels = None
        if cfg.loss.mlm_weight > 0:
            special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
            gen = torch.Generator().manual_seed(17 + rank)
            self.mlm_ids, self.mlm_labels = mask_tokens(
                self.ids, self.mask, special, tokenizer.mask_token_id, len(tokenizer), 0.3, generator=gen
            )

    def terms(self, out):
        return contrastive_terms(self.cfg, out, self.anchored, self.rank, self.world, source_ids=self.sids)

    def calls(self, chunk: int) -> list[EncoderInputs]:
        return split_batch(self.ids, self.mask, chunk, self.spans, self.mlm_ids, self.mlm_labels)

    def plain(self) -> tuple[float, float, dict[str, torch.Tensor]]:
        """What Trainer.micro_step does: one forward, loss = cl + weight * mlm, one backward."""
        self.model.zero_grad(set_to_none=True)
        inputs = EncoderInputs.build(self.ids, self.mask, self.spans, self.mlm_ids, self.mlm_labels)
        out = self.model(inputs)
        cl, _, _ = self.terms(out)
        mlm = out.mlm_loss if out.mlm_loss is not None else torch.zeros((), dtype=cl.dtype)
        (cl + self.cfg.loss.mlm_weight * mlm).backward()
        return float(cl.detach()), float(mlm.detach()), self.grads()

    def chunked_plain(self, chunk: int) -> tuple[float, float, dict[str, torch.Tensor]]:
        """The plain step whose forward runs chunk by chunk, activations all kept (the reference
        when dropout draws per encoder call)."""
        self.model.zero_grad(set_to_none=True)
        outs = [self.model(c) for c in self.calls(chunk)]
        from mlctl.model import EncoderOutput

        def whole(parts):  # the chunks' rows in the batch's layout: every source row, then every target
            halves = [(p[: p.shape[0] // 2], p[p.shape[0] // 2 :]) for p in parts]
            return torch.cat([x for x, _ in halves] + [y for _, y in halves])

        fused = whole([o.fused for o in outs]) if outs[0].fused is not None else None
        out = EncoderOutput(sentence=whole([o.sentence for o in outs]), fused=fused, mlm_loss=None)
        cl, _, _ = self.terms(out)
        mlm = sum(o.mlm_loss for o in outs) if outs[0].mlm_loss is not None else torch.zeros(())
        (cl + self.cfg.loss.mlm_weight * mlm).backward()
        return float(cl.detach()), float(mlm.detach()), self.grads()

    def cached(self, chunk: int) -> tuple[float, float, dict[str, torch.Tensor]]:
        self.model.zero_grad(set_to_none=True)
        r = cached_backward(
            self.model,
            lambda loss, last: loss.backward(),
            self.calls(chunk),
            self.terms,
            self.cfg.loss.mlm_weight,
        )
        return float(r.cl), float(r.mlm), self.grads()

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest difference between two sets of gradients, relative to each tensor's largest
    entry (the scale of its rounding errors). A tensor whose gradient is zero in exact arithmetic
    holds rounding noise only (the attention key biases: softmax ignores a shift shared by all
    keys; ~1e-20 here), so no tensor's scale is taken below 1e-3 of the largest gradient anywhere."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    floor = 1e-3 * max(float(g.abs().max()) for g in a.values())
    return max(float((a[k] - b[k]).abs().max()) / max(float(a[k].abs().max()), floor) for k in a)


# NOTE: float64 carries 2.2e-16 of relative rounding. The two steps add the same terms in another
# order (chunk-sized matmuls, per-chunk means) over at most a few hundred terms, so they agree to
# ~1e-14 of each tensor's scale (measured: under 1e-13). 1e-11 leaves two orders of margin and is
# 1e4 times below what float32 rounding in either path would give; an error in the method (a
# missing term, a wrong MLM weight, the wrong dropout) shows at 1e-3 and above.
TOL = 1e-11


def exactness(model_dir: Path, rank: int, world: int, chunk: int) -> dict[str, dict]:
    """For every option: the plain and cached figures and the worst gradient difference."""
    from mlctl.hub import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    results = {}
    for option in OPTIONS:
        cfg = _cfg(option)
        model = tiny_model(model_dir, cfg).eval()  # eval: no dropout
        batch = rank_rows(make_batch(tok, PAIRS, source_ids=option == "source_ids"), rank, world)
        step = Step(cfg, model, tok, batch, rank, world)
        cl0, mlm0, g0 = step.plain()
        cl1, mlm1, g1 = step.cached(chunk)
        results[option] = {"plain": (cl0, mlm0), "cached": (cl1, mlm1), "worst": worst(g0, g1), "n": len(g0)}
    return results


def _check(results: dict[str, dict], option: str) -> None:
    r = results[option]
    (cl0, mlm0), (cl1, mlm1) = r["plain"], r["cached"]
    assert cl1 == pytest.approx(cl0, rel=TOL, abs=TOL)
    assert mlm1 == pytest.approx(mlm0, rel=TOL, abs=TOL)
    if "mlm" in option:
        assert mlm0 > 0
    assert r["worst"] <= TOL, f"{option}: worst relative gradient difference {r['worst']:.3e}"
    assert r["n"] > 30  # every encoder parameter, not a few


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir) -> dict[str, dict]:
    return exactness(tiny_model_dir, 0, 1, chunk=5)  # chunks of 5, 5 and 2 pairs


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_cached_step_equals_the_plain_step(one_rank, option):
    _check(one_rank, option)


def _exactness_rank(rank: int, world: int, model_dir: str) -> dict[str, dict]:
    return exactness(Path(model_dir), rank, world, chunk=4)  # 6 pairs a rank: chunks of 4 and 2


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir) -> list[dict[str, dict]]:
    return run_ranks(_exactness_rank, 2, str(tiny_model_dir))


@pytest.mark.slow
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_cached_step_equals_the_plain_step_on_two_ranks(two_ranks, option):
    for res in two_ranks:
        _check(res, option)


def test_dropout_is_replayed(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """With dropout on, each chunk's second pass draws the masks of its first: the cached step equals
    the plain step run chunk by chunk, and with one chunk the plain step itself."""
    cfg = _cfg("mlm")
    model = tiny_model(tiny_model_dir, cfg).train()
    assert model.config.hidden_dropout_prob > 0 and model.config.attention_probs_dropout_prob > 0
    step = Step(cfg, model, tiny_tokenizer, make_batch(tiny_tokenizer, PAIRS), 0, 1)

    def seeded(run, *args):
        torch.manual_seed(1234)
        return run(*args)

    cl0, mlm0, g0 = seeded(step.chunked_plain, 5)
    cl1, mlm1, g1 = seeded(step.cached, 5)
    assert cl1 == pytest.approx(cl0, rel=TOL) and mlm1 == pytest.approx(mlm0, rel=TOL)
    assert worst(g0, g1) <= TOL
    # one chunk: the plain micro-step's single encoder call, its dropout included
    cl0, _, g0 = seeded(step.plain)
    cl1, _, g1 = seeded(step.cached, PAIRS)
    assert cl1 == pytest.approx(cl0, rel=TOL) and worst(g0, g1) <= TOL
    # the test can tell: without the replay the second pass draws other masks
    monkeypatch.setattr("mlctl.gradcache.set_rng_state", lambda state, device: None)
    _, _, g2 = seeded(step.cached, 5)
    _, _, g0 = seeded(step.chunked_plain, 5)
    assert worst(g0, g2) > 1e-3


def test_chunks_keep_pairs_together_and_share_the_mlm_mean(tiny_tokenizer):
    batch = make_batch(tiny_tokenizer, PAIRS)
    special = torch.tensor(sorted(set(tiny_tokenizer.all_special_ids)))
    ids, labels = mask_tokens(
        batch["input_ids"], batch["attention_mask"], special, tiny_tokenizer.mask_token_id, 100, 0.3
    )
    calls = split_batch(batch["input_ids"], batch["attention_mask"], 5, batch["spans"], ids, labels)
    assert [c.rows for c in calls] == [10, 10, 4]
    first = calls[0]
    width = first.input_ids.shape[1]
    assert width <= batch["input_ids"].shape[1]
    # pairs 0..4: source rows 0..4 then their targets (rows 12..16), cut to the chunk's longest row
    assert torch.equal(first.input_ids[:5], batch["input_ids"][:5, :width])
    assert torch.equal(first.input_ids[5:10], batch["input_ids"][12:17, :width])
    assert torch.equal(first.input_ids[10:], ids[list(range(5)) + list(range(12, 17)), :width])
    assert batch["attention_mask"][[*range(5), *range(12, 17)], width:].sum() == 0
    assert torch.equal(first.spans, batch["spans"][[*range(5), *range(12, 17)]])
    xs = [c.masked.x_count for c in calls]
    ys = [c.masked.labels.shape[0] - c.masked.x_count for c in calls]
    assert sum(c.masked.x_weight for c in calls) == pytest.approx(1.0)
    assert [c.masked.x_weight for c in calls] == pytest.approx([x / sum(xs) for x in xs])
    assert [c.masked.y_weight for c in calls] == pytest.approx([y / sum(ys) for y in ys])


def test_cache_chunk_is_validated():
    from mlctl.config import ConfigError

    assert load_config(None, []).loss.cache_chunk == 0
    with pytest.raises(ConfigError, match=r"loss.cache_chunk must be >= 0"):
        load_config(None, ["loss.cache_chunk=-1"])
    with pytest.raises(ConfigError, match=r"loss.cache_chunk=32 is not below data.batch_size=32"):
        load_config(None, ["loss.cache_chunk=32"])
    assert load_config(None, ["loss.cache_chunk=8", "data.batch_size=64"]).loss.cache_chunk == 8


# --------------------------------------------------------------------------------------------------
# Through the real Trainer and DeepSpeed engine


@pytest.fixture(scope="module")
def still_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with dropout off: chunked encoder calls draw other dropout masks than one call
    over the batch, so the engine comparison needs none (test_dropout_is_replayed covers dropout)."""
    out = tmp_path_factory.mktemp("still_bert")
    for f in tiny_model_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory, tiny_model_dir) -> Path:
    """Anchored and anchorless pairs; the three catalogs share English sources (source-id masking)."""
    return prepare_fixture_shards(
        tmp_path_factory.mktemp("gradcache_shards"), str(tiny_model_dir), keep_no_anchor=True
    )


def _engine_config(model_dir: str, shards: str, zero: int, precision: str, chunk: int):
    return load_config(
        None,
        [
            f"model.name_or_path={model_dir}",
            f"data.shards={shards}",
            "data.batch_size=6",
            "data.shuffle_buffer=24",
            "model.word_level=true",
            "loss.sentence_weight=0.5",
            "loss.mlm_weight=0.1",
            "train.grad_accum=2",
            "train.lr=0.1",
            "metrics.enabled=false",
            f"deepspeed.zero_stage={zero}",
            f"deepspeed.precision={precision}",
            f"loss.cache_chunk={chunk}",
        ],
    )


def _sgd_trainer():
    """The real Trainer with SGD. NOTE: AdamW's first step is lr * g / (|g| + eps): a gradient entry
    that rounding alone makes nonzero (the key biases above) moves by up to lr in either run, so a
    parameter comparison after AdamW would measure its conditioning, not the cache's exactness."""
    from types import SimpleNamespace

    from mlctl.deepspeed_setup import deepspeed_config
    from mlctl.engine import Trainer

    class SGDTrainer(Trainer):
        def _build_engine(self, model):
            import deepspeed

            engine, *_ = deepspeed.initialize(
                args=SimpleNamespace(device_rank=0),
                model=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=self.cfg.train.lr),
                config=deepspeed_config(self.cfg, self.world_size),
            )
            return engine

    return SGDTrainer


RUNS = (("fp32", 0), ("fp32", 4), ("bf16", 0), ("bf16", 4))  # precision, cache_chunk (4: chunks of 4 and 2)


def _params(model) -> dict[str, torch.Tensor]:
    """Every parameter in full, fp32 (ZeRO-3 gathers its shards)."""
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def _count_reductions(engine) -> list[int]:
    """Counts the data-parallel gradient reductions of ZeRO-0 (the engine's all-reduce) and ZeRO-1
    (the optimizer's reduce into partitions); ZeRO-2 and 3 reduce every backward by design."""
    count = [0]
    for owner, name in ((engine, "buffered_allreduce_fallback"), (engine.optimizer, "reduce_gradients")):
        real = getattr(owner, name, None)
        if real is None:
            continue

        def counted(*args, _real=real, **kwargs):
            count[0] += 1
            return _real(*args, **kwargs)

        setattr(owner, name, counted)
    return count


def _engine_rank(rank: int, world: int, model_dir: str, shards: str, zero: int, out: str) -> dict:
    result: dict = {}
    for precision, chunk in RUNS:
        cfg = _engine_config(model_dir, shards, zero, precision, chunk)
        trainer = _sgd_trainer()(cfg, Path(out) / f"{precision}-{chunk}", rank=rank, world_size=world)
        trainer.setup()
        reductions = _count_reductions(trainer.engine)
        before = _params(trainer.model)
        trainer.engine.train()
        it = iter(trainer.loader)
        figures = [trainer.train_step(it) for _ in range(2)]
        trainer.loader.close()
        after = _params(trainer.model)
        update = torch.cat([(after[n] - before[n]).reshape(-1) for n in sorted(after)])
        result[precision, chunk] = {"update": update, "figures": figures, "reductions": reductions[0]}
    return result


@pytest.fixture(scope="module", params=[0, 1, 2, 3], ids=lambda z: f"zero{z}")
def engine_runs(request, tmp_path_factory, still_model_dir, mixed_shards) -> tuple[int, list[dict]]:
    """Two optimizer steps of 2 micro-batches on 2 ranks, SGD, through the real Trainer and
    DeepSpeed engine: the parameter updates and figures of the RUNS, per rank."""
    zero = request.param
    out = tmp_path_factory.mktemp(f"gradcache_zero{zero}")
    args = (str(still_model_dir), str(mixed_shards), zero, str(out))
    return zero, run_ranks(_engine_rank, 2, *args, init="env", env={"DS_ACCELERATOR": "cpu"}, timeout=900)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


FIGURES = ("loss", "contrastive_loss", "mlm_loss", "inbatch_accuracy", "grad_norm")


@pytest.mark.slow
def test_engine_step_equals_the_plain_step(engine_runs):
    """fp32: the same parameter updates, losses, accuracy and gradient norm as the plain step, to
    fp32 rounding, and under ZeRO 0 and 1 one gradient reduction per optimizer step. Every chunk
    backward at the accumulation boundary (no deferral) is 98% off under ZeRO 1 and 2 (measured); a
    chunk divided by the accumulation steps twice or not at all is off by a factor."""
    zero, results = engine_runs
    for rank, r in enumerate(results):
        plain, cached = r["fp32", 0], r["fp32", 4]
        # NOTE: fp32 rounds at 6e-8; the update is lr x a gradient summed over a few hundred terms in
        # another order, over two steps (measured: 1.3e-6 of the update's norm, 2.2e-6 of its
        # largest entry). 1e-4 leaves nearly two orders of margin.
        assert plain["update"].abs().max() > 1e-3
        assert _rel(cached["update"], plain["update"]) < 1e-4, f"rank {rank}"
        if zero in (0, 1):  # one reduction per optimizer step, not one per chunk backward
            assert plain["reductions"] == cached["reductions"] == 2, (
                plain["reductions"],
                cached["reductions"],
            )
        for a, b in zip(plain["figures"], cached["figures"], strict=True):
            for key in FIGURES:
                if zero == 0 and key == "grad_norm":
                    continue  # ZeRO-0 reports none (nan)
                assert b[key] == pytest.approx(a[key], rel=1e-5), (rank, key)


def _bf16_norms(results: list[dict], chunk: int) -> list[float]:
    """How far each optimizer step's gradient norm under bf16 is from fp32's plain one (ZeRO-0
    reports none in fp32: from bf16's plain one there)."""
    out = []
    for r in results:
        ref = "fp32" if not math.isnan(r["fp32", 0]["figures"][0]["grad_norm"]) else "bf16"
        for a, b in zip(r[ref, 0]["figures"], r["bf16", chunk]["figures"], strict=True):
            out.append(abs(b["grad_norm"] / a["grad_norm"] - 1))
    return out


# NOTE: bf16 rounds at 4e-3 (8 bits) and the bf16 parameters quantise any update to their own
# resolution, so bf16 is compared with the fp32 plain step through the gradient norm (fp32 in every
# stage). Measured: the plain bf16 step misses it by up to 1.6%, the cached one by up to 2.5%;
# counting a chunk's or a micro-batch's gradient twice shows at 18% to 90%.
BF16_TOL = 0.1


@pytest.mark.slow
def test_engine_step_in_bf16(engine_runs):
    zero, results = engine_runs
    off = _bf16_norms(results, 4)
    assert max(off) < BF16_TOL, off
    for r in results:
        for a, b in zip(r["fp32", 0]["figures"], r["bf16", 4]["figures"], strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=0.02)


@pytest.mark.slow
def test_plain_bf16_step(engine_runs):
    """The reference the bf16 comparison leans on: the plain step's bf16 gradient norm is close to
    fp32's at every ZeRO stage. (It was not under ZeRO-1 with train.grad_accum > 1 while the encoder
    returned a dataclass: DeepSpeed's BF16_Optimizer clears the bf16 gradients in a backward
    prologue run from hooks on the forward's output tensors, and found none; each micro-batch's
    gradient was added again at every later backward. EncoderOutput is a tuple now.)"""
    zero, results = engine_runs
    if zero == 0:
        pytest.skip("ZeRO-0 reports no gradient norm in fp32 to compare with")
    assert max(_bf16_norms(results, 0)) < BF16_TOL


# --------------------------------------------------------------------------------------------------
# Resume


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    step = (run_dir / "checkpoints" / "latest").read_text().strip()
    path = run_dir / "checkpoints" / step / "engine" / "state" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.mark.slow
def test_cached_run_resumes_exactly(tmp_path, tiny_model_dir, mixed_shards):
    """Killed after the step-2 checkpoint and resumed, a cached run (dropout on: the replayed random
    states restart from the step's seed) ends with the uninterrupted cached run's weights, bitwise."""
    overrides = [
        f"model.name_or_path={tiny_model_dir}",
        f"data.shards={mixed_shards}",
        "data.batch_size=6",
        "data.shuffle_buffer=24",
        "model.word_level=true",
        "loss.sentence_weight=0.5",
        "loss.mlm_weight=0.1",
        "loss.cache_chunk=4",
        "train.grad_accum=2",
        "train.max_steps=4",
        "train.lr=1e-3",
        "checkpoint.every_steps=2",
        "metrics.enabled=false",
    ]
    clean = run_engine_worker(tmp_path / "clean", None, overrides)
    assert clean.returncode == 0, clean.stderr[-3000:]
    killed = run_engine_worker(tmp_path / "killed", {"event": "step", "step": 2}, overrides)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run_engine_worker(tmp_path / "killed", None, overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step_00000002" in resumed.stderr
    a, b = _final_weights(tmp_path / "clean"), _final_weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    # and the run trained: the weights moved from the initial ones
    start = MLCTLModel.from_pretrained(str(tiny_model_dir)).state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a if k in start)
