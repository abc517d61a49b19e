"""`mlctl prepare`: parallel corpora + bilingual dictionaries -> anchored WebDataset shards.

Pipeline: read (one reader per format, malformed lines counted) -> normalise, drop empty, length-ratio
and duplicate pairs (main process, since dedup needs one global view) -> chunks of pairs go to
``--workers`` processes that tokenize each chunk in one batched call, drop over-long pairs and mine
anchors -> results come back in input order, each kept record gets its key (input order) and its
source-sentence id -> records are spilled to hash buckets on disk and each bucket is permuted, so
the shards hold a global shuffle (deterministic from ``seed``; memory bounded by one bucket) and the
output is byte-identical for the same inputs and seed whatever the worker count.

The source-sentence id (``sid`` in each record's json) is a hash of the normalised source side.
In a multiway corpus all translations of one English line share it: the loss masks such pairs as
negatives of each other, and the global shuffle stops `read_multiway`'s consecutive pairs of one
line from sharing blocks and batches.

Several language pairs in one run: give each input its languages (``PATH:FORMAT:SRC-TGT``, or
``PrepareInput.src_lang/tgt_lang`` in a config) and each pair its dictionary (``--dictionary
de=PATH`` or ``--dictionary en-de=PATH``); a bare ``--dictionary PATH`` is for ``--src-lang`` -
``--tgt-lang``. A dictionary given as a folder is the paper's word-list format.

Code-switching (``--code-switch TGT=PATH``, repeatable): dictionaries from the source language into
other languages, used only to list, per record, the source words the loader may swap for a
translation (:mod:`mlctl.data.switch`); they never make anchors.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import logging
import multiprocessing as mp
import re
import shutil
import struct
import sys
import time
import uuid
from collections import Counter, deque
from pathlib import Path

from mlctl.config import PrepareConfig, PrepareInput
from mlctl.data.anchors import SpanMapper, mine_char_anchors
from mlctl.data.clean import Deduper, length_ratio_ok, normalize
from mlctl.data.dictionary import Dictionary, load_dictionary
from mlctl.data.output import StagedOutput
from mlctl.data.readers import FORMATS, check_input, detect_format, multiway_files, read_input
from mlctl.data.shards import ShardWriter, json_bytes, npy_bytes
from mlctl.data.skips import Counts, InputError
from mlctl.data.switch import switch_candidates

log = logging.getLogger(__name__)

CHUNK = 1000  # pairs per task: one batched tokenizer call, big enough to amortise the IPC
SHUFFLE_BUCKETS = 256  # spill files of the global shuffle: 25M pairs -> ~100k records (~300 MB) each
MANIFEST_VERSION = 2  # 2: per-shard bytes and sha256
_LANG_PAIR = re.compile(r"^([A-Za-z][\w]*)-([A-Za-z][\w]*)$")
_LANG = re.compile(r"^[A-Za-z]\w*$")


# --------------------------------------------------------------------------------------------------
# Specs


def parse_input_spec(spec: str, src_lang: str = "", tgt_lang: str = "") -> PrepareInput:
    """``PATH``, ``PATH:FORMAT`` or ``PATH:FORMAT:SRC-TGT`` (FORMAT may be empty: ``PATH::en-de``)."""
    parts = spec.split(":")
    if len(parts) >= 3 and parts[-2] in (*FORMATS, "") and _LANG_PAIR.match(parts[-1]):
        src, tgt = _LANG_PAIR.match(parts[-1]).groups()  # type: ignore[union-attr]
        return PrepareInput(":".join(parts[:-2]), parts[-2], src, tgt)
    if len(parts) >= 2 and parts[-1] in FORMATS:
        return PrepareInput(":".join(parts[:-1]), parts[-1], src_lang, tgt_lang)
    return PrepareInput(spec, "", src_lang, tgt_lang)


def _lang_spec(kind: str, spec: str, head: str, tail: str, form: str) -> tuple[str, str]:
    """``(src or '', tgt)`` of a ``[SRC-]TGT=PATH`` spec split at its '='; a message naming the spec
    and ``form`` for each way it can be malformed."""
    if not head:
        raise InputError(f"{kind} {spec!r} names no language before '=': expected {form}")
    if not tail:
        raise InputError(f"{kind} {spec!r} names no file after '=': expected {form}")
    m = _LANG_PAIR.match(head)
    if m:
        return m.group(1), m.group(2)
    if _LANG.match(head):
        return "", head
    raise InputError(
        f"{kind} {spec!r}: {head!r} is not a language code (TGT) or pair (SRC-TGT): expected {form}"
    )


def parse_dictionary_spec(spec: str, src_lang: str, tgt_lang: str) -> tuple[str, str, str]:
    """``PATH`` (default pair), ``TGT=PATH`` (source is ``src_lang``) or ``SRC-TGT=PATH``."""
    head, eq, tail = spec.partition("=")
    if eq and "/" not in head:
        src, tgt = _lang_spec("dictionary", spec, head, tail, "[[SRC-]TGT=]PATH, e.g. de=dicts/en-de.tsv")
        return src or src_lang, tgt, tail
    if not tgt_lang:
        raise InputError(f"dictionary {spec}: which language pair? write TGT=PATH or SRC-TGT=PATH")
    return src_lang, tgt_lang, spec


def parse_switch_spec(spec: str, src_lang: str) -> tuple[str, str, str]:
    """``TGT=PATH`` (source is ``src_lang``) or ``SRC-TGT=PATH``: a code-switch dictionary always
    names its target language."""
    head, eq, tail = spec.partition("=")
    form = "[SRC-]TGT=PATH, e.g. zh=dicts/en-zh.tsv"
    if not eq:
        raise InputError(f"code-switch dictionary {spec!r} names no language: expected {form}")
    src, tgt = _lang_spec("code-switch dictionary", spec, head, tail, form)
    return src or src_lang, tgt, tail


# --------------------------------------------------------------------------------------------------
# Worker side: tokenize a chunk in one batch, filter by token length, mine anchors

_W: dict = {}  # per-process state, filled by _init_worker (inherited through fork when workers > 1)


def _init_worker(
    tokenizer: str,
    dicts: dict,
    max_tokens: int,
    truncate: bool,
    keep_no_anchor: bool,
    switch: dict | None = None,
) -> None:
    from tokenizers import Tokenizer

    from mlctl.hub import load_tokenizer

    tok = load_tokenizer(tokenizer)
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())  # private copy: we change its settings
    backend.no_truncation()
    backend.no_padding()
    _W.update(
        backend=backend, dicts=dicts, max_tokens=max_tokens, truncate=truncate, keep_no_anchor=keep_no_anchor,
        switch=switch or {}, phrase_ids={},
    )  # fmt: skip


def _phrase_ids(phrase: str) -> list[int]:
    """Token ids of a code-switch translation, without special tokens (cached per worker)."""
    cache = _W["phrase_ids"]
    ids = cache.get(phrase)
    if ids is None:
        ids = cache[phrase] = _W["backend"].encode(phrase, add_special_tokens=False).ids
    return ids


def _token_anchors(chars, text_s, text_t, ms: SpanMapper, mt: SpanMapper) -> list[dict]:
    out = []
    for s0, s1, t0, t1 in chars:
        a, b = ms.span(s0, s1), mt.span(t0, t1)
        if a is not None and b is not None:
            out.append({"src": text_s[s0:s1], "tgt": text_t[t0:t1], "src_span": list(a), "tgt_span": list(b)})
    return out


def process_chunk(chunk: list[tuple[str, str, str, str, str]]) -> list[tuple]:
    """For each (src, tgt, src_lang, tgt_lang, where): ``("drop", reason)`` or
    ``("keep", meta, src_npy, tgt_npy, truncated)``."""
    backend, dicts, max_tok = _W["backend"], _W["dicts"], _W["max_tokens"]
    enc = backend.encode_batch([p[0] for p in chunk] + [p[1] for p in chunk])
    n = len(chunk)
    out: list[tuple] = []
    truncate, keep_empty, switch = _W["truncate"], _W["keep_no_anchor"], _W["switch"]
    for k, (src, tgt, sl, tl, where) in enumerate(chunk):
        es, et = enc[k], enc[n + k]
        # NOTE: len(encoding) is free; .ids/.offsets build Python lists, so they are only fetched for
        # pairs that survive the length filter and have an anchor (the ceiling never pays for them).
        long_s, long_t = len(es) > max_tok, len(et) > max_tok
        if (long_s or long_t) and not truncate:
            out.append(("drop", "too_long"))
            continue
        d = dicts.get((sl, tl))
        chars = mine_char_anchors(src, tgt, d) if d is not None else []
        if not chars and not keep_empty:
            out.append(("drop", "no_anchor"))
            continue
        ids_s, ids_t = es.ids, et.ids
        sw = switch.get(sl)
        off_s, off_t = (es.offsets if chars or sw else []), (et.offsets if chars else [])
        truncated = long_s or long_t
        # truncation keeps the closing special token so the sequence still looks like the model expects
        if long_s:
            ids_s, off_s = ids_s[: max_tok - 1] + ids_s[-1:], off_s[: max_tok - 1] + [(0, 0)]
        if long_t:
            ids_t, off_t = ids_t[: max_tok - 1] + ids_t[-1:], off_t[: max_tok - 1] + [(0, 0)]
        anchors = _token_anchors(chars, src, tgt, SpanMapper(off_s), SpanMapper(off_t)) if chars else []
        if not anchors and not keep_empty:  # every anchor fell past a truncation
            out.append(("drop", "no_anchor"))
            continue
        meta = {"src_lang": sl, "tgt_lang": tl, "src": src, "tgt": tgt, "anchors": anchors, "source": where}
        if sw:
            meta["switch"] = switch_candidates(src, sw, SpanMapper(off_s), _phrase_ids)
        out.append(("keep", meta, npy_bytes(ids_s), npy_bytes(ids_t), truncated))
    return out


# --------------------------------------------------------------------------------------------------
# Main side


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


class _Shuffler:
    """Global shuffle with bounded memory: records go to ``SHUFFLE_BUCKETS`` spill files by a hash of
    (seed, key); :meth:`drain` reads one bucket at a time, permutes it with ``rng(seed, bucket)`` and
    yields its records. The spill format is length-prefixed raw bytes (no pickle)."""

    _HEAD = struct.Struct("<IIII")

    def __init__(self, folder: Path, seed: int) -> None:
        self.dir, self.seed = folder, seed
        folder.mkdir(parents=True, exist_ok=True)
        self.files = [open(folder / f"bucket-{i:03d}.bin", "wb") for i in range(SHUFFLE_BUCKETS)]

    def add(self, key: str, meta: bytes, src: bytes, tgt: bytes) -> None:
        h = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=8).digest()
        k = key.encode("utf-8")
        f = self.files[int.from_bytes(h, "little") % SHUFFLE_BUCKETS]
        f.write(self._HEAD.pack(len(k), len(meta), len(src), len(tgt)) + k + meta + src + tgt)

    def drain(self):
        import numpy as np

        for f in self.files:
            f.close()
        for i, f in enumerate(self.files):
            raw = Path(f.name).read_bytes()
            Path(f.name).unlink()
            recs, pos = [], 0
            while pos < len(raw):
                lens = self._HEAD.unpack_from(raw, pos)
                pos += self._HEAD.size
                parts = []
                for n in lens:
                    parts.append(raw[pos : pos + n])
                    pos += n
                recs.append(parts)
            del raw
            for j in np.random.default_rng([self.seed, i]).permutation(len(recs)):
                key, meta, src, tgt = recs[j]
                yield key.decode("utf-8"), meta, src, tgt

    def close(self) -> None:
        for f in self.files:
            f.close()
        shutil.rmtree(self.dir, ignore_errors=True)


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


def _chunks(it, size: int):
    chunk = []
    for item in it:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ray_chunk(run: str, init_args: tuple, chunk: list) -> list[tuple]:
    """Ray task body: set the worker process up once per run (same settings as a local worker),
    then the same :func:`process_chunk` as a local run, so the shards come out byte for byte the same."""
    if _W.get("run") != run:
        _init_worker(*init_args)
        _W["run"] = run
    return process_chunk(chunk)


def _ray_results(chunks, address: str, tasks: int, init_args: tuple):
    """Each chunk's results in input order, computed as Ray tasks (``tasks`` in flight at most x2).

    ``address`` is a cluster address (as for ``ray.init``) or ``local`` for an embedded Ray on
    loopback; a Ray this function started is shut down when it ends."""
    import ray

    started = False
    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=max(1, tasks), include_dashboard=False, _node_ip_address="127.0.0.1")
        else:
            ray.init(address=address)
        started = True
    try:
        remote = ray.remote(num_cpus=1)(_ray_chunk)
        # NOTE: the dictionaries go to the object store once; every task gets them by reference.
        args_ref = ray.put(init_args)
        run = uuid.uuid4().hex
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, remote.remote(run, args_ref, chunk)))
            if len(pending) >= 2 * tasks:
                c, ref = pending.popleft()
                yield c, ray.get(ref)
        while pending:
            c, ref = pending.popleft()
            yield c, ray.get(ref)
    finally:
        if started:
            ray.shutdown()


def _ordered_results(chunks, workers: int, init_args: tuple):
    """Each chunk's results, in input order; at most 2 x workers chunks in flight (bounded memory)."""
    if workers <= 1:
        _init_worker(*init_args)
        for chunk in chunks:
            yield chunk, process_chunk(chunk)
        return
    # NOTE: fork shares the loaded dictionaries with the workers without pickling them. gc.freeze()
    # keeps the children's garbage collector from walking (and so copying, page by page) the
    # parent's hundreds of thousands of dictionary objects; without it 2 workers were slower than 1.
    ctx = mp.get_context("fork")
    gc.freeze()
    try:
        with ctx.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append((chunk, pool.apply_async(process_chunk, (chunk,))))
                if len(pending) >= 2 * workers:
                    c, res = pending.popleft()
                    yield c, res.get()
            while pending:
                c, res = pending.popleft()
                yield c, res.get()
    finally:
        gc.unfreeze()


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
    shuffler = _Shuffler(out / ".shuffle", cfg.seed)
    progress = _Progress()
    kept = truncated = n_anchors = n_switch = with_switch = 0
    t0 = time.perf_counter()
    init_args = (tokenizer, dicts, cfg.max_tokens, cfg.truncate, cfg.keep_no_anchor, switch)
    try:
        chunks = _chunks(_cleaned(inputs, cfg, counts, stats), CHUNK)
        if address:
            ordered = _ray_results(chunks, address, cfg.workers, init_args)
        else:
            ordered = _ordered_results(chunks, cfg.workers, init_args)
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


# --------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        help="YAML whose data.prepare section is a PrepareConfig "
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

        full = load_config(args.config)
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
