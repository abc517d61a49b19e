"""What every reader builds on: the :class:`RawPair` it yields, opening an input file (gzip'd when
its name ends in ``.gz``; a truncated or corrupt gzip file is an :class:`InputError` naming it) and
decoding its text as :mod:`mlctl.data.charset` says (a BOM, the input's ``encoding``, the file's
declared charset, else UTF-8), line by line, an undecodable line counted and a file in another
encoding refused.
"""

from __future__ import annotations

import gzip
import io
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlctl.data import charset
from mlctl.data.skips import Counts, InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawPair:
    """One translation pair as a reader found it, before any cleaning."""

    src: str
    tgt: str
    src_lang: str
    tgt_lang: str
    where: str  # "file:line" (or "file:entry N" for binary catalogs)


class _GzipFile(gzip.GzipFile):
    """gzip reader whose errors name the file (gzip's own EOFError for a truncated file does not)."""

    def _named(self, e: Exception) -> InputError:
        return InputError(f"{self.name}: truncated or corrupt gzip file ({e})")

    def read(self, *args):
        try:
            return super().read(*args)
        except (EOFError, OSError, zlib.error) as e:
            raise self._named(e) from None

    def readline(self, *args):
        try:
            return super().readline(*args)
        except (EOFError, OSError, zlib.error) as e:
            raise self._named(e) from None

    def __next__(self):
        line = self.readline()
        if not line:
            raise StopIteration
        return line


def open_text_bytes(path: Path):
    """Binary handle, transparently gunzipping ``*.gz``; a truncated or corrupt gzip file raises
    :class:`InputError` naming it."""
    return _GzipFile(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def known_codec(path: Path, name: str, given: bool) -> str:
    """Python's name of the encoding ``name`` that the user gave for ``path`` or that it declares."""
    try:
        return charset.codec(name)
    except LookupError:
        if given:
            raise InputError(
                f"{path}: unknown encoding {name!r}; give a name Python knows (latin-1, cp1252, shift_jis, ...)"
            ) from None
        raise InputError(
            f"{path}: declares the charset {name!r}, which Python does not know; re-encode it to UTF-8"
        ) from None


def file_encoding(path: Path, encoding: str = "", declared: str = "") -> tuple[str, int, bool]:
    """``(encoding, BOM length, given by the user)`` for ``path``: see :mod:`mlctl.data.charset`."""
    with open_text_bytes(path) as f:
        head = f.read(4096)
    sniffed, bom, why = charset.sniff(head)
    if bom:
        return sniffed, bom, False
    if encoding:
        return known_codec(path, encoding, True), 0, True
    if declared:
        return known_codec(path, declared, False), 0, False
    if sniffed:
        log.info("%s: no byte-order mark; reading it as %s (%s)", path, sniffed, why)
        return sniffed, 0, False
    return "utf-8", 0, False


def decoded_lines(
    path: Path,
    counts: Counts,
    encoding: str = "",
    declared: str = "",
    options: str = charset.PREPARE_OPTIONS,
) -> Iterator[tuple[int, str | None]]:
    """(line number, text without newline or None when undecodable and counted); raises
    :class:`InputError` when the file turns out to be in another encoding."""
    name, bom, explicit = file_encoding(path, encoding, declared)
    dec = charset.LineDecoder(path, name, counts, explicit, options=options)
    with open_text_bytes(path) as f:
        f.read(bom)
        if charset.is_wide(name):
            # NOTE: UTF-16/32 lines cannot be split on the byte 0x0a; a text layer splits them, and
            # undecodable code units become U+FFFD, which the decoder counts.
            text = io.TextIOWrapper(f, encoding=name, errors="replace", newline="\n")
            for lineno, line in enumerate(text, 1):
                yield lineno, dec.decoded(line.rstrip("\r\n"), f"{path}:{lineno}")
        else:
            offset = bom
            for lineno, raw in enumerate(f, 1):
                size = len(raw)
                yield lineno, dec.decode(raw.rstrip(b"\r\n"), f"{path}:{lineno}", offset)
                offset += size
    dec.finish()


def text_lines(
    path: Path, counts: Counts, encoding: str = "", options: str = charset.PREPARE_OPTIONS
) -> Iterator[tuple[int, str | None]]:
    """The lines of a text file decoded as `mlctl prepare` decodes its inputs (for other verbs'
    line-based files): ``(line number, text without newline)``, the text None for a line that did
    not decode (counted in ``counts``). A BOM, UTF-16/32 or ``encoding`` are honoured, and a file
    in another encoding altogether raises :class:`InputError`, whose advice names ``options``."""
    return decoded_lines(path, counts, encoding, options=options)
