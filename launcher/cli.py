"""The `mlctl` command (the console script, and ``python -m launcher.cli``). Each verb lives in its
own module exposing ``add_arguments(parser)`` and ``run(args) -> int``: the library's verbs in
``mlctl``, the ones that start or reach Ray (train, stop, demo) here, so that the command sits on
top of both packages and ``mlctl`` never imports ``launcher``. Every verb module imports with the
core install alone; a verb that needs an optional package (:mod:`mlctl.extras`) says which extra to
install when it runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "prepare": ("mlctl.data.prepare_verb", "parallel corpora + dictionary -> anchored WebDataset shards"),
    "train": ("launcher.train", "train ML-CTL: Ray-orchestrated DeepSpeed workers, checkpoints, resume"),
    "eval": ("mlctl.evaluate", "retrieval accuracy and bitext-mining F1 of an encoder or run"),
    "export": ("mlctl.export", "a run's encoder as a HuggingFace / sentence-transformers folder"),
    "stop": ("launcher.stop", "ask running trainings to stop after their current step and save"),
    "report": ("mlctl.report", "plot a run's metrics.jsonl (loss, throughput, eval accuracy) to PNG"),
    "demo": ("launcher.demo", "the main job on bundled data (what `make demo` runs)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlctl",
        description="Align multilingual text encoders with ML-CTL (multi-level contrastive learning).",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, and the libraries' own output (progress bars, load reports) where a verb hides it",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module, helptext) in VERBS.items():
        p = sub.add_parser(verb, help=helptext, description=helptext)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verb:
        parser.print_help()
        return 2
    from mlctl.config import ConfigError
    from mlctl.extras import MissingExtra
    from mlctl.lock import LockHeld

    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print(f"mlctl {args.verb}: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, ValueError, MissingExtra, LockHeld) as e:
        print(f"mlctl {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full disk, a file where a folder should be: name the path
        where = f": {e.filename}" if e.filename else ""
        print(f"mlctl {args.verb}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
