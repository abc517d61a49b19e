"""Bilingual dictionaries: TSV word pairs, or the paper's format (one word list per language, line i
of each list are translations of each other). Entries are stored as lower-cased phrases, so
anchor mining looks phrases up in a dict instead of looping over the dictionary."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mlctl.data import charset
from mlctl.data.readers import open_text_bytes
from mlctl.data.skips import InputError
from mlctl.data.words import phrase_key


@dataclass
class Dictionary:
    """src phrase -> target phrases (keys from :func:`phrase_key`: lower-cased words joined by one space);
    plus the longest phrase, in words, on each side."""

    src_lang: str
    tgt_lang: str
    entries: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    sources: list[str] = field(default_factory=list)
    max_src_words: int = 0
    max_tgt_words: int = 0
    # every proper word prefix of a multi-word phrase ("email" for "email address"): mining extends a
    # phrase only while it is one of these
    src_prefixes: set[str] = field(default_factory=set)
    tgt_prefixes: set[str] = field(default_factory=set)
    tgt_phrases: set[str] = field(default_factory=set)

    def add(self, src: str, tgt: str) -> bool:
        s, t = phrase_key(src), phrase_key(tgt)
        if not s or not t:
            return False
        self.entries[s].add(t)
        self.tgt_phrases.add(t)
        for key, prefixes in ((s, self.src_prefixes), (t, self.tgt_prefixes)):
            words = key.split(" ")
            prefixes.update(" ".join(words[:k]) for k in range(1, len(words)))
        self.max_src_words = max(self.max_src_words, s.count(" ") + 1)
        self.max_tgt_words = max(self.max_tgt_words, t.count(" ") + 1)
        return True

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())


def _read_lines(path: Path) -> list[str]:
    """All lines of a dictionary file (a byte-order mark, or UTF-16's NUL pattern, gives its encoding;
    else UTF-8); any undecodable line or NUL byte is fatal, naming the line and the likely encoding."""
    try:
        with open_text_bytes(path) as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"dictionary {path} cannot be read: {e}") from None
    name, bom, _why = charset.sniff(data[:4096])
    if name and charset.is_wide(name):
        text = data[bom:].decode(name, errors="replace")
        raw_lines = [line.encode("utf-8") for line in text.split("\n")]
    else:
        raw_lines = data[bom:].split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    out = []
    for lineno, raw in enumerate(raw_lines, 1):
        if b"\x00" in raw:
            raise InputError(f"dictionary {path}:{lineno}: NUL byte; is this a text file?")
        if name and charset.is_wide(name) and "\ufffd".encode() in raw:
            raise InputError(f"dictionary {path}:{lineno}: invalid {name}")
        try:
            out.append(raw.rstrip(b"\r").decode("utf-8"))
        except UnicodeDecodeError as e:
            what, suggest = charset.guess(raw)
            hint = f"; it looks like {what}" + (
                f": re-encode it (iconv -f {suggest} -t utf-8)" if suggest else ""
            )
            raise InputError(
                f"dictionary {path}:{lineno}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at line offset "
                f"{e.start}){hint}"
            ) from None
    return out


def _strip_quotes(s: str) -> str:
    s = s.strip()
    return s[1:-1].strip() if len(s) >= 2 and s[0] == s[-1] == '"' else s


def _no_entries(what: str, path: Path, lines: list[str]) -> InputError:
    if not any(line.strip() and not line.startswith("#") for line in lines):
        why = "the file is empty" if not lines else f"its {len(lines)} line(s) are blank or comments"
    else:
        why = "no line has a word on both sides"
    return InputError(f"{what} {path} has no entries ({why})")


def load_tsv_dictionary(
    path: Path, src_lang: str, tgt_lang: str, into: Dictionary | None = None, what: str = "dictionary"
) -> Dictionary:
    """``src<TAB>tgt`` lines; several lines per source word give several translations. Blank lines and
    ``#`` comments are ignored; a line without a tab is an error naming the line, and so is a file
    without a single entry."""
    d = into or Dictionary(src_lang, tgt_lang)
    d.sources.append(str(path))
    lines, added = _read_lines(path), 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) < 2:
            raise InputError(f"{what} {path}:{lineno}: expected 'word<TAB>translation', got {line[:60]!r}")
        added += d.add(_strip_quotes(cols[0]), _strip_quotes(cols[1]))
    if not added:
        raise _no_entries(what, path, lines)
    return d


def load_list_dictionary(
    folder: Path, src_lang: str, tgt_lang: str, into: Dictionary | None = None, what: str = "dictionary"
) -> Dictionary:
    """The paper's format: ``folder/{src}.txt`` and ``folder/{tgt}.txt``, line-aligned word lists."""
    d = into or Dictionary(src_lang, tgt_lang)
    files = [folder / f"{lang}.txt" for lang in (src_lang, tgt_lang)]
    for f in files:
        if not f.is_file():
            raise InputError(
                f"dictionary folder {folder}: no word list {f.name} for language pair {src_lang}-{tgt_lang}"
            )
    src, tgt = _read_lines(files[0]), _read_lines(files[1])
    if len(src) != len(tgt):
        raise InputError(
            f"dictionary word lists differ in length: {files[0]} has {len(src)} lines, "
            f"{files[1]} has {len(tgt)}"
        )
    d.sources.append(str(folder))
    added = 0
    for s, t in zip(src, tgt, strict=True):
        added += d.add(s.strip(), t.strip())
    if not added:
        raise _no_entries(f"{what} word lists", files[0], src)
    return d


def load_dictionary(
    path: str | Path, src_lang: str, tgt_lang: str, into: Dictionary | None = None, what: str = "dictionary"
) -> Dictionary:
    """A folder is a pair of word lists, anything else a TSV (gzip'd or not). ``what`` names the
    dictionary's role in messages ("code-switch dictionary")."""
    p = Path(path)
    if p.is_dir():
        return load_list_dictionary(p, src_lang, tgt_lang, into, what)
    if not p.is_file():
        raise InputError(f"{what} not found: {p}")
    return load_tsv_dictionary(p, src_lang, tgt_lang, into, what)
