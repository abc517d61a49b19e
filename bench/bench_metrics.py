"""Step time with metrics on versus off, measured in the same run.

The training step is real: the tiny BERT of tests/tiny_models.py (or ``--model``), a batch of
fixture pairs, forward with the masked copy, CZ-NCE + 0.1 x MLM, backward, AdamW. "on" adds what the
engine adds per step: ``MetricsExporter.log_step`` with the HTTP endpoint up, rank 0's
metrics.jsonl, and a scraper thread reading the endpoint like Prometheus does. Modes alternate in
blocks so drift on a shared machine hits both alike.

    python bench/bench_metrics.py [--steps 60 --rounds 5 --batch 16 --scrape-interval 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # mlctl, and the test helpers (tiny_models, ranks)


def build_step(model_dir: str, batch: int, max_length: int):
    import torch
    from tiny_models import fixture_texts

    from mlctl.hub import load_tokenizer
    from mlctl.losses import contrastive_loss, inbatch_accuracy
    from mlctl.model import EncoderInputs, MLCTLModel, mask_tokens

    tok = load_tokenizer(model_dir)
    model = MLCTLModel.from_pretrained(model_dir, [1, -1])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    texts = fixture_texts()
    src, tgt = texts[0 : 2 * batch : 2], texts[1 : 2 * batch : 2]
    enc = tok(src + tgt, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    gen = torch.Generator().manual_seed(0)
    tokens = int(mask.sum())

    def step() -> dict:
        mlm_ids, labels = mask_tokens(ids, mask, special, tok.mask_token_id, len(tok), generator=gen)
        out = model(EncoderInputs.build(ids, mask, None, mlm_ids, labels))
        x, y = out.sentence[:batch], out.sentence[batch:]
        cl = contrastive_loss(x, y, cross_zero=True)
        loss = cl + 0.1 * out.mlm_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return {
            "loss": float(loss),
            "cl": float(cl),
            "mlm": float(out.mlm_loss),
            "acc": float(inbatch_accuracy(x.detach(), y.detach())),
            "grad_norm": float(norm),
        }

    return step, tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="", help="model folder (default: build the tiny test BERT)")
    ap.add_argument("--steps", type=int, default=60, help="steps per block")
    ap.add_argument("--rounds", type=int, default=5, help="off/on block pairs")
    ap.add_argument("--batch", type=int, default=16, help="pairs per step")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared machine quiet)")
    ap.add_argument("--scrape-interval", type=float, default=5.0, help="seconds between scrapes (0: none)")
    args = ap.parse_args(argv)

    import torch

    from mlctl.config import MetricsConfig
    from mlctl.metrics import MetricsExporter, StepMetrics, scrape

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_metrics_"))
    model_dir = args.model
    if not model_dir:
        from tiny_models import make_tiny_model

        model_dir = str(make_tiny_model(tmp / "tiny"))
    step, tokens = build_step(model_dir, args.batch, args.max_length)

    from ranks import free_port

    exp = MetricsExporter(
        MetricsConfig(port=free_port()), run="bench", rank=0, node="local", local_rank=0, run_dir=tmp / "run"
    )
    exp.start()
    stop = threading.Event()
    scrapes = 0

    def scraper() -> None:
        nonlocal scrapes
        while args.scrape_interval > 0 and not stop.wait(args.scrape_interval):
            scrape(exp.endpoint)
            scrapes += 1

    threading.Thread(target=scraper, daemon=True).start()

    for _ in range(10):  # warm-up: allocator, autograd graph caches
        step()

    times: dict[str, list[float]] = {"off": [], "on": []}
    log_costs: list[float] = []
    n = 0
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            for _ in range(args.steps):
                t0 = time.perf_counter()
                r = step()
                if mode == "on":
                    n += 1
                    t1 = time.perf_counter()
                    exp.log_step(
                        StepMetrics(
                            step=n,
                            loss=r["loss"],
                            contrastive_loss=r["cl"],
                            mlm_loss=r["mlm"],
                            samples=args.batch,
                            tokens=tokens,
                            step_seconds=t1 - t0,
                            data_wait_seconds=0.0,
                            lr=1e-4,
                            grad_norm=r["grad_norm"],
                            global_batch_size=args.batch,
                            inbatch_accuracy=r["acc"],
                        )
                    )
                    log_costs.append(time.perf_counter() - t1)
                times[mode].append(time.perf_counter() - t0)
    stop.set()
    exp.close()

    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    mean_off = statistics.fmean(times["off"])
    log_mean = statistics.fmean(log_costs)
    print(
        f"tiny BERT step, batch {args.batch} pairs, {args.threads} torch thread(s), "
        f"{args.rounds} x {args.steps} steps per mode, {scrapes} scrapes"
    )
    print(f"step time median: off {off * 1e3:.2f} ms | on {on * 1e3:.2f} ms | on/off {on / off:.4f}")
    print(
        f"log_step itself: mean {log_mean * 1e6:.1f} us, p99 {sorted(log_costs)[int(0.99 * len(log_costs))] * 1e6:.1f} us"
        f" = {100 * log_mean / mean_off:.3f}% of a mean step ({mean_off * 1e3:.2f} ms)"
    )
    print(f"metrics.jsonl: {sum(1 for _ in open(tmp / 'run' / 'metrics.jsonl'))} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
