"""The `mlctl prepare` pipeline: parallel corpora + bilingual dictionaries -> anchored WebDataset
shards, as :func:`prepare` (the verb's flags are :mod:`mlctl.data.prepare_verb`'s).

Pipeline: read (one reader per format, malformed lines counted; :mod:`mlctl.data.readers`) ->
normalise, drop empty, length-ratio and duplicate pairs (main process, since dedup needs one global
view) -> chunks of pairs go to ``--workers`` processes (or Ray tasks) that tokenize each chunk in one
batched call, drop over-long pairs and mine anchors, and the results come back in input order
(:mod:`mlctl.data.chunks`) -> each kept record gets its key (input order) and its source-sentence id
-> records are spilled to hash buckets on disk and each bucket is permuted (:mod:`mlctl.data.shuffle`),
so the shards hold a global shuffle (deterministic from ``seed``; memory bounded by one bucket) and
the output is byte-identical for the same inputs and seed whatever the worker count.

The source-sentence id (``sid`` in each record's json) is a hash of the normalised source side.
In a multiway corpus all translations of one English line share it: the loss masks such pairs as
negatives of each other, and the global shuffle stops `read_multiway`'s consecutive pairs of one
line from sharing blocks and batches.

Several language pairs in one run: give each input its languages (``PATH:FORMAT:SRC-TGT``, or
``PrepareInput.src_lang/tgt_lang`` in a config) and each pair its dictionary (``--dictionary
de=PATH`` or ``--dictionary en-de=PATH``; :mod:`mlctl.data.specs`); a bare ``--dictionary PATH`` is for ``--src-lang`` -
``--tgt-lang``. A dictionary given as a folder is the paper's word-list format.

Code-switching (``--code-switch TGT=PATH``, repeatable): dictionaries from the source language into
other languages, used only to list, per record, the source words the loader may swap for a
translation (:mod:`mlctl.data.switch`); they never make anchors.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import time
from collections import Counter
from pathlib import Path

from mlctl.config import PrepareConfig
from mlctl.data.chunks import CHUNK, chunked, ordered_results, ray_results
from mlctl.data.clean import Deduper, length_ratio_ok, normalize
from mlctl.data.dictionary import Dictionary, load_dictionary
from mlctl.data.output import StagedOutput
from mlctl.data.readers import check_input, detect_format, multiway_files, read_input
from mlctl.data.shards import ShardWriter, json_bytes
from mlctl.data.shuffle import Shuffler
from mlctl.data.skips import Counts, InputError
from mlctl.data.specs import parse_dictionary_spec, parse_switch_spec

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2  # 2: per-shard bytes and sha256


# --------------------------------------------------------------------------------------------------
# The pipeline


def _resolve_inputs(cfg: PrepareConfig) -> list[tuple[Path, str, str, str, str]]:
    """(path, format, source language, target language, encoding) of each input, checked."""
    if not cfg.inputs:
        raise InputError("no --input given")
    out = []
    for inp in cfg.inputs:
        path = Path(inp.path)
        src, tgt = inp.src_lang or cfg.src_lang, inp.tgt_lang or cfg.tgt_lang
        if not path.exists() and (inp.format or "") != "moses":
            raise InputError(f"input file not found: {path}")
        fmt = inp.format or detect_format(path)
        check_input(path, fmt, src, tgt, inp.encoding)
        out.append((path, fmt, src, tgt, inp.encoding))
    return out


def _language_pairs(inputs) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for path, _fmt, src, tgt, _enc in inputs:
        tgts = [tgt] if tgt else [lang for lang in multiway_files(path) if lang != src]
        for t in tgts:
            if (src, t) not in pairs:
                pairs.append((src, t))
    return pairs


def _load_dictionaries(cfg: PrepareConfig, pairs) -> dict[tuple[str, str], Dictionary]:
    dicts: dict[tuple[str, str], Dictionary] = {}
    for spec in cfg.dictionaries:
        src, tgt, path = parse_dictionary_spec(spec, cfg.src_lang, cfg.tgt_lang)
        d = dicts.get((src, tgt))
        dicts[(src, tgt)] = load_dictionary(path, src, tgt, into=d)
    missing = [f"{s}-{t}" for s, t in pairs if (s, t) not in dicts]
    if missing and not cfg.keep_no_anchor:
        raise InputError(
            f"no dictionary for language pair(s) {', '.join(missing)}: every pair would be "
            "dropped for lack of anchors (give --dictionary TGT=PATH, or --keep-no-anchor)"
        )
    return dicts


def _load_switch(cfg: PrepareConfig) -> dict[str, list[Dictionary]]:
    """Code-switch dictionaries by source language, one :class:`Dictionary` per (source, target)."""
    by_pair: dict[tuple[str, str], Dictionary] = {}
    for spec in cfg.code_switch:
        src, tgt, path = parse_switch_spec(spec, cfg.src_lang)
        d = by_pair.get((src, tgt))
        by_pair[(src, tgt)] = load_dictionary(path, src, tgt, into=d, what="code-switch dictionary")
    out: dict[str, list[Dictionary]] = {}
    for (src, _), d in by_pair.items():
        out.setdefault(src, []).append(d)
    return out


def source_id(src: str) -> str:
    """Source-sentence id of a pair: 16 hex digits of a hash of its normalised source side."""
    return hashlib.blake2b(src.encode("utf-8"), digest_size=8).hexdigest()


class _Progress:
    """One self-overwriting stderr line with pairs/s (a log line instead when stderr is not a tty)."""

    def __init__(self, every: float = 1.0) -> None:
        self.t0 = self.last = time.perf_counter()
        self.every = every
        self.tty = sys.stderr.isatty()

    def update(self, read: int, kept: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.last < (self.every if self.tty else 30.0):
            return
        self.last = now
        rate = read / max(now - self.t0, 1e-9)
        msg = f"prepare: {read:,} pairs read, {kept:,} kept, {rate:,.0f} pairs/s"
        if self.tty:
            sys.stderr.write("\r" + msg + ("\n" if final else ""))
            sys.stderr.flush()
        else:
            log.info(msg)


def _cleaned(inputs, cfg: PrepareConfig, counts: Counts, stats: dict):
    """Normalised, filtered, deduplicated pairs as tuples for the workers."""
    dedup = Deduper()
    for path, fmt, src_lang, tgt_lang, encoding in inputs:
        for raw in read_input(path, fmt, src_lang, tgt_lang, counts, encoding):
            stats["read"] += 1
            per = stats["per_pair"].setdefault(f"{raw.src_lang}-{raw.tgt_lang}", Counter())
            per["read"] += 1
            src, tgt = normalize(raw.src), normalize(raw.tgt)
            if not src or not tgt:
                counts.skip("empty", raw.where)
            elif not length_ratio_ok(src, tgt, cfg.max_length_ratio):
                counts.skip("length_ratio", raw.where, f"{len(src)} vs {len(tgt)} characters")
            elif not dedup.is_new(raw.src_lang, raw.tgt_lang, src, tgt):
                counts.skip("duplicate", raw.where)
            else:
                yield (src, tgt, raw.src_lang, raw.tgt_lang, raw.where)


def _key(src_lang: str, tgt_lang: str, n: int) -> str:
    return re.sub(r"[^\w-]", "_", f"{src_lang}-{tgt_lang}") + f"-{n:09d}"


def prepare(cfg: PrepareConfig, tokenizer: str, address: str = "") -> dict:
    """Run the whole preparation; returns the manifest (also written to ``cfg.out/manifest.json``).

    With ``address`` (a Ray cluster address, or ``local``) the chunks are tokenized and mined as Ray
    tasks, ``cfg.workers`` of them in flight (x2); reading, cleaning, the shuffle and the writing
    stay in this process, so the output is byte for byte that of a local run. The tokenizer name
    must resolve on every node (a path on a shared disk, or a packaged alias).

    ``cfg.out`` is a folder or an object-store URI (:mod:`mlctl.storage`). The run writes into a
    staging folder of its own and replaces the output's dataset only when it succeeds
    (:mod:`mlctl.data.output`): any failure, Ctrl-C included, leaves the previous dataset as it was.

    Raises :class:`~mlctl.data.skips.InputError` before writing anything when an input is missing,
    has an unknown format, or a dictionary cannot be read; and at the end when no pair was kept.
    Raises :class:`~mlctl.lock.LockHeld` when another prepare writes to the same output."""
    from mlctl.hub import load_tokenizer

    if not cfg.out:
        raise InputError("no output folder (--out)")
    if cfg.max_tokens < 4:
        raise InputError(f"max_tokens must be >= 4, got {cfg.max_tokens}")
    # The specs' syntax first, before any file is opened ("?": a bare PATH's missing pair is
    # reported where the dictionaries are loaded, with the inputs' language pairs known).
    for spec in cfg.dictionaries:
        parse_dictionary_spec(spec, cfg.src_lang, cfg.tgt_lang or "?")
    for spec in cfg.code_switch:
        parse_switch_spec(spec, cfg.src_lang)
    inputs = _resolve_inputs(cfg)
    pairs = _language_pairs(inputs)
    dicts = _load_dictionaries(cfg, pairs)
    switch = _load_switch(cfg)
    srcs = {s for s, _ in pairs}
    if switch and not srcs & set(switch):
        raise InputError(
            f"code-switch dictionaries translate from {', '.join(sorted(switch))}, but the inputs' "
            f"source language is {', '.join(sorted(srcs))}: nothing could be switched"
        )
    tok = load_tokenizer(tokenizer)
    if tok.pad_token_id is None:
        raise InputError(f"tokenizer {tokenizer!r} has no pad token; the loader pads with it")

    with StagedOutput(cfg.out) as stage:
        manifest = _write(cfg, tokenizer, tok, address, inputs, dicts, switch, stage.dir)
        stage.publish(manifest)
    return manifest


def _nothing_kept(inputs, stats: dict, dropped: dict) -> str:
    names = ", ".join(str(p) for p, *_ in inputs)
    why = "no pairs in the input" if stats["read"] == 0 else f"every pair was dropped ({dropped})"
    return f"nothing to train on from {names}: {why}"


def _write(cfg: PrepareConfig, tokenizer: str, tok, address: str, inputs, dicts, switch, out: Path) -> dict:
    """Read, clean, tokenize, mine and shuffle into shards under ``out`` (the staging folder); the
    manifest, or :class:`InputError` when no pair is kept (shards with nothing in them would only
    fail later, in every training worker)."""
    from mlctl.hub import tokenizer_fingerprint

    counts = Counts()
    stats: dict = {"read": 0, "per_pair": {}}
    writer = ShardWriter(out, cfg.samples_per_shard)
    shuffler = Shuffler(out / ".shuffle", cfg.seed)
    progress = _Progress()
    kept = truncated = n_anchors = n_switch = with_switch = 0
    t0 = time.perf_counter()
    init_args = (tokenizer, dicts, cfg.max_tokens, cfg.truncate, cfg.keep_no_anchor, switch)
    try:
        chunks = chunked(_cleaned(inputs, cfg, counts, stats), CHUNK)
        if address:
            ordered = ray_results(chunks, address, cfg.workers, init_args)
        else:
            ordered = ordered_results(chunks, cfg.workers, init_args)
        for chunk, results in ordered:
            for pair, res in zip(chunk, results, strict=True):
                per = stats["per_pair"][f"{pair[2]}-{pair[3]}"]
                if res[0] == "drop":
                    counts.skip(res[1], pair[4])
                    per[res[1]] += 1
                    continue
                _, meta, src_npy, tgt_npy, was_truncated = res
                key = _key(pair[2], pair[3], kept)
                meta["id"] = key
                meta["sid"] = source_id(pair[0])
                shuffler.add(key, json_bytes(meta), src_npy, tgt_npy)
                kept += 1
                truncated += was_truncated
                n_anchors += len(meta["anchors"])
                n_switch += len(meta.get("switch", ()))
                with_switch += bool(meta.get("switch"))
                per["kept"] += 1
                per["anchors"] += len(meta["anchors"])
                per["with_anchor"] += bool(meta["anchors"])
            progress.update(stats["read"], kept)
        for rec in shuffler.drain():
            writer.write(*rec)
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        shuffler.close()
    seconds = time.perf_counter() - t0
    progress.update(stats["read"], kept, final=True)

    dropped = dict(sorted(counts.by_reason.items()))
    if kept == 0:
        raise InputError(_nothing_kept(inputs, stats, dropped))
    mined = kept + dropped.get("no_anchor", 0)  # pairs that reached anchor mining
    with_anchor = sum(p["with_anchor"] for p in stats["per_pair"].values())
    manifest = {
        "format_version": MANIFEST_VERSION,
        "tokenizer": {"name": tokenizer, "hash": tokenizer_fingerprint(tok), "pad_id": tok.pad_token_id},
        "max_tokens": cfg.max_tokens,
        "truncate": cfg.truncate,
        "max_length_ratio": cfg.max_length_ratio,
        "keep_no_anchor": cfg.keep_no_anchor,
        "seed": cfg.seed,
        "shuffled": True,
        "inputs": [
            {"path": str(p), "format": f, "src_lang": s, "tgt_lang": t, **({"encoding": e} if e else {})}
            for p, f, s, t, e in inputs
        ],
        "dictionaries": {
            f"{s}-{t}": {"sources": d.sources, "entries": len(d)} for (s, t), d in dicts.items()
        },
        "counts": {
            "read": stats["read"],
            "kept": kept,
            "dropped": dropped,
            "dropped_total": sum(dropped.values()),
            "truncated": truncated,
        },
        "anchors_per_pair": round(n_anchors / kept, 4) if kept else 0.0,
        "code_switch": {
            f"{d.src_lang}-{d.tgt_lang}": {"sources": d.sources, "entries": len(d)}
            for ds in switch.values()
            for d in ds
        },
        "switch_words_per_pair": round(n_switch / kept, 4) if kept else 0.0,
        "switch_pair_coverage": round(with_switch / kept, 4) if kept else 0.0,
        "anchor_coverage": round(with_anchor / mined, 4) if mined else 0.0,
        "language_pairs": {
            lp: {
                "read": p["read"],
                "kept": p["kept"],
                "anchors_per_pair": round(p["anchors"] / p["kept"], 4) if p["kept"] else 0.0,
                "anchor_coverage": round(p["with_anchor"] / max(1, p["kept"] + p["no_anchor"]), 4),
            }
            for lp, p in sorted(stats["per_pair"].items())
        },
        "num_samples": kept,
        "shards": shards,
        "seconds": round(seconds, 2),  # informational; everything else is deterministic
    }
    return manifest
