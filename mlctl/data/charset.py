"""Text encodings of input files: which one a file is read with, and what prepare says when the
bytes do not fit it.

The encoding of a file, first match wins:

1. a byte-order mark (UTF-8, UTF-16 or UTF-32): it cannot be mistaken;
2. the input's ``encoding`` (``--encoding``, ``PrepareInput.encoding``);
3. what the file declares: a .po/.mo header's ``charset=``, a TMX's ``<?xml ... encoding=...?>``;
4. UTF-16 without a BOM, when every other byte of the file's start is NUL;
5. UTF-8.

A line that does not decode is skipped and counted (``invalid_utf8``, ``invalid_encoding``,
``nul_byte``): the odd corrupt line of a large crawl should not stop a run. A file whose bytes show
that it is in another encoding altogether is refused instead (:class:`~mlctl.data.skips.InputError`
naming the file, the first bad line and byte, and the likely encoding), never read with half its
lines dropped. It is refused when, read as UTF-8 by default, ``EARLY_BAD`` lines have failed and no
line so far held valid non-ASCII UTF-8 (the shape of a Latin-1 or cp1251 file); or when more than
``MAX_BAD_SHARE`` of its lines failed (checked at the end, and from ``LATE_BAD`` failures on).
"""

from __future__ import annotations

import codecs
import re
from typing import TYPE_CHECKING

from mlctl.data.skips import InputError

if TYPE_CHECKING:
    from pathlib import Path

    from mlctl.data.skips import Counts

BOMS = (  # UTF-32 first: its little-endian BOM starts with UTF-16's
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
EARLY_BAD = 10  # undecodable lines, with no valid non-ASCII UTF-8 line, that show another encoding
LATE_BAD = 1000  # from this many undecodable lines on, the share is checked while reading
MAX_BAD_SHARE = 0.01  # more undecodable lines than this share of a file: the file is refused
SAMPLE_BYTES = 1 << 16  # of undecodable lines, kept to guess the encoding


def codec(name: str) -> str:
    """Python's canonical name of an encoding; LookupError when Python does not know it."""
    return codecs.lookup(name).name


def is_wide(name: str) -> bool:
    """True for encodings whose lines cannot be split on the byte ``\\n`` (UTF-16, UTF-32, EBCDIC)."""
    try:
        return "\na".encode(name) != b"\na"
    except (LookupError, UnicodeError):
        return True


def sniff(head: bytes) -> tuple[str, int, str]:
    """``(encoding, BOM length, why)`` from a file's first bytes; ``("", 0, "")`` when they tell
    nothing (the caller then uses a declared encoding or UTF-8)."""
    for bom, name in BOMS:
        if head.startswith(bom):
            return name, len(bom), "byte-order mark"
    pairs = len(head) // 2
    if pairs >= 2:
        even = sum(1 for i in range(0, 2 * pairs, 2) if head[i] == 0)
        odd = sum(1 for i in range(1, 2 * pairs, 2) if head[i] == 0)
        # ASCII text in UTF-16: one NUL per character, always on the same side
        if odd >= 0.3 * pairs and even <= 0.02 * pairs:
            return "utf-16-le", 0, "NUL bytes in every other position"
        if even >= 0.3 * pairs and odd <= 0.02 * pairs:
            return "utf-16-be", 0, "NUL bytes in every other position"
    return "", 0, ""


_XML_DECL = re.compile(rb"""^<\?xml[^>]*?\sencoding\s*=\s*["']([A-Za-z0-9._:-]+)["']""")
_PO_CHARSET = re.compile(rb"charset\s*=\s*([A-Za-z0-9._:-]+)")


def xml_declared(head: bytes) -> str:
    """The encoding named in an XML declaration at the start of ``head`` ('' when none)."""
    m = _XML_DECL.match(head.lstrip())
    return m.group(1).decode("ascii") if m else ""


def header_charset(header: bytes) -> str:
    """The ``charset=`` of a gettext header (``Content-Type: text/plain; charset=...``); '' when it
    has none or keeps the template's placeholder ``CHARSET``."""
    m = _PO_CHARSET.search(header)
    if not m or m.group(1).upper() == b"CHARSET":
        return ""
    return m.group(1).decode("ascii")


def po_declared(head: bytes) -> str:
    """The charset declared by the header entry (the first, ``msgid ""``) of a .po file's start."""
    first = re.search(rb'^msgid\s+"', head, re.M)
    if not first or not re.match(rb'msgid\s+""\s*$', head[first.start() :].split(b"\n", 1)[0]):
        return ""  # the first entry is not the header
    return header_charset(re.split(rb"\n\s*\n|\nmsgid\s", head[first.end() :], maxsplit=1)[0])


def guess(sample: bytes) -> tuple[str, str]:
    """``(description, codec to suggest or '')`` for bytes that did not decode."""
    if not sample:
        return "", ""
    if sample.count(0) > 0.1 * len(sample):
        return "binary data, or UTF-16/UTF-32 without a byte-order mark", ""
    high = sum(1 for b in sample if b >= 0x80)
    letters = sum(1 for b in sample if 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A)
    if high <= 0.3 * (high + letters):
        # accented letters between ASCII ones: a Western single-byte encoding
        undefined_in_cp1252 = any(b in sample for b in (0x81, 0x8D, 0x8F, 0x90, 0x9D))
        return "Latin-1/cp1252 (Western European)", "latin-1" if undefined_in_cp1252 else "cp1252"
    return "a legacy non-Latin encoding (e.g. cp1251, GBK, Shift_JIS, EUC-KR)", ""


# How a user of `mlctl prepare` gives an input's encoding; other verbs pass their own.
PREPARE_OPTIONS = "--encoding {enc}, or encoding: {enc} on the input"


def refusal(
    path: Path | str, encoding: str, failed: str, sample: bytes, options: str = PREPARE_OPTIONS
) -> str:
    """The message that refuses a file: ``failed`` says what did not decode and where first;
    ``sample`` (bytes that did not decode) gives the likely encoding and what to do; ``options``
    (with ``{enc}`` for the encoding) says how the command is given one."""
    label = "UTF-8" if encoding == "utf-8" else encoding
    what, suggest = guess(sample)
    looks = f"; it looks like {what}" if what else ""
    if not options:  # the command takes UTF-8 only (training's eval.pairs)
        todo = (
            f"re-encode it to UTF-8 (iconv -f {suggest} -t utf-8)"
            if suggest
            else "find its encoding (e.g. `file -i`), then re-encode it to UTF-8"
        )
    else:
        todo = (
            f"re-encode it to UTF-8 (iconv -f {suggest} -t utf-8) or give its encoding "
            f"({options.format(enc=suggest)})"
            if suggest
            else "find its encoding (e.g. `file -i`), then re-encode it to UTF-8 or give it "
            f"({options.format(enc='NAME')})"
        )
    return f"{path}: not {label}: {failed}{looks}: {todo}"


def _location(path: Path | str, where: str) -> str:
    """``"line 12"`` for ``"PATH:12"``, ``"entry 3"`` for ``"PATH:entry 3"``."""
    loc = where[len(str(path)) + 1 :] if where.startswith(f"{path}:") else where
    return f"line {loc}" if loc.isdigit() else loc


class LineDecoder:
    """Decodes one file's lines (or catalog entries), counting the undecodable ones, and refuses the
    file with :class:`~mlctl.data.skips.InputError` when they show it is in another encoding (see
    the module docstring).

    ``explicit``: the encoding was given by the user (no guessing from the first failures then)."""

    def __init__(
        self,
        path: Path | str,
        encoding: str,
        counts: Counts,
        explicit: bool = False,
        units: str = "lines",
        options: str = PREPARE_OPTIONS,
    ):
        self.path, self.encoding, self.counts, self.units = path, codec(encoding), counts, units
        self.options = options
        self.wide = is_wide(self.encoding)
        self.guessing = self.encoding == "utf-8" and not explicit
        self.seen = self.bad = self.invalid = 0
        self.non_ascii = False  # a line held valid non-ASCII text: the encoding fits the file
        self.first = ""
        self.sample = bytearray()
        self.reason = "invalid_utf8" if self.encoding == "utf-8" else "invalid_encoding"

    def decode(self, raw: bytes, where: str, offset: int | None = None) -> str | None:
        """The text of ``raw`` (read at ``where``, ``offset`` bytes into the file), or None after
        counting it as a skip."""
        self.seen += 1
        if b"\x00" in raw and not self.wide:
            self._bad("nul_byte", where, raw, raw.index(b"\x00"), offset, "NUL byte")
            return None
        try:
            text = raw.decode(self.encoding)
        except UnicodeDecodeError as e:
            self.invalid += 1
            self._bad(self.reason, where, raw, e.start, offset, str(e))
            return None
        if not self.non_ascii and not raw.isascii():
            self.non_ascii = True
        return text

    def decoded(self, text: str, where: str) -> str | None:
        """For text decoded elsewhere with ``errors="replace"`` (UTF-16/32 streams): the same counts."""
        self.seen += 1
        if "\ufffd" in text or "\x00" in text:
            reason = "nul_byte" if "\x00" in text else self.reason
            self.invalid += reason != "nul_byte"
            self._bad(reason, where, b"", None, None, "undecodable character")
            return None
        self.non_ascii = self.non_ascii or not text.isascii()
        return text

    def _bad(
        self, reason: str, where: str, raw: bytes, pos: int | None, offset: int | None, detail: str
    ) -> None:
        self.bad += 1
        self.counts.skip(reason, where, detail)
        if not self.first:
            byte = f": 0x{raw[pos]:02x}" if pos is not None and pos < len(raw) else ""
            at = f", byte offset {offset + pos:,}" if offset is not None and pos is not None else ""
            self.first = f"{_location(self.path, where)}{at}{byte}"
        if len(self.sample) < SAMPLE_BYTES:
            self.sample += raw[: SAMPLE_BYTES - len(self.sample)]
        if self.guessing and self.invalid >= EARLY_BAD and not self.non_ascii:
            self._refuse()
        if self.bad >= LATE_BAD and self.bad > MAX_BAD_SHARE * self.seen:
            self._refuse()

    def finish(self) -> None:
        """The end-of-file check: too large a share of undecodable lines refuses the file."""
        if self.bad and self.bad > MAX_BAD_SHARE * self.seen:
            self._refuse()

    def _refuse(self) -> None:
        failed = f"{self.bad} of its first {self.seen} {self.units} do not decode (the first at {self.first})"
        raise InputError(refusal(self.path, self.encoding, failed, bytes(self.sample), self.options))
