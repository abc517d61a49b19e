"""The paper's ablation: info-snt vs CZ-snt vs ML-CTL, same data, steps and seeds.

    python bench/ablation.py -c configs/proof.yaml --pairs ../shared/data/dev/de.tsv.gz \
        --pairs ../shared/data/dev/fr.tsv.gz --pairs ../shared/data/dev/es.tsv.gz \
        [--seeds 0,1,2] [--arms info-snt,cz-snt,ml-ctl] [--out bench/ablation.json] [key=value ...]

Each arm is the base config(s) plus ``configs/ablation/<arm>.yaml``; every arm gets exactly the
same overrides, steps, data and seeds (nothing is tuned per arm). Each (arm, seed) is a normal
``mlctl train`` run named ``ablation-<arm>-s<seed>``, so an interrupted ablation resumes. After
training, the run's encoder (sentence vectors, the model's pooling) is evaluated on the dev pairs:
Tatoeba-style retrieval accuracy (xx->en) and BUCC-style mining F1, and the table prints the mean
and standard deviation over seeds, like the paper's last table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARMS = ("info-snt", "cz-snt", "ml-ctl", "ml-ctl-snt")


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


def main(argv: list[str] | None = None) -> int:
    from mlctl.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config", action="append", required=True, help="base YAML config(s)")
    p.add_argument("--pairs", action="append", required=True, help="dev TSV files (en<TAB>xx)")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-pairs", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "bench" / "ablation.json"))
    p.add_argument("--dry-run", action="store_true", help="resolve and validate every config, train nothing")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every arm")
    args = p.parse_args(argv)

    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    configs = {}
    for arm in arms:  # resolve every config first, so a typo fails before hours of training
        for seed in seeds:
            configs[(arm, seed)] = load_config(
                [*args.config, str(ROOT / "configs" / "ablation" / f"{arm}.yaml")],
                [
                    *args.overrides,
                    f"train.seed={seed}",
                    f"data.seed={seed}",
                    f"ray.name=ablation-{arm}-s{seed}",
                    "eval.every_steps=0",
                ],
            )
    if args.dry_run:
        for (arm, seed), cfg in configs.items():
            print(
                f"{arm} seed {seed}: loss={cfg.loss.kind} word_level={cfg.model.word_level} "
                f"steps={cfg.train.max_steps} run={cfg.ray.name}"
            )
        return 0
    missing = [f for f in args.pairs if not Path(f).is_file()]
    if missing:
        p.error(f"pairs files not found: {', '.join(missing)}")

    from launcher.ray_train import launch
    from mlctl.evaluate import evaluate_files
    from mlctl.export import load_run_model

    out = Path(args.out)
    results: dict[str, dict] = json.loads(out.read_text()) if out.is_file() else {}
    for (arm, seed), cfg in configs.items():
        key = f"{arm}/s{seed}"
        if key in results:
            continue  # done in an earlier invocation
        run_dir = launch(cfg)
        model, tokenizer, _ = load_run_model(run_dir)
        report = evaluate_files(model.eval(), tokenizer, args.pairs, max_pairs=args.max_pairs, progress=False)
        results[key] = {"arm": arm, "seed": seed, "run_dir": str(run_dir), "mean": report["mean"]}
        out.write_text(json.dumps(results, indent=2) + "\n")  # partial results survive an interruption
        print(f"[ablation] {key}: {report['mean']}", flush=True)

    print(
        f"\n{'arm':<10}{'retrieval xx->en':>20}{'retrieval en->xx':>20}{'mining F1':>20}   (mean ± sd over seeds)"
    )
    for arm in arms:
        rows = [r["mean"] for r in results.values() if r["arm"] == arm and r["seed"] in seeds]
        print(
            f"{arm:<10}{spread([r['retrieval.xx2en'] for r in rows]):>20}"
            f"{spread([r['retrieval.en2xx'] for r in rows]):>20}"
            f"{spread([r['mining.f1'] for r in rows if 'mining.f1' in r]):>20}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
