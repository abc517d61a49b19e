#!/usr/bin/env bash
# Issue 24: alignment quality at equal pairs (6,144 = 96 x 64 = 24 x 256 = 6 x 1,024) for the
# default recipe (configs/proof.yaml) and sentence-transformers MNRL / cached MNRL at 1e-4 and 2e-4,
# one seed, one torch thread, dev sets of bench/alignment.py. Batches over 64 run the cached step
# (loss.cache_chunk=64). Runs already in WORK's results.json are skipped; the table comes last.
#
#   bash bench/batch_study.sh [WORK]     # ~2 h on one CPU core; needs ../shared/data
set -u
cd "$(dirname "$0")/.."
W=${1:-runs/alignment-batch}
B=".venv/bin/python bench/alignment.py --work $W --threads 1 --seed 0"
run() { echo "=== $(date +%T) $*"; $B "$@" 2>&1 | grep -E "trained [0-9]+ pairs|done earlier|Error|error"; }
run --arms default --steps 96 --batch 64 --label default-b64
run --arms mnrl --steps 96 --batch 64 --peer-lr 1e-4 --label mnrl-1e-4-b64
run --arms mnrl --steps 96 --batch 64 --peer-lr 2e-4 --label mnrl-2e-4-b64
run --arms default --steps 24 --batch 256 --label default-b256 loss.cache_chunk=64
run --arms default --steps 24 --batch 256 --label default-b256-lr4e-4 loss.cache_chunk=64 train.lr=4e-4
run --arms mnrl --steps 24 --batch 256 --peer-lr 1e-4 --label mnrl-1e-4-b256
run --arms mnrl --steps 24 --batch 256 --peer-lr 2e-4 --label mnrl-2e-4-b256
run --arms default --steps 6 --batch 1024 --label default-b1024 loss.cache_chunk=64
run --arms default --steps 6 --batch 1024 --label default-b1024-lr8e-4 loss.cache_chunk=64 train.lr=8e-4
run --arms cmnrl --steps 6 --batch 1024 --peer-lr 1e-4 --label cmnrl-1e-4-b1024
run --arms cmnrl --steps 6 --batch 1024 --peer-lr 2e-4 --label cmnrl-2e-4-b1024
# two more seeds at batch 64 (another sample of the train pairs, other initial heads and order)
for s in 1 2; do
  B=".venv/bin/python bench/alignment.py --work $W --threads 1 --seed $s"
  run --arms default --steps 96 --batch 64 --label default-b64-seed$s
  run --arms mnrl --steps 96 --batch 64 --peer-lr 1e-4 --label mnrl-1e-4-b64-seed$s
  run --arms mnrl --steps 96 --batch 64 --peer-lr 2e-4 --label mnrl-2e-4-b64-seed$s
done
.venv/bin/python - "$W/results.json" <<'PY'
import json, re, sys

res = json.load(open(sys.argv[1]))
langs = list(res["untrained"]["eval"])
base = {l: res["untrained"]["eval"][l]["xx2en"] for l in langs}
mean = lambda r: sum(r["eval"][l]["xx2en"] for l in langs) / len(langs)
batch = lambda k: int(re.search(r"-b(\d+)", k).group(1))
peers = [k for k in res if k.startswith(("mnrl-", "cmnrl-"))]
print("xx->en retrieval on the dev sets; gain = accuracy - untrained; x = gain / the gain of the best")
print("peer (MNRL or cached MNRL, 1e-4 or 2e-4) at the same batch, steps and seed")
print(f"| run | batch | steps | {' | '.join(langs)} | mean | gain | x best peer |")
print("|---" * (len(langs) + 6) + "|")
print(f"| untrained | - | - | {' | '.join(f'{base[l]:.3f}' for l in langs)} | {sum(base.values()) / len(langs):.3f} | - | - |")
u = sum(base.values()) / len(langs)
for k in sorted((k for k in res if k != "untrained"), key=lambda k: (batch(k), res[k]["tag"], not k.startswith("default"), k)):
    b = batch(k)
    best = max((mean(res[p]) for p in peers if res[p]["tag"] == res[k]["tag"]), default=None)
    x = f"{(mean(res[k]) - u) / (best - u):.2f}x" if best else "-"
    row = " | ".join(f"{res[k]['eval'][l]['xx2en']:.3f}" for l in langs)
    print(f"| {k} | {b} | {6144 // b} | {row} | {mean(res[k]):.3f} | {mean(res[k]) - u:+.3f} | {x} |")
PY
