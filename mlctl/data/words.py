"""Words of a sentence, as anchor mining, dictionaries and code-switching all see them.

A word is a run of letters and digits, except in scripts without spaces (Chinese, Japanese
kana/kanji, Hangul syllables...), where every character is a word of its own: a dictionary word
like 文件 is then the two-"word" phrase (文, 件) and matches on character boundaries. Case is
folded for lookups (:func:`phrase_key`, :func:`lower_words`); spans always point into the original
text.
"""

from __future__ import annotations

import re

# CJK ideographs, kana, Hangul syllables... are single-character words; other letters/digits form runs.
_CJK = "\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_WORD = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")  # a negated class: ~5x faster than a lookahead


def words_of(text: str) -> list[tuple[str, int, int]]:
    """(word, char start, char end) for every word of ``text`` (the script decides, not a language)."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def phrase_key(text: str) -> str:
    """Dictionary key of a phrase: its lower-cased words joined by single spaces."""
    return " ".join(_WORD.findall(text.lower()))


def lower_words(text: str) -> tuple[list[str], str | None]:
    """Lower-cased words, and the lower-cased text when its character positions are the original's
    (else None: a few characters, e.g. U+0130, change length when lower-cased)."""
    low = text.lower()
    if len(low) == len(text):
        return _WORD.findall(low), low
    return [w.lower() for w in _WORD.findall(text)], None


def word_spans(text: str, low: str | None, words: list[str]) -> list[tuple[int, int]]:
    """Character span of every word of ``text``, given :func:`lower_words`' result. Only computed
    for pairs that need spans: ``findall`` plus this is cheaper than match objects for every
    sentence. ``str.find`` from the end of the previous word lands on the regex's own match, since
    only non-word characters lie between matches."""
    if low is None:
        return [m.span() for m in _WORD.finditer(text)]
    spans, pos = [], 0
    for w in words:
        pos = low.find(w, pos)
        spans.append((pos, pos + len(w)))
        pos += len(w)
    return spans
