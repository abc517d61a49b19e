"""`mlctl prepare`: its flags, or a config's ``data.prepare`` section with the flags on top, become a
:class:`~mlctl.config.PrepareConfig` for :func:`mlctl.data.prepare.prepare`; the verb prints one
summary line, or one error line for bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mlctl.config import PrepareConfig
from mlctl.data.prepare import prepare
from mlctl.data.readers import FORMATS
from mlctl.data.skips import InputError
from mlctl.data.specs import parse_input_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        help="YAML (or a stock config's name, e.g. proof) whose data.prepare section is a PrepareConfig "
        "(model.tokenizer or model.name_or_path gives the tokenizer); flags override it",
    )
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="PATH[:FORMAT[:SRC-TGT]]",
        help=f"input corpus (repeatable); FORMAT one of {', '.join(FORMATS)}, else from "
        "the extension; SRC-TGT overrides --src-lang/--tgt-lang for this input",
    )
    parser.add_argument(
        "--encoding",
        default=None,
        help="text encoding of every --input (e.g. latin-1, cp1252); default: the file's byte-order mark "
        "or declared charset (.po header, TMX declaration), else UTF-8",
    )
    parser.add_argument("--src-lang", default=None)
    parser.add_argument("--tgt-lang", default=None)
    parser.add_argument(
        "--dictionary",
        action="append",
        default=[],
        metavar="[[SRC-]TGT=]PATH",
        help="bilingual dictionary: TSV file or folder of word lists {lang}.txt (repeatable)",
    )
    parser.add_argument(
        "--code-switch",
        action="append",
        default=[],
        metavar="[SRC-]TGT=PATH",
        help="dictionary whose translations the loader may swap into source sides "
        "(data.code_switch > 0 at train time); TSV file or word-list folder (repeatable)",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer name, packaged alias or folder")
    parser.add_argument("--out", default=None, help="output folder for shards and manifest.json")
    parser.add_argument("--samples-per-shard", type=int, default=None)
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="longest side in tokens, specials included"
    )
    parser.add_argument(
        "--truncate",
        action="store_true",
        default=None,
        help="truncate over-long pairs instead of dropping them",
    )
    parser.add_argument(
        "--max-length-ratio",
        type=float,
        default=None,
        help="drop pairs whose character lengths differ more than this (0: off)",
    )
    parser.add_argument(
        "--keep-no-anchor",
        action="store_true",
        default=None,
        help="keep pairs without any anchor (their span is the whole sentence)",
    )
    parser.add_argument("--workers", type=int, default=None, help="tokenize/mine in N processes")
    parser.add_argument("--seed", type=int, default=None, help="seed of the global shuffle (default 0)")
    parser.add_argument(
        "--address",
        default="",
        help="run the tokenize/mine chunks as tasks on this Ray cluster ('local': an embedded Ray); "
        "--workers tasks in flight",
    )


def config_from_args(args: argparse.Namespace) -> tuple[PrepareConfig, str]:
    """The PrepareConfig and tokenizer name from --config and flags (flags win)."""
    tokenizer = ""
    if args.config:
        from mlctl.config import load_config
        from mlctl.stock import config_path

        full = load_config(config_path(args.config))
        cfg = full.data.prepare
        tokenizer = full.model.tokenizer or full.model.name_or_path
    else:
        cfg = PrepareConfig()
    if args.src_lang is not None:
        cfg.src_lang = args.src_lang
    if args.tgt_lang is not None:
        cfg.tgt_lang = args.tgt_lang
    if args.input:
        cfg.inputs = [parse_input_spec(s) for s in args.input]
    if getattr(args, "encoding", None):
        for inp in cfg.inputs:
            inp.encoding = args.encoding
    if args.dictionary:
        cfg.dictionaries = list(args.dictionary)
    if getattr(args, "code_switch", None):
        cfg.code_switch = list(args.code_switch)
    for name in (
        "out",
        "samples_per_shard",
        "max_tokens",
        "truncate",
        "max_length_ratio",
        "keep_no_anchor",
        "workers",
        "seed",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    tokenizer = args.tokenizer or tokenizer
    if not tokenizer:
        raise InputError("no tokenizer: give --tokenizer (or model.tokenizer in --config)")
    return cfg, tokenizer


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = None
    try:
        cfg, tokenizer = config_from_args(args)
        m = prepare(cfg, tokenizer, getattr(args, "address", ""))
    except InputError as e:
        print(f"mlctl prepare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f"; {cfg.out} is as it was before" if cfg is not None and cfg.out else ""
        print(f"mlctl prepare: interrupted{where}", file=sys.stderr)
        return 130
    except OSError as e:
        if cfg is not None and e.filename is None and e.errno is not None:
            # A write to an open file (a full disk) names no path; the output folder is where it was.
            raise OSError(e.errno, e.strerror, str(cfg.out)) from e
        raise
    c = m["counts"]
    print(
        f"{c['kept']:,} of {c['read']:,} pairs kept in {len(m['shards'])} shard(s) under {cfg.out}; "
        f"anchors/pair {m['anchors_per_pair']:.2f}, anchor coverage {m['anchor_coverage']:.1%}; "
        f"dropped {c['dropped']}"
    )
    return 0
