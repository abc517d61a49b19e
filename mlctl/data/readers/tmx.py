"""The TMX reader: streamed through expat 64 KiB at a time, so memory does not grow with the
file; entity declarations and external entities are refused before expansion (``unsafe_xml``), and
a file that breaks midway counts every translation unit it lost.
"""

from __future__ import annotations

import codecs
import itertools
import re
from collections.abc import Iterator
from pathlib import Path

from mlctl.data import charset
from mlctl.data.readers.base import RawPair, file_encoding, open_text_bytes
from mlctl.data.skips import Counts, InputError


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
    """Like :func:`~mlctl.data.readers.base.file_encoding`, the declared charset being the XML declaration's."""
    with open_text_bytes(path) as f:
        head = f.read(4096)
    return file_encoding(path, encoding, charset.xml_declared(head))


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
