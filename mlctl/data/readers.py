"""Readers for parallel corpora. Each yields :class:`RawPair` records with the file and line they came
from; a malformed line or entry is counted by reason in a :class:`Counts` and skipped. What would lose
a file wholesale is an :class:`InputError` naming it instead (a truncated gzip, a corrupt .mo header,
a file in another encoding); a TMX that breaks midway counts every unit it lost.

Formats: ``tsv`` (``src<TAB>tgt[<TAB>more]``), ``moses`` (``PREFIX.src`` + ``PREFIX.tgt``, line
aligned), ``multiway`` (a folder with one line-aligned file per language; yields pivot-X pairs),
``tmx``, ``po`` and ``mo`` (gettext catalogs). Any file may be gzip'd (``.gz``). Text is decoded as
:mod:`mlctl.data.charset` says (a BOM, the input's ``encoding``, the file's declared charset, else
UTF-8); a file in another encoding than the one it is read with is refused, not half read.
"""

from __future__ import annotations

import codecs
import gzip
import io
import itertools
import logging
import re
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlctl.data import charset

log = logging.getLogger(__name__)

FORMATS = ("tsv", "moses", "multiway", "tmx", "po", "mo")
EXTENSIONS = {".tsv": "tsv", ".tab": "tsv", ".txt": "tsv", ".tmx": "tmx", ".po": "po", ".mo": "mo"}
LOG_FIRST = 3  # how many examples of each skip reason are logged


class InputError(ValueError):
    """Bad input that stops `mlctl prepare` before any output (missing file, unknown format...)."""


@dataclass(frozen=True)
class RawPair:
    src: str
    tgt: str
    src_lang: str
    tgt_lang: str
    where: str  # "file:line" (or "file:entry N" for binary catalogs)


class Counts:
    """Skips by reason, logging the first few of each with their location."""

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self._events: Counter[str] = Counter()

    def skip(self, reason: str, where: str, detail: str = "", n: int = 1) -> None:
        """Count ``n`` pairs lost at ``where`` (``n`` > 1: a file that breaks loses all its rest;
        0: it broke where nothing was left to lose, which the manifest still shows)."""
        self.by_reason[reason] += n
        self._events[reason] += 1
        if self._events[reason] <= LOG_FIRST:
            log.warning("skipped (%s) at %s%s", reason, where, f": {detail}" if detail else "")


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


def detect_format(path: Path) -> str:
    """Format from the extension (``.gz`` ignored); a folder is ``multiway``."""
    if path.is_dir():
        return "multiway"
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    ext = Path(name).suffix.lower()
    if ext in EXTENSIONS:
        return EXTENSIONS[ext]
    raise InputError(
        f"{path}: cannot tell the format from the extension {ext or '(none)'}; "
        f"append :FORMAT (one of {', '.join(FORMATS)})"
    )


def _known_codec(path: Path, name: str, given: bool) -> str:
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


def _encoding(path: Path, encoding: str = "", declared: str = "") -> tuple[str, int, bool]:
    """``(encoding, BOM length, given by the user)`` for ``path``: see :mod:`mlctl.data.charset`."""
    with open_text_bytes(path) as f:
        head = f.read(4096)
    sniffed, bom, why = charset.sniff(head)
    if bom:
        return sniffed, bom, False
    if encoding:
        return _known_codec(path, encoding, True), 0, True
    if declared:
        return _known_codec(path, declared, False), 0, False
    if sniffed:
        log.info("%s: no byte-order mark; reading it as %s (%s)", path, sniffed, why)
        return sniffed, 0, False
    return "utf-8", 0, False


def _lines(
    path: Path,
    counts: Counts,
    encoding: str = "",
    declared: str = "",
    options: str = charset.PREPARE_OPTIONS,
) -> Iterator[tuple[int, str | None]]:
    """(line number, text without newline or None when undecodable and counted); raises
    :class:`InputError` when the file turns out to be in another encoding."""
    name, bom, explicit = _encoding(path, encoding, declared)
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
    return _lines(path, counts, encoding, options=options)


def read_tsv(
    path: Path, src_lang: str, tgt_lang: str, counts: Counts, encoding: str = ""
) -> Iterator[RawPair]:
    for lineno, line in _lines(path, counts, encoding):
        if line is None:
            continue
        if not line.strip():
            continue  # blank lines separate nothing in TSV; not worth a count
        cols = line.split("\t")
        if len(cols) < 2:
            counts.skip("wrong_column_count", f"{path}:{lineno}", f"{len(cols)} column(s), need >= 2")
            continue
        yield RawPair(cols[0], cols[1], src_lang, tgt_lang, f"{path}:{lineno}")


def _lang_file(prefix: Path, lang: str) -> Path:
    for cand in (Path(f"{prefix}.{lang}"), Path(f"{prefix}.{lang}.gz")):
        if cand.is_file():
            return cand
    raise InputError(f"moses input {prefix}: no file {prefix}.{lang} (or .gz)")


def _aligned(
    files: dict[str, Path], counts: Counts, encoding: str = ""
) -> Iterator[tuple[int, dict[str, str | None]]]:
    """Zip line-aligned files; lines past the end of the shortest are counted as unaligned."""
    iters = {lang: _lines(p, counts, encoding) for lang, p in files.items()}
    lineno = 0
    while True:
        row: dict[str, str | None] = {}
        ended = []
        for lang, it in iters.items():
            nxt = next(it, None)
            if nxt is None:
                ended.append(lang)
            else:
                row[lang] = nxt[1]
        lineno += 1
        if len(ended) == len(iters):
            return
        if ended:
            where = ", ".join(f"{files[lang]}:{lineno}" for lang in row)
            counts.skip(
                "unaligned_line", where, f"{', '.join(str(files[lang]) for lang in ended)} ended earlier"
            )
            for it in iters.values():  # count the rest of the longer files too
                for _ in it:
                    counts.skip("unaligned_line", where)
            return
        yield lineno, row


def read_moses(
    prefix: Path, src_lang: str, tgt_lang: str, counts: Counts, encoding: str = ""
) -> Iterator[RawPair]:
    files = {src_lang: _lang_file(prefix, src_lang), tgt_lang: _lang_file(prefix, tgt_lang)}
    for lineno, row in _aligned(files, counts, encoding):
        s, t = row[src_lang], row[tgt_lang]
        if s is None or t is None:
            continue
        yield RawPair(s, t, src_lang, tgt_lang, f"{files[src_lang]}:{lineno}")


def multiway_files(folder: Path) -> dict[str, Path]:
    """Language -> file for a multiway folder: the last extension (``x.en``, ``en.txt`` -> en)."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        name = p.name[:-3] if p.name.endswith(".gz") else p.name
        stem, _, ext = name.rpartition(".")
        lang = stem if ext == "txt" else (ext or name)
        if lang in out:
            raise InputError(
                f"multiway folder {folder}: two files for language {lang!r}: {out[lang]} and {p}"
            )
        out[lang] = p
    return out


def read_multiway(
    folder: Path, pivot: str, tgt_lang: str, counts: Counts, encoding: str = ""
) -> Iterator[RawPair]:
    """pivot-X pairs for every other language X in the folder (only X = tgt_lang when it is given)."""
    files = multiway_files(folder)
    if pivot not in files:
        raise InputError(
            f"multiway folder {folder}: no file for the pivot language {pivot!r} "
            f"(found {', '.join(files) or 'none'})"
        )
    others = [lang for lang in files if lang != pivot and (not tgt_lang or lang == tgt_lang)]
    if not others:
        raise InputError(f"multiway folder {folder}: no file for {tgt_lang or 'any language but ' + pivot}")
    for lineno, row in _aligned(files, counts, encoding):
        s = row[pivot]
        if s is None:
            continue
        for lang in others:
            t = row[lang]
            if t is not None:
                yield RawPair(s, t, pivot, lang, f"{files[pivot]}:{lineno}")


def _lang_matches(code: str, lang: str) -> bool:
    code, lang = code.lower().replace("_", "-"), lang.lower().replace("_", "-")
    return code == lang or code.startswith(lang + "-")


class UnsafeXML(ValueError):
    """A TMX file declares entities or references an external DTD/entity: never expanded."""


class _TmxEvents:
    """Expat handlers that turn a TMX byte stream into (tu number, {lang: seg text}) events.

    Nothing but the current ``<tu>`` is kept, so memory does not grow with the file. Entity
    declarations (the billion-laughs shape) and external entities are refused before expansion."""

    def __init__(self) -> None:
        from xml.parsers import expat

        p = expat.ParserCreate(encoding="UTF-8")  # read_tmx decodes the file and feeds UTF-8
        p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)  # never read an external DTD
        p.StartElementHandler = self.start
        p.EndElementHandler = self.end
        p.CharacterDataHandler = self.text
        p.EntityDeclHandler = self.entity_decl
        p.ExternalEntityRefHandler = self.external
        p.buffer_text = True
        self.parser = p
        self.ready: list[tuple[int, dict[str, str]]] = []
        self.n = 0
        self.segs: dict[str, str] | None = None  # inside a <tu>
        self.lang = ""
        self.seg_depth = 0  # > 0 inside a <seg> (inline markup nests inside it)
        self.parts: list[str] = []

    def start(self, tag: str, attrs: dict) -> None:
        if tag == "tu":
            self.n += 1
            self.segs = {}
        elif tag == "tuv" and self.segs is not None:
            self.lang = attrs.get("xml:lang") or attrs.get("lang") or ""
        elif self.seg_depth:
            self.seg_depth += 1
        elif tag == "seg" and self.segs is not None:
            self.seg_depth, self.parts = 1, []

    def end(self, tag: str) -> None:
        if self.seg_depth:
            self.seg_depth -= 1
            if not self.seg_depth and self.segs is not None:
                self.segs[self.lang] = "".join(self.parts)
        elif tag == "tu" and self.segs is not None:
            self.ready.append((self.n, self.segs))
            self.segs = None

    def text(self, data: str) -> None:
        if self.seg_depth:
            self.parts.append(data)

    def entity_decl(self, name, *_args) -> None:
        raise UnsafeXML(f"declares the entity {name!r}; TMX input must not declare entities")

    def external(self, _context, _base, system_id, public_id) -> int:
        raise UnsafeXML(f"references the external entity {system_id or public_id!r}")


_TU = re.compile(r"<tu[\s/>]")


def _tmx_encoding(path: Path, encoding: str) -> tuple[str, int, bool]:
    """Like :func:`_encoding`, the declared charset being the XML declaration's."""
    with open_text_bytes(path) as f:
        head = f.read(4096)
    return _encoding(path, encoding, charset.xml_declared(head))


def _lost_units(ev: _TmxEvents, chunk: bytes, at: int, rest: Iterator[str]) -> int:
    """Units a TMX loses when it breaks at byte ``at`` of ``chunk`` (the UTF-8 just fed): the one
    open, if any, and every ``<tu`` from the break on (the rest of the file is scanned, not parsed)."""
    tag = chunk.rfind(b"<", 0, at + 1)
    if tag >= 0 and b">" not in chunk[tag:at]:
        at = tag  # the break is inside a tag, which may be a <tu ...> that never started
    lost, carry = int(ev.segs is not None), ""
    for piece in itertools.chain([chunk[at:].decode("utf-8", "replace")], rest):
        text = carry + piece
        lost += len(_TU.findall(text))
        carry = text[-3:]  # a "<tu" cut by a chunk boundary; a match is 4 characters, never counted twice
    return lost


def read_tmx(
    path: Path, src_lang: str, tgt_lang: str, counts: Counts, encoding: str = ""
) -> Iterator[RawPair]:
    """Streaming TMX reader (expat, 64 KiB at a time), decoded as its BOM, ``encoding`` or XML
    declaration says. Malformed XML stops the file with ``malformed_xml``, entity declarations or
    external entities with ``unsafe_xml``; both count every unit lost with the rest of the file.
    Bytes that do not decode refuse the file (:class:`InputError`): XML has one encoding throughout."""
    from xml.parsers import expat

    name, bom, _explicit = _tmx_encoding(path, encoding)
    decoder = codecs.getincrementaldecoder(name)("strict")
    ev = _TmxEvents()
    fed = done = 0  # UTF-8 bytes given to expat; file bytes decoded
    lines = 1
    with open_text_bytes(path) as f:
        f.read(bom)
        done = bom
        while True:
            raw = f.read(1 << 16)
            try:
                chunk = decoder.decode(raw, final=not raw).encode("utf-8")
            except UnicodeDecodeError as e:
                bad = raw[e.start : e.start + 1] if e.start < len(raw) else b""
                line = lines + raw[: e.start].count(b"\n")
                byte = f": 0x{bad[0]:02x}" if bad else ""
                failed = f"the bytes at line {line}, byte offset {done + e.start:,}{byte} do not decode"
                raise InputError(charset.refusal(path, name, failed, raw[e.start : e.start + 4096])) from None
            stop: tuple[str, int, str, int] | None = None
            try:
                ev.parser.Parse(chunk, not raw)
            except expat.ExpatError as e:
                stop = ("malformed_xml", e.lineno, str(e), ev.parser.ErrorByteIndex)
            except UnsafeXML as e:
                stop = ("unsafe_xml", ev.parser.CurrentLineNumber, str(e), ev.parser.CurrentByteIndex)
            for n, segs in ev.ready:  # the units completed before any error still count
                s = next((v for k, v in segs.items() if _lang_matches(k, src_lang)), None)
                t = next((v for k, v in segs.items() if _lang_matches(k, tgt_lang)), None)
                if s is None or t is None:
                    counts.skip("missing_language", f"{path}:tu {n}", f"languages {sorted(segs)}")
                else:
                    yield RawPair(s, t, src_lang, tgt_lang, f"{path}:tu {n}")
            ev.ready.clear()
            if stop is not None:
                reason, line, msg, at = stop
                rest = codecs.iterdecode(iter(lambda: f.read(1 << 16), b""), name, "replace")
                lost = _lost_units(ev, chunk, max(at - fed, 0), rest)
                counts.skip(
                    reason,
                    f"{path}:{line}",
                    f"{msg}; the file is not read past line {line}: {lost} unit(s) lost",
                    n=lost,
                )
                return
            if not raw:
                return
            fed += len(chunk)
            done += len(raw)
            lines += raw.count(b"\n")


def _po_unquote(s: str) -> str:
    s = s.strip()
    if len(s) < 2 or s[0] != '"' or s[-1] != '"':
        raise ValueError(f"expected a quoted string, got {s[:40]!r}")
    body, out, i = s[1:-1], [], 0
    escapes = {
        "n": "\n",
        "t": "\t",
        "r": "\r",
        '"': '"',
        "\\": "\\",
        "a": "\a",
        "b": "\b",
        "f": "\f",
        "v": "\v",
    }
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            out.append(escapes.get(body[i + 1], body[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _catalog_entry(msgid: str, msgstr: str, plural: bool, fuzzy: bool, where: str, counts: Counts) -> bool:
    """Shared gettext rules: skip header, fuzzy, plural, empty and untranslated-identical entries."""
    if msgid == "":
        return False  # the header; not a translation, so not counted as a skip
    if fuzzy:
        counts.skip("po_fuzzy", where)
    elif plural:
        counts.skip("po_plural", where)
    elif not msgstr:
        counts.skip("po_untranslated", where)
    elif msgstr == msgid:
        counts.skip("po_identical", where)
    else:
        return True
    return False


def _po_charset(path: Path) -> str:
    """The charset a .po file's header declares ('' when none)."""
    with open_text_bytes(path) as f:
        head = f.read(1 << 16)
    return charset.po_declared(head)


def _po_has_body(entry: dict) -> bool:
    return entry.get("broken", False) or any(k.startswith(("msgid", "msgstr")) for k in entry)


# NOTE: why the gettext readers below are not the standard library's or polib's. Python's gettext
# reads only .mo, and GNUTranslations decodes the whole catalog at once: one undecodable string
# raises UnicodeDecodeError and every entry of the file is lost (checked with the catalog of
# tests/test_data_readers.py::test_mo_entries_and_skips), where this reader counts that entry as
# `invalid_utf8` and keeps the rest; it also keeps no entry positions for the skip log. polib (not a
# dependency) stops at the first syntax error of a .po file; this reader counts the broken entry as
# `po_syntax`, with its line, and goes on.
def read_po(
    path: Path, src_lang: str, tgt_lang: str, counts: Counts, encoding: str = ""
) -> Iterator[RawPair]:
    """Entries of a .po file, decoded with its header's charset. A syntax error skips (and counts)
    its entry only: the next ``msgctxt``/``msgid`` line, or comment, starts the next entry."""
    entry: dict[str, object] = {}
    field_name = ""

    def finish():
        """The pair of the entry just read, if it is a complete translation."""
        if "msgid" in entry and not entry.get("broken"):
            where = f"{path}:{entry['line']}"
            msgid, msgstr = str(entry["msgid"]), str(entry.get("msgstr", ""))
            if _catalog_entry(
                msgid, msgstr, "msgid_plural" in entry, bool(entry.get("fuzzy")), where, counts
            ):
                return RawPair(msgid, msgstr, src_lang, tgt_lang, where)
        return None

    for lineno, line in _lines(path, counts, encoding, _po_charset(path)):
        if line is None:  # undecodable: counted by _lines, and its entry is lost with it
            entry["broken"] = True
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#~"):
            continue  # blank, or an obsolete entry
        key, _, rest = stripped.partition(" ")
        # NOTE: an entry ends where the next one visibly starts, broken or not: a comment, a
        # msgctxt, or a msgid once this entry has its own (a msgid after a lone msgctxt is the same
        # entry). Waiting for a complete entry instead made a broken one swallow the next.
        starts = stripped.startswith("#") or key in ("msgctxt", "msgid")
        if starts and (_po_has_body(entry) or ("msgctxt" in entry and key != "msgid")):
            pair = finish()
            if pair:
                yield pair
            entry, field_name = {}, ""
        if stripped.startswith("#"):
            if stripped.startswith("#,") and "fuzzy" in stripped:
                entry["fuzzy"] = True
            continue
        try:
            if stripped.startswith('"'):
                if not field_name:
                    raise ValueError("continuation string outside an entry")
                entry[field_name] = str(entry[field_name]) + _po_unquote(stripped)
            elif key in ("msgctxt", "msgid", "msgid_plural", "msgstr") or key.startswith("msgstr["):
                name = "msgstr" if key == "msgstr[0]" else key
                entry[name] = _po_unquote(rest)
                field_name = name
                if key == "msgid":
                    entry["line"] = lineno
            else:
                raise ValueError(f"unknown keyword {key[:20]!r}")
        except ValueError as e:
            if not entry.get("broken"):  # one count per broken entry
                counts.skip("po_syntax", f"{path}:{lineno}", str(e))
            entry["broken"], field_name = True, ""
    pair = finish()
    if pair:
        yield pair


def _mo_header(data: bytes, path: Path) -> tuple[str, int, int, int]:
    """(byte order, number of strings, offsets of the two string tables) of a .mo file, checked
    against its size: a header claiming 2^31 strings would otherwise keep the reader busy for hours."""
    if len(data) < 28:
        raise InputError(f"{path}: not a gettext .mo file (only {len(data)} bytes)")
    magic = struct.unpack("<I", data[:4])[0]
    if magic == 0x950412DE:
        end = "<"
    elif magic == 0xDE120495:
        end = ">"
    else:
        raise InputError(f"{path}: not a gettext .mo file (bad magic {magic:#x})")
    _rev, n, orig_off, trans_off = struct.unpack(end + "4I", data[4:20])
    for name, off in (("original", orig_off), ("translated", trans_off)):
        if off + 8 * n > len(data):
            raise InputError(
                f"{path}: corrupt .mo header: it claims {n:,} strings, but their {name}-string table "
                f"(8 bytes each from byte {off:,}) runs past the end of the file ({len(data):,} bytes)"
            )
    return end, n, orig_off, trans_off


def read_mo(
    path: Path, src_lang: str, tgt_lang: str, counts: Counts, encoding: str = ""
) -> Iterator[RawPair]:
    """Entries of a .mo file, decoded with ``encoding`` or else its header's charset (UTF-8 when it
    declares none); an entry that does not decode is counted, a file of them refused."""
    with open_text_bytes(path) as f:
        data = f.read()
    end, n, orig_off, trans_off = _mo_header(data, path)

    def string(table: int, i: int) -> bytes:
        length, off = struct.unpack(end + "2I", data[table + 8 * i : table + 8 * i + 8])
        if off + length > len(data):
            raise ValueError("string table points past the end of the file")
        return data[off : off + length]

    declared = ""
    try:
        if n and string(orig_off, 0) == b"":  # the header sorts first
            declared = charset.header_charset(string(trans_off, 0))
    except (struct.error, ValueError):
        pass  # a corrupt first entry is counted below
    explicit = bool(encoding)
    name = _known_codec(path, encoding or declared, explicit) if encoding or declared else "utf-8"
    dec = charset.LineDecoder(path, name, counts, explicit, units="entries")
    for i in range(n):
        where = f"{path}:entry {i + 1}"
        try:
            raw_id, raw_str = string(orig_off, i), string(trans_off, i)
        except (struct.error, ValueError) as e:
            counts.skip("mo_corrupt", where, str(e))
            continue
        plural = b"\x00" in raw_id
        if b"\x04" in raw_id:  # msgctxt EOT msgid
            raw_id = raw_id.split(b"\x04", 1)[1]
        # NOTE: both strings are decoded as one (joined by EOT, which neither holds once msgctxt is
        # split off), so an entry is counted once however many of its strings are broken.
        text = dec.decode(raw_id.split(b"\x00")[0] + b"\x04" + raw_str.split(b"\x00")[0], where)
        if text is None:
            continue
        msgid, msgstr = text.split("\x04", 1)
        if _catalog_entry(msgid, msgstr, plural, False, where, counts):
            yield RawPair(msgid, msgstr, src_lang, tgt_lang, where)
    dec.finish()


def read_input(
    path: Path, fmt: str, src_lang: str, tgt_lang: str, counts: Counts, encoding: str = ""
) -> Iterator[RawPair]:
    """Dispatch on ``fmt``; :func:`check_input` should have been called first. ``encoding`` (empty:
    the file's BOM or declared charset, else UTF-8) is what its text is decoded with."""
    if fmt == "multiway":
        return read_multiway(path, src_lang, tgt_lang, counts, encoding)
    reader = {"tsv": read_tsv, "moses": read_moses, "tmx": read_tmx, "po": read_po, "mo": read_mo}[fmt]
    return reader(path, src_lang, tgt_lang, counts, encoding)


def check_input(path: Path, fmt: str, src_lang: str, tgt_lang: str, encoding: str = "") -> None:
    """Raise :class:`InputError` naming the file when the input cannot be read at all."""
    if fmt not in FORMATS:
        raise InputError(f"{path}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if encoding:
        _known_codec(path, encoding, True)
    if not src_lang or (not tgt_lang and fmt != "multiway"):
        raise InputError(
            f"{path}: source and target languages are needed (give --src-lang/--tgt-lang "
            "or PATH:FORMAT:SRC-TGT)"
        )
    if fmt == "moses":
        _lang_file(path, src_lang)
        _lang_file(path, tgt_lang)
        return
    if fmt == "multiway":
        if not path.is_dir():
            raise InputError(f"multiway input {path} is not a folder")
        files = multiway_files(path)
        if src_lang not in files:
            raise InputError(f"multiway folder {path}: no file for the pivot language {src_lang!r}")
        return
    if not path.is_file():
        raise InputError(f"input file not found: {path}")
    try:
        with open_text_bytes(path) as f:
            head = f.read() if fmt == "mo" else f.read(1)  # a catalog is small; its header is checked now
    except OSError as e:
        raise InputError(f"input file {path} cannot be read: {e}") from None
    if fmt == "mo":
        _mo_header(head, path)
