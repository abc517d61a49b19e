"""Turning decoded records into a training batch: one anchor drawn per pair per epoch, dynamic
padding to the longest row of the batch, source rows first then target rows."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from mlctl.data.switch import apply_switch


def draw_anchor(anchors: list, seed: int, epoch: int, pair_id: str) -> int:
    """Index of this epoch's anchor: a hash of (seed, epoch, pair id), so it does not depend on which
    rank or worker reads the pair, nor on the order it is read in."""
    if len(anchors) <= 1:
        return 0
    return pair_hash(seed, epoch, pair_id) % len(anchors)


def pair_hash(seed: int, epoch: int, pair_id: str, salt: str = "") -> int:
    """64-bit hash of (seed, epoch, pair id[, salt]): every per-pair draw of the loader hangs on it."""
    key = f"{seed}:{epoch}:{pair_id}" + (f":{salt}" if salt else "")
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def source_id_int(meta: dict) -> int:
    """The record's source-sentence id as a signed 64-bit integer (a tensor element). Shards from
    before ``sid`` existed get it computed here from the source text (what prepare hashes)."""
    sid = meta.get("sid")
    if sid is None:
        sid = hashlib.blake2b(meta["src"].encode("utf-8"), digest_size=8).hexdigest()
    return int.from_bytes(bytes.fromhex(sid), "big", signed=True)


def collate(
    samples: list[dict],
    pad_id: int,
    seed: int,
    epoch: int,
    switch: float = 0.0,
    max_tokens: int = 512,
    keep_anchor: bool = True,
) -> dict:
    """Batch of B records -> the dict the engine consumes (see :class:`~mlctl.data.dataset.ShardLoader`).
    With ``switch`` > 0, source words the record lists under ``switch`` are code-switched
    (:mod:`mlctl.data.switch`), never growing a row past ``max_tokens`` and, with ``keep_anchor``, never
    the drawn anchor; without it (no word-level term reads the spans) the anchor word may be switched
    too, and a switched row's span is its whole side."""
    b = len(samples)
    srcs = []
    spans = np.zeros((2 * b, 2), dtype=np.int64)
    anchored = np.zeros(b, dtype=bool)
    switched = 0
    for i, s in enumerate(samples):
        meta, src = s["meta"], s["src"]
        anchors = meta["anchors"]
        a = anchors[draw_anchor(anchors, seed, epoch, meta["id"])] if anchors else None
        keep = tuple(a["src_span"]) if a is not None else None
        if switch > 0 and meta.get("switch"):
            rng = np.random.default_rng(pair_hash(seed, epoch, meta["id"], "switch"))
            src, k, shift = apply_switch(
                src, meta["switch"], switch, rng, keep if keep_anchor else None, max_tokens
            )
            switched += k
            if k and not keep_anchor:
                a = None
            elif keep is not None:
                keep = (keep[0] + shift, keep[1] + shift)
        srcs.append(src)
        if a is not None and keep is not None:
            spans[i], spans[b + i] = keep, a["tgt_span"]
            anchored[i] = True
        else:  # prepared with keep_no_anchor (or switched, unprotected): the "word" is the whole side
            spans[i] = (0, len(src) - 1)
            spans[b + i] = (0, len(s["tgt"]) - 1)
    rows = srcs + [s["tgt"] for s in samples]
    t = max(len(r) for r in rows)
    ids = np.full((2 * b, t), pad_id, dtype=np.int64)
    mask = np.zeros((2 * b, t), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "spans": torch.from_numpy(spans),
        # whether the pair's spans are an anchor word (else the whole sides stand in for it)
        "anchored": torch.from_numpy(anchored),
        "pair_ids": [s["meta"]["id"] for s in samples],
        # pairs sharing one are translations of the same sentence: never each other's negatives
        "source_ids": torch.tensor([source_id_int(s["meta"]) for s in samples], dtype=torch.int64),
        "langs": [f"{s['meta']['src_lang']}-{s['meta']['tgt_lang']}" for s in samples],
        "epoch": epoch,
        "num_tokens": int(mask.sum()),
        "switched_words": switched,
    }
