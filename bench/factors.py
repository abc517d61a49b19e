"""Factor study: which part of the ML-CTL recipe costs retrieval accuracy, one factor at a time.

    python bench/factors.py NAME [key=value ...] [--steps 30] [--batch 64] [--max-pairs 300]

Trains ``configs/paper-proof`` settings (``configs/paper.yaml``'s method on the proof data, see
bench/alignment.py) with the given overrides, in a thin single-process loop over mlctl's own
pieces: :class:`~mlctl.model.MLCTLModel`, :func:`mlctl.model.mask_tokens`, the loss composition
:func:`mlctl.losses.contrastive_terms` (the function ``Trainer.micro_step`` calls), the streaming
:class:`~mlctl.data.dataset.ShardLoader` and the engine's learning-rate schedule. What it leaves out
is DeepSpeed and the process group, which do not change the arithmetic on one process (fp32,
ZeRO-1 on one rank is plain AdamW) but cost a minute of start-up per run on this machine.
``NAME=mnrl`` trains sentence-transformers' MultipleNegativesRankingLoss on the same pairs instead.
Results go to ``runs/factors.json`` under NAME, evaluated with :mod:`mlctl.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def train_mlctl(cfg, steps: int):
    import torch

    from mlctl.checkpoint import step_seed
    from mlctl.data.dataset import ShardLoader
    from mlctl.engine import lr_lambda, param_groups
    from mlctl.hub import load_tokenizer
    from mlctl.losses import contrastive_terms
    from mlctl.model import MLCTLModel, mask_tokens

    tok = load_tokenizer(cfg.model.name_or_path)
    special = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
    torch.manual_seed(cfg.train.seed)
    model = MLCTLModel.from_pretrained(cfg.model.name_or_path, cfg.model.pool_layers, cfg.model.unpad)
    loader = ShardLoader(
        cfg.data.shards,
        batch_size=cfg.data.batch_size,
        num_workers=0,
        seed=cfg.data.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        bucket_by_length=cfg.data.bucket_by_length,
        bucket_size=cfg.data.bucket_size,
    )
    opt = torch.optim.AdamW(
        param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, betas=tuple(cfg.train.betas), fused=True
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    model.train()
    it = iter(loader)
    t0 = time.perf_counter()
    for step in range(steps):
        batch = next(it)
        spans = batch["spans"] if cfg.model.word_level else None
        mlm_ids = mlm_labels = None
        if cfg.loss.mlm_weight > 0:
            gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, 0, 0))
            mlm_ids, mlm_labels = mask_tokens(
                batch["input_ids"], batch["attention_mask"], special, tok.mask_token_id,
                model.config.vocab_size, cfg.loss.mlm_probability, generator=gen,
            )  # fmt: skip
        out = model(batch["input_ids"], batch["attention_mask"], spans, mlm_ids, mlm_labels)
        cl, _, _ = contrastive_terms(cfg, out, spans, 0, 1)
        mlm = out.mlm_loss if out.mlm_loss is not None else torch.zeros(())
        loss = cl + cfg.loss.mlm_weight * mlm
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        if (step + 1) % 10 == 0:
            print(f"step {step + 1} cl {float(cl):.3f} mlm {float(mlm):.3f}", flush=True)
    loader.close() if hasattr(loader, "close") else None
    return model.eval(), tok, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-pairs", type=int, default=300)
    p.add_argument("--langs", default="de,fr,es")
    p.add_argument("--peer-lr", type=float, default=5e-5, help="learning rate of NAME=mnrl")
    p.add_argument("--out", default=str(ROOT / "runs" / "factors.json"))
    args = p.parse_args()

    import alignment
    import torch

    from mlctl.config import load_config
    from mlctl.evaluate import evaluate_files

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = ROOT / "runs" / "alignment"
    paths = [str(alignment.DATA / "dev" / f"{lg}.tsv.gz") for lg in args.langs.split(",")]
    base = [
        *alignment.recipe_overrides(ROOT / "configs" / "paper.yaml"),
        f"data.shards={work / 'shards-5000-anchored'}",
        f"train.max_steps={args.steps}",
        f"train.warmup_steps={max(1, args.steps // 5)}",
        f"data.batch_size={args.batch}",
    ]
    if args.name.startswith("untrained"):
        from mlctl.evaluate import load_encoder

        cfg = load_config(str(ROOT / "configs" / "proof.yaml"), [*base, *args.overrides])
        model, tok, _ = load_encoder(cfg.model.name_or_path, cfg.model.pool_layers)
        secs = 0.0
    elif args.name == "mnrl":
        pairs = alignment.shard_pairs(work / "shards-5000-keep-no-anchor", args.steps * args.batch, 0)
        run = work / f"factor-mnrl-s{args.steps}-lr{args.peer_lr:g}"
        secs = alignment.train_peer("mnrl", pairs, args.batch, run, 0, args.peer_lr)
        from mlctl.evaluate import load_encoder

        model, tok, _ = load_encoder(str(run), [-1])
    else:
        cfg = load_config(str(ROOT / "configs" / "proof.yaml"), [*base, *args.overrides])
        model, tok, secs = train_mlctl(cfg, args.steps)
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
