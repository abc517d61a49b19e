"""Prepare's parallel stage. Cleaned pairs go out in chunks of ``CHUNK``; each chunk is tokenized
in one batched call, over-long pairs are dropped (or truncated), anchors mined and code-switch
candidates listed (:func:`process_chunk`). Chunks run in ``--workers`` forked processes, or as Ray
tasks on a cluster, at most two per worker in flight (bounded memory), and their results come back
in input order: the shards are byte for byte the same whatever the worker count or where it ran.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import uuid
from collections import deque

from mlctl.data.anchors import SpanMapper, mine_char_anchors
from mlctl.data.shards import npy_bytes
from mlctl.data.switch import switch_candidates

CHUNK = 1000  # pairs per task: one batched tokenizer call, big enough to amortise the IPC

_W: dict = {}  # per-process state, filled by init_worker (inherited through fork when workers > 1)


def init_worker(
    tokenizer: str,
    dicts: dict,
    max_tokens: int,
    truncate: bool,
    keep_no_anchor: bool,
    switch: dict | None = None,
) -> None:
    """Set this process up for :func:`process_chunk`: a private copy of the tokenizer's backend (no
    truncation, no padding), the dictionaries by language pair and the length settings."""
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


def chunked(it, size: int):
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
        init_worker(*init_args)
        _W["run"] = run
    return process_chunk(chunk)


def ray_results(chunks, address: str, tasks: int, init_args: tuple):
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


def ordered_results(chunks, workers: int, init_args: tuple):
    """Each chunk's results, in input order; at most 2 x workers chunks in flight (bounded memory)."""
    if workers <= 1:
        init_worker(*init_args)
        for chunk in chunks:
            yield chunk, process_chunk(chunk)
        return
    # NOTE: fork shares the loaded dictionaries with the workers without pickling them. gc.freeze()
    # keeps the children's garbage collector from walking (and so copying, page by page) the
    # parent's hundreds of thousands of dictionary objects; without it 2 workers were slower than 1.
    ctx = mp.get_context("fork")
    gc.freeze()
    try:
        with ctx.Pool(workers, initializer=init_worker, initargs=init_args) as pool:
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
