"""Readers of plain-text line formats: ``tsv`` (``src<TAB>tgt[<TAB>more]``), ``moses``
(``PREFIX.src`` + ``PREFIX.tgt``, line aligned) and ``multiway`` (a folder with one line-aligned file
per language; yields pivot-X pairs). Lines past the end of the shortest of aligned files are
counted as ``unaligned_line``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mlctl.data.readers.base import RawPair, decoded_lines
from mlctl.data.skips import Counts, InputError


def read_tsv(
    path: Path, src_lang: str, tgt_lang: str, counts: Counts, encoding: str = ""
) -> Iterator[RawPair]:
    for lineno, line in decoded_lines(path, counts, encoding):
        if line is None:
            continue
        if not line.strip():
            continue  # blank lines separate nothing in TSV; not worth a count
        cols = line.split("\t")
        if len(cols) < 2:
            counts.skip("wrong_column_count", f"{path}:{lineno}", f"{len(cols)} column(s), need >= 2")
            continue
        yield RawPair(cols[0], cols[1], src_lang, tgt_lang, f"{path}:{lineno}")


def moses_file(prefix: Path, lang: str) -> Path:
    for cand in (Path(f"{prefix}.{lang}"), Path(f"{prefix}.{lang}.gz")):
        if cand.is_file():
            return cand
    raise InputError(f"moses input {prefix}: no file {prefix}.{lang} (or .gz)")


def _aligned(
    files: dict[str, Path], counts: Counts, encoding: str = ""
) -> Iterator[tuple[int, dict[str, str | None]]]:
    """Zip line-aligned files; lines past the end of the shortest are counted as unaligned."""
    iters = {lang: decoded_lines(p, counts, encoding) for lang, p in files.items()}
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
    files = {src_lang: moses_file(prefix, src_lang), tgt_lang: moses_file(prefix, tgt_lang)}
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
