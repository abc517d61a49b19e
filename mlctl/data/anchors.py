"""Word-anchor mining (method.md): a dictionary entry (u, v) is an anchor of a pair (x, y) when u
occurs exactly once in x and v exactly once in y, as whole words, case-insensitively; the text keeps
its casing and the anchor's token spans come from the tokenizer's offset mapping.

Speed: each sentence is split into words once and its word n-grams (n up to the longest dictionary
phrase, at most a few words) are looked up in the dictionary's hash map, so the cost per pair is
O(words x max phrase length), independent of the dictionary size.

Scripts without spaces (Chinese, Japanese kana/kanji): every such character is a word of its own, so a
dictionary word like 文件 is the two-"word" phrase (文, 件) and matches on character boundaries.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlctl.data.dictionary import Dictionary

# CJK ideographs, kana, Hangul syllables... are single-character words; other letters/digits form runs.
_CJK = "\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_WORD = re.compile(f"[{_CJK}]|(?:(?![{_CJK}])\\w)+")
MAX_CJK_PHRASE = 8  # longest phrase looked up when a dictionary has CJK entries


def words_of(text: str, lang: str = "") -> list[tuple[str, int, int]]:
    """(word, char start, char end) for every word of ``text``; ``lang`` is unused (the script decides)."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def _ngram_positions(words: list[str], max_n: int) -> dict[tuple[str, ...], int]:
    """n-gram -> start index when it occurs exactly once, -1 when more often."""
    pos: dict[tuple[str, ...], int] = {}
    count = len(words)
    for n in range(1, min(max_n, count) + 1):
        for i in range(count - n + 1):
            g = tuple(words[i:i + n])
            pos[g] = -1 if g in pos else i
    return pos


def mine_char_anchors(src: str, tgt: str, d: Dictionary) -> list[tuple[int, int, int, int]]:
    """All anchors of a pair as character spans ``(src_start, src_end, tgt_start, tgt_end)``, in order
    of their position in the source (then target)."""
    sw = words_of(src)
    if not sw:
        return []
    s_pos = _ngram_positions([w.casefold() for w, _, _ in sw], d.max_src_words)
    cands = [(g, i) for g, i in s_pos.items() if i >= 0 and g in d.entries]
    if not cands:
        return []
    tw = words_of(tgt)
    t_pos = _ngram_positions([w.casefold() for w, _, _ in tw], d.max_tgt_words)
    out = []
    for g, i in cands:
        for v in d.entries[g]:
            j = t_pos.get(v, -1)
            if j >= 0:
                out.append((sw[i][1], sw[i + len(g) - 1][2], tw[j][1], tw[j + len(v) - 1][2]))
    out.sort()
    return out


class SpanMapper:
    """Character span -> inclusive token span, from a fast tokenizer's offsets (special tokens have
    empty offsets and are never part of a span)."""

    def __init__(self, offsets: list[tuple[int, int]]) -> None:
        self.index = [k for k, (s, e) in enumerate(offsets) if e > s]
        self.starts = [offsets[k][0] for k in self.index]
        self.ends = [offsets[k][1] for k in self.index]

    def span(self, start: int, end: int) -> tuple[int, int] | None:
        """Tokens overlapping [start, end); None when none (e.g. truncated away)."""
        first = bisect_right(self.ends, start)
        last = bisect_left(self.starts, end) - 1
        if first >= len(self.index) or last < first:
            return None
        return self.index[first], self.index[last]
