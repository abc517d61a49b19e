"""Word-anchor mining (method.md): a dictionary entry (u, v) is an anchor of a pair (x, y) when u
occurs exactly once in x and v exactly once in y, as whole words, case-insensitively; the text keeps
its casing and the anchor's token spans come from the tokenizer's offset mapping.

Speed: each sentence is split into words once (:mod:`mlctl.data.words`, where scripts without
spaces make every character a word) and its word n-grams (n up to the longest dictionary phrase, at
most a few words) are looked up in the dictionary's hash map, so the cost per pair is
O(words x max phrase length), independent of the dictionary size.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import TYPE_CHECKING

from mlctl.data.words import lower_words, word_spans

if TYPE_CHECKING:
    from mlctl.data.dictionary import Dictionary


def _once(words: list[str], prefixes: set[str], phrases, max_n: int) -> dict[str, tuple[int, int]]:
    """phrase -> (n words, start index) for the dictionary phrases (keys of ``phrases``) that occur
    exactly once in ``words``. From each position the phrase is extended word by word only while it
    is still a prefix of some longer dictionary phrase, so most positions cost one set lookup."""
    count = len(words)
    pos: dict[str, tuple[int, int]] = {}
    dup = []
    for i in range(count):
        g, n = words[i], 1
        while True:
            if g in phrases:
                if g in pos:
                    dup.append(g)
                else:
                    pos[g] = (n, i)
            if n == max_n or i + n >= count or g not in prefixes:
                break
            g = g + " " + words[i + n]
            n += 1
    for g in dup:
        pos.pop(g, None)
    return pos


def mine_char_anchors(src: str, tgt: str, d: Dictionary) -> list[tuple[int, int, int, int]]:
    """All anchors of a pair as character spans ``(src_start, src_end, tgt_start, tgt_end)``, in order
    of their position in the source (then target)."""
    sw, s_low = lower_words(src)
    entries = d.entries
    cands = _once(sw, d.src_prefixes, entries, d.max_src_words)
    if not cands:
        return []
    tw, t_low = lower_words(tgt)
    t_once = _once(tw, d.tgt_prefixes, d.tgt_phrases, d.max_tgt_words)
    found = []
    for g, (n, i) in cands.items():
        trans = entries[g]
        # iterate over the smaller side: common words can have dozens of translations
        hits = (
            [v for v in trans if v in t_once]
            if len(trans) <= len(t_once)
            else [v for v in t_once if v in trans]
        )
        for v in hits:
            k, j = t_once[v]
            found.append((i, n, j, k))
    if not found:
        return []
    ss, ts = word_spans(src, s_low, sw), word_spans(tgt, t_low, tw)
    out = [(ss[i][0], ss[i + n - 1][1], ts[j][0], ts[j + k - 1][1]) for i, n, j, k in found]
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
