"""Ablation of ML-CTL's parts (skeleton): train one run per variant, evaluate each on dev pairs.

    python bench/ablation.py --config configs/paper.yaml --pairs DEV.tsv.gz [--pairs ...] \
        [--variants full,sentence_only,...] [--out bench/ablation.json] [--dry-run] [key=value ...]

Each variant is the base config plus a few dotted overrides (the rows below); its run is named
``ablation-<variant>`` so a re-run resumes instead of starting over. ``--dry-run`` resolves and
validates every variant's config and prints what would run, without training.

NOTE: written ahead of the real-data ablation; the training runs themselves have not been made here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# variant -> overrides on top of the base config
VARIANTS: dict[str, list[str]] = {
    "full": [],  # CZ-NCE, word level (fusion MLP), MLM, layers [1, -1]
    "sentence_only": ["model.word_level=false"],
    "info_nce": ["loss.kind=info_nce"],
    "no_mlm": ["loss.mlm_weight=0"],
    "last_layer": ["model.pool_layers=[-1]"],
}


def main(argv: list[str] | None = None) -> int:
    from mlctl.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", default=None, help="base YAML config(s)")
    p.add_argument("--pairs", action="append", required=True, help="dev TSV files (en<TAB>xx)")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS)
    )
    p.add_argument("--max-pairs", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "bench" / "ablation.json"))
    p.add_argument("--dry-run", action="store_true", help="resolve the configs, train nothing")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant")
    args = p.parse_args(argv)

    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    configs = {}
    for name in names:  # resolve every config first, so a typo fails before hours of training
        configs[name] = load_config(
            args.config, [*args.overrides, *VARIANTS[name], f"ray.name=ablation-{name}"]
        )
    if args.dry_run:
        for name, cfg in configs.items():
            print(f"{name}: {VARIANTS[name] or '(base)'} -> run {cfg.ray.name}, {cfg.train.max_steps} steps")
        return 0

    missing = [f for f in args.pairs if not Path(f).is_file()]
    if missing:
        p.error(f"pairs files not found: {', '.join(missing)}")

    from launcher.ray_train import launch
    from mlctl.evaluate import evaluate_files, format_table
    from mlctl.export import load_run_model

    results = {}
    for name, cfg in configs.items():
        run_dir = launch(cfg)
        model, tokenizer, _ = load_run_model(run_dir)
        report = evaluate_files(model, tokenizer, args.pairs, max_pairs=args.max_pairs, progress=False)
        results[name] = {"run_dir": str(run_dir), "overrides": VARIANTS[name], **report}
        print(f"== {name}\n{format_table(report)}", flush=True)
        Path(args.out).write_text(
            json.dumps(results, indent=2) + "\n"
        )  # after each run: partial results survive
    print(f"{'variant':<15}{'xx->en':>9}{'en->xx':>9}{'mine F1':>9}")
    for name, r in results.items():
        m = r["mean"]
        print(
            f"{name:<15}{m['retrieval.xx2en']:>9.3f}{m['retrieval.en2xx']:>9.3f}{m.get('mining.f1', float('nan')):>9.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
