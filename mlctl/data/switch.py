"""Code-switching: words of a pair's source side replaced by their dictionary translations in other
languages (CoSDA-ML style), so the contrastive loss also aligns languages that have no training
pair but a word list, e.g. the paper's ``mlctl-usual-words`` for ru and zh.

Two halves, so the loader never needs the tokenizer:

- ``mlctl prepare`` with ``code_switch`` dictionaries finds, in each kept source side, the words and
  phrases those dictionaries know (longest match first, left to right, never overlapping) and
  stores them in the record's json as ``switch``: ``[[first, last, [[ids, ...], ...]], ...]``, the
  inclusive token span of the source word and, per target language, up to ``MAX_PER_LANGUAGE``
  translations as token ids (no special tokens).
- The loader, with ``data.code_switch = p > 0``, replaces each stored word with probability ``p`` by
  one translation (language first, then translation, each uniformly), drawn from a hash of
  (seed, epoch, pair id): the same on every rank and worker, and exactly the same after a resume.
  The anchor drawn for the word-level term is never switched, and a row never grows past the
  shards' ``max_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from mlctl.data.anchors import SpanMapper
from mlctl.data.words import lower_words, word_spans

if TYPE_CHECKING:
    from mlctl.data.dictionary import Dictionary

MAX_PER_LANGUAGE = 4  # translations kept per word and language (FreeDict lists dozens for common words)


def switch_candidates(
    src: str, dicts: Sequence[Dictionary], mapper: SpanMapper, encode: Callable[[str], list[int]]
) -> list[list]:
    """The ``switch`` entry of a record (see the module docstring); ``dicts`` all translate from the
    source side's language, one per target language; ``encode`` turns a phrase into token ids."""
    if not dicts:
        return []
    words, low = lower_words(src)
    max_n = max(d.max_src_words for d in dicts)
    spans = None
    out: list[list] = []
    i = 0
    while i < len(words):
        best, g = None, words[i]
        for n in range(1, min(max_n, len(words) - i) + 1):
            if n > 1:
                g = g + " " + words[i + n - 1]
            groups = [sorted(d.entries[g])[:MAX_PER_LANGUAGE] for d in dicts if g in d.entries]
            if groups:
                best = (n, groups)
            if not any(g in d.src_prefixes for d in dicts):
                break
        if best is None:
            i += 1
            continue
        n, groups = best
        spans = spans or word_spans(src, low, words)
        tok = mapper.span(spans[i][0], spans[i + n - 1][1])
        options = [[ids for ids in (encode(t) for t in grp) if ids] for grp in groups]
        options = [grp for grp in options if grp]
        if tok is not None and options:
            out.append([tok[0], tok[1], options])
        i += n
    return out


def apply_switch(
    row: np.ndarray,
    candidates: list,
    p: float,
    rng: np.random.Generator,
    keep: tuple[int, int] | None,
    max_tokens: int,
) -> tuple[np.ndarray, int, int]:
    """``row`` with each candidate word switched with probability ``p``; returns the new row, the
    number of words switched, and how far the span ``keep`` (never switched) moved."""
    pieces, pos, shift, switched, length = [], 0, 0, 0, len(row)
    for first, last, options in candidates:
        draw = rng.random()  # one draw per candidate, switched or not: later words keep their odds
        group = options[int(rng.integers(len(options)))]
        ids = group[int(rng.integers(len(group)))]
        if draw >= p or first < pos or last >= len(row):
            continue
        if keep is not None and first <= keep[1] and last >= keep[0]:
            continue
        grown = len(ids) - (last - first + 1)
        if length + grown > max_tokens:
            continue
        pieces += [row[pos:first], np.asarray(ids, dtype=row.dtype)]
        pos, length, switched = last + 1, length + grown, switched + 1
        if keep is not None and last < keep[0]:
            shift += grown
    if not switched:
        return row, 0, 0
    pieces.append(row[pos:])
    return np.concatenate(pieces), switched, shift
