"""Readers for parallel corpora, one module per format family. Each yields :class:`RawPair` records
with the file and line they came from; a malformed line or entry is counted by reason in a
:class:`~mlctl.data.skips.Counts` and skipped. What would lose a file wholesale is an
:class:`~mlctl.data.skips.InputError` naming it instead (a truncated gzip, a corrupt .mo header, a
file in another encoding); a TMX that breaks midway counts every unit it lost.

Formats: ``tsv``, ``moses`` and ``multiway`` (:mod:`.plain`), ``tmx`` (:mod:`.tmx`), ``po`` and
``mo`` (gettext catalogs, :mod:`.catalogs`). Any file may be gzip'd (``.gz``). Text is decoded as
:mod:`mlctl.data.charset` says (:mod:`.base`); a file in another encoding than the one it is read
with is refused, not half read.

This module picks the reader (:func:`detect_format`, :func:`read_input`) and checks an input before
anything is read (:func:`check_input`); the names below are the readers' public API.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mlctl.data.readers.base import RawPair, known_codec, open_text_bytes, text_lines
from mlctl.data.readers.catalogs import mo_header, read_mo, read_po
from mlctl.data.readers.plain import moses_file, multiway_files, read_moses, read_multiway, read_tsv
from mlctl.data.readers.tmx import read_tmx
from mlctl.data.skips import Counts, InputError

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "Counts",
    "InputError",
    "RawPair",
    "check_input",
    "detect_format",
    "multiway_files",
    "open_text_bytes",
    "read_input",
    "read_mo",
    "read_moses",
    "read_multiway",
    "read_po",
    "read_tmx",
    "read_tsv",
    "text_lines",
]

FORMATS = ("tsv", "moses", "multiway", "tmx", "po", "mo")
EXTENSIONS = {".tsv": "tsv", ".tab": "tsv", ".txt": "tsv", ".tmx": "tmx", ".po": "po", ".mo": "mo"}


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
        known_codec(path, encoding, True)
    if not src_lang or (not tgt_lang and fmt != "multiway"):
        raise InputError(
            f"{path}: source and target languages are needed (give --src-lang/--tgt-lang "
            "or PATH:FORMAT:SRC-TGT)"
        )
    if fmt == "moses":
        moses_file(path, src_lang)
        moses_file(path, tgt_lang)
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
        mo_header(head, path)
