"""Readers of gettext catalogs: ``po`` (text) and ``mo`` (binary). Both skip the header and count
fuzzy, plural, untranslated and untranslated-identical entries; a broken entry is counted and the
rest of the file still read.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from mlctl.data import charset
from mlctl.data.readers.base import RawPair, decoded_lines, known_codec, open_text_bytes
from mlctl.data.skips import Counts, InputError


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

    for lineno, line in decoded_lines(path, counts, encoding, _po_charset(path)):
        if line is None:  # undecodable: counted by decoded_lines, and its entry is lost with it
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


def mo_header(data: bytes, path: Path) -> tuple[str, int, int, int]:
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
    end, n, orig_off, trans_off = mo_header(data, path)

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
    name = known_codec(path, encoding or declared, explicit) if encoding or declared else "utf-8"
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
