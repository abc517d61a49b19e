"""Text normalisation and the pair filters that need no tokenizer (the token-length filter runs after
tokenization, in :mod:`mlctl.data.prepare`)."""

from __future__ import annotations

import hashlib
import re
import unicodedata

# C0/C1 controls and DEL, except TAB/LF/CR which become spaces; also zero-width and bidi marks,
# which make "identical" strings differ and carry no meaning for alignment.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFC, control characters removed, runs of whitespace collapsed to one space, stripped."""
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    return _SPACE.sub(" ", text).strip()


def length_ratio_ok(src: str, tgt: str, max_ratio: float, min_chars: int = 20) -> bool:
    """Character-length ratio filter; pairs whose longer side is shorter than ``min_chars`` pass
    (short UI strings like "OK"/"Aceptar" have wild ratios and are fine)."""
    if max_ratio <= 0:
        return True
    a, b = len(src), len(tgt)
    longer, shorter = max(a, b), min(a, b)
    return longer < min_chars or longer <= max_ratio * shorter


class Deduper:
    """Exact duplicates (after normalisation) of (languages, src, tgt), kept as 8-byte digests."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_new(self, src_lang: str, tgt_lang: str, src: str, tgt: str) -> bool:
        key = hashlib.blake2b(f"{src_lang}\x00{tgt_lang}\x00{src}\x00{tgt}".encode(), digest_size=8).digest()
        if key in self._seen:
            return False
        self._seen.add(key)
        return True
