"""Readers, dictionaries, cleaning and anchor mining on small inputs written in the tests and on
Django's real gettext catalogs."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import django
import pytest

from mlctl.data.anchors import SpanMapper, mine_char_anchors
from mlctl.data.clean import Deduper, length_ratio_ok, normalize
from mlctl.data.dictionary import Dictionary, load_dictionary
from mlctl.data.readers import Counts, InputError, check_input, detect_format, read_input
from mlctl.data.words import words_of

DJANGO_DE = Path(django.__file__).parent / "conf" / "locale" / "de" / "LC_MESSAGES"


def _read(path, fmt, src="en", tgt="de"):
    counts = Counts()
    return list(read_input(Path(path), fmt, src, tgt, counts)), dict(counts.by_reason)


def test_tsv_malformed_lines_are_counted_with_their_line(tmp_path, caplog):
    p = tmp_path / "x.tsv.gz"
    raw = b"hello\thallo\tsrc\nno tab here\nbad \xff utf8\tx\nnul\x00\ty\n\nworld\twelt\n"
    # 300 good lines more: a file with over 1% undecodable lines is refused, not read (test_bad_input.py)
    raw += b"".join(b"w%d\tv%d\n" % (i, i) for i in range(300))
    p.write_bytes(gzip.compress(raw))
    pairs, skips = _read(p, detect_format(p))
    assert [(r.src, r.tgt) for r in pairs[:2]] == [("hello", "hallo"), ("world", "welt")] and len(
        pairs
    ) == 302
    assert skips == {"wrong_column_count": 1, "invalid_utf8": 1, "nul_byte": 1}
    assert pairs[1].where == f"{p}:6"
    assert f"{p}:2" in caplog.text and f"{p}:3" in caplog.text and f"{p}:4" in caplog.text


def test_moses_pair_files_and_unaligned_tail(tmp_path):
    (tmp_path / "c.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "c.de.gz").write_bytes(gzip.compress(b"eins\nzwei\n"))
    pairs, skips = _read(tmp_path / "c", "moses")
    assert [(r.src, r.tgt) for r in pairs] == [("one", "eins"), ("two", "zwei")]
    assert skips == {"unaligned_line": 1}
    with pytest.raises(InputError, match=r"c\.fr"):
        check_input(tmp_path / "c", "moses", "en", "fr")


def test_multiway_folder_yields_pivot_pairs_for_every_language(tmp_path):
    d = tmp_path / "un"
    d.mkdir()
    for lang, lines in {
        "en": ["Hello", "Peace"],
        "fr": ["Bonjour", "Paix"],
        "es": ["Hola", "Paz"],
        "zh": ["你好", "和平"],
    }.items():
        (d / f"UNv1.0.6way.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert detect_format(d) == "multiway"
    pairs, _ = _read(d, "multiway", "en", "")
    got = {(r.tgt_lang, r.src, r.tgt) for r in pairs}
    assert got == {
        ("es", "Hello", "Hola"),
        ("fr", "Hello", "Bonjour"),
        ("zh", "Hello", "你好"),
        ("es", "Peace", "Paz"),
        ("fr", "Peace", "Paix"),
        ("zh", "Peace", "和平"),
    }
    only_fr, _ = _read(d, "multiway", "en", "fr")
    assert {r.tgt_lang for r in only_fr} == {"fr"}


def test_tmx(tmp_path):
    p = tmp_path / "m.tmx"
    p.write_text(
        """<?xml version="1.0" encoding="UTF-8"?>
<tmx version="1.4"><header srclang="en"/><body>
<tu><tuv xml:lang="en-US"><seg>Open the <b>file</b></seg></tuv><tuv xml:lang="de-DE"><seg>Datei öffnen</seg></tuv></tu>
<tu><tuv xml:lang="en"><seg>Only English</seg></tuv></tu>
<tu><tuv lang="EN"><seg>Save</seg></tuv><tuv lang="de"><seg>Speichern</seg></tuv></tu>
</body></tmx>""",
        encoding="utf-8",
    )
    pairs, skips = _read(p, "tmx")
    assert [(r.src, r.tgt) for r in pairs] == [("Open the file", "Datei öffnen"), ("Save", "Speichern")]
    assert skips == {"missing_language": 1}


PO = r"""# header comment
msgid ""
msgstr ""
"Content-Type: text/plain; charset=UTF-8\n"

#: a.py:1
msgid "Open file"
msgstr "Datei öffnen"

#, fuzzy
msgid "Close"
msgstr "Schließen"

msgid "One file"
msgid_plural "%d files"
msgstr[0] "Eine Datei"
msgstr[1] "%d Dateien"

msgid "Untranslated"
msgstr ""

msgid "OK"
msgstr "OK"

msgctxt "menu"
msgid ""
"Save "
"as\t..."
msgstr "Speichern "
"unter\t\"...\""

#~ msgid "Old"
#~ msgstr "Alt"
"""


def test_po_entries_and_skips(tmp_path):
    p = tmp_path / "django.po"
    p.write_text(PO, encoding="utf-8")
    pairs, skips = _read(p, "po")
    assert [(r.src, r.tgt) for r in pairs] == [
        ("Open file", "Datei öffnen"),
        ("Save as\t...", 'Speichern unter\t"..."'),
    ]
    assert pairs[0].where == f"{p}:7"
    assert skips == {"po_fuzzy": 1, "po_plural": 1, "po_untranslated": 1, "po_identical": 1}


def _write_mo(path: Path, entries: list[tuple[bytes, bytes]]) -> None:
    """A minimal little-endian .mo file (sorted ids, no hash table)."""
    entries = sorted(entries)
    n = len(entries)
    orig_tab, trans_tab = 28, 28 + 8 * n
    data_off = 28 + 16 * n
    blob, orig, trans = b"", [], []
    for mid, _ in entries:
        orig.append((len(mid), data_off + len(blob)))
        blob += mid + b"\x00"
    for _, mstr in entries:
        trans.append((len(mstr), data_off + len(blob)))
        blob += mstr + b"\x00"
    head = struct.pack("<7I", 0x950412DE, 0, n, orig_tab, trans_tab, 0, 0)
    tables = b"".join(struct.pack("<2I", *e) for e in orig) + b"".join(struct.pack("<2I", *e) for e in trans)
    path.write_bytes(head + tables + blob)


def test_mo_entries_and_skips(tmp_path):
    p = tmp_path / "x.mo"
    _write_mo(
        p,
        [
            (b"", b"Content-Type: text/plain; charset=UTF-8\n"),
            (b"Open file", "Datei öffnen".encode()),
            (b"one\x00many", b"eins\x00viele"),
            (b"menu\x04Save", b"Speichern"),
            (b"Same", b"Same"),
            (b"Bad", b"\xff\xfe"),
            # 200 good entries more: a catalog with over 1% undecodable entries is refused
            *((b"w%03d" % i, b"v%03d" % i) for i in range(200)),
        ],
    )
    pairs, skips = _read(p, "mo")
    assert sorted((r.src, r.tgt) for r in pairs)[:2] == [("Open file", "Datei öffnen"), ("Save", "Speichern")]
    assert len(pairs) == 202
    assert skips == {"po_plural": 1, "po_identical": 1, "invalid_utf8": 1}
    bad = tmp_path / "bad.mo"
    bad.write_bytes(b"not a catalog at all, no magic here")
    with pytest.raises(InputError, match="bad.mo"):
        _read(bad, "mo")


def test_real_django_po_and_mo_agree():
    po, _ = _read(DJANGO_DE / "django.po", "po")
    mo, mo_skips = _read(DJANGO_DE / "django.mo", "mo")
    assert len(po) > 200
    # .mo drops msgctxt into the id and sorts; compare as sets of (msgid, msgstr)
    assert {(r.src, r.tgt) for r in po} == {(r.src, r.tgt) for r in mo}
    assert mo_skips.get("po_plural", 0) > 0


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"x\.docx"):
        detect_format(tmp_path / "x.docx")
    with pytest.raises(InputError, match="nope.tsv"):
        check_input(tmp_path / "nope.tsv", "tsv", "en", "de")
    with pytest.raises(InputError, match="unknown format 'csv'"):
        check_input(tmp_path / "nope.tsv", "csv", "en", "de")


def test_normalize_and_filters():
    assert normalize("Cafe\u0301\u200b  ist\x07\tgut\n") == "Café ist gut"
    assert length_ratio_ok("OK", "Aceptar", 3.0)  # short strings are exempt
    assert not length_ratio_ok("a" * 30, "b" * 9, 3.0) and length_ratio_ok("a" * 30, "b" * 10, 3.0)
    d = Deduper()
    assert (
        d.is_new("en", "de", "a", "b")
        and not d.is_new("en", "de", "a", "b")
        and d.is_new("en", "fr", "a", "b")
    )


def test_dictionaries_tsv_lists_and_errors(tmp_path, data_dir):
    d = load_dictionary(data_dir / "dict.en-de.tsv", "en", "de")
    assert d.entries["number"] == {"zahl", "nummer"}  # several translations per word
    assert d.entries["email address"] == {"e mail adresse"} and d.max_src_words == 2
    lists = load_dictionary(data_dir / "usual-words", "en", "de")
    assert lists.entries["file"] == {"datei"} and len(lists) == 7
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"ok\tgut\nbroken line\n")
    with pytest.raises(InputError, match=r"bad\.tsv:2"):
        load_dictionary(bad, "en", "de")
    bad.write_bytes(b"ok\tgut\n\xff\tx\n")
    with pytest.raises(InputError, match=r"bad\.tsv:2.*UTF-8"):
        load_dictionary(bad, "en", "de")
    with pytest.raises(InputError, match="missing.tsv"):
        load_dictionary(tmp_path / "missing.tsv", "en", "de")
    with pytest.raises(InputError, match="fr.txt"):
        load_dictionary(data_dir / "usual-words", "en", "fr")


def _anchors(src, tgt, pairs, tgt_lang="de"):
    d = Dictionary("en", tgt_lang)
    for s, t in pairs:
        d.add(s, t)
    return [(src[a:b], tgt[c:e]) for a, b, c, e in mine_char_anchors(src, tgt, d)]


def test_anchor_rules():
    # whole words only: "page" is not matched inside "pages", "Seite" not inside "Seitennummer"
    assert _anchors("Two pages", "Zwei Seiten", [("page", "Seite")]) == []
    # case-insensitive, original casing kept
    assert _anchors("Page one", "Die SEITE eins", [("page", "Seite")]) == [("Page", "SEITE")]
    # exactly once on each side
    assert _anchors("page by page", "Seite", [("page", "Seite")]) == []
    assert _anchors("the page", "Seite um Seite", [("page", "Seite")]) == []
    # every anchor kept, multi-word entries on both sides
    got = _anchors(
        "Enter your email address and name",
        "E-Mail-Adresse und Name eingeben",
        [
            ("email address", "E-Mail-Adresse"),
            ("name", "Name"),
            ("enter", "eingeben"),
            ("and", "und"),
            ("address", "Adresse"),
        ],
    )
    assert got == [
        ("Enter", "eingeben"),
        ("email address", "E-Mail-Adresse"),
        ("address", "Adresse"),
        ("and", "und"),
        ("name", "Name"),
    ]


def test_cjk_matches_on_character_boundaries():
    assert [w for w, _, _ in words_of("打开文件 file")] == ["打", "开", "文", "件", "file"]
    assert _anchors("Open the file", "打开文件", [("file", "文件"), ("open", "打开")], "zh") == [
        ("Open", "打开"),
        ("file", "文件"),
    ]
    assert _anchors("file", "文件夹和文件", [("file", "文件")], "zh") == []  # twice: not an anchor


def test_span_mapper_uses_offsets(tiny_tokenizer):
    text = "Enter a valid integer."
    enc = tiny_tokenizer(text, return_offsets_mapping=True)
    m = SpanMapper(enc["offset_mapping"])
    s, e = m.span(text.index("integer"), text.index("integer") + len("integer"))
    pieces = tiny_tokenizer.convert_ids_to_tokens(enc["input_ids"][s : e + 1])
    assert "".join(p.removeprefix("##") for p in pieces) == "integer"
    assert m.span(len(text) + 5, len(text) + 9) is None


TMX_HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n'


def _tu(en: str, de: str) -> str:
    return f'<tu><tuv xml:lang="en"><seg>{en}</seg></tuv><tuv xml:lang="de"><seg>{de}</seg></tuv></tu>\n'


def test_tmx_refuses_entity_expansion_and_external_entities(tmp_path):
    laughs = tmp_path / "laughs.tmx"
    decls = ['<!ENTITY lol "lol">'] + [
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10)
    ]
    laughs.write_text(
        TMX_HEAD + f"<!DOCTYPE tmx [{''.join(decls)}]>\n<tmx><body>{_tu('&lol9;', 'x')}</body></tmx>"
    )
    xxe = tmp_path / "xxe.tmx"
    xxe.write_text(
        TMX_HEAD + '<!DOCTYPE tmx [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
        f"<tmx><body>{_tu('&xxe;', 'x')}</body></tmx>"
    )
    for p in (laughs, xxe):
        pairs, skips = _read(p, "tmx")
        assert pairs == [] and skips == {"unsafe_xml": 1}
    # an undeclared entity is plain malformed XML; the units before it are kept
    bad = tmp_path / "bad.tmx"
    bad.write_text(TMX_HEAD + f"<tmx><body>{_tu('Save', 'Speichern')}{_tu('&nope;', 'x')}</body></tmx>")
    pairs, skips = _read(bad, "tmx")
    assert [(r.src, r.tgt) for r in pairs] == [("Save", "Speichern")] and skips == {"malformed_xml": 1}
    # the usual DOCTYPE naming the TMX DTD is fine: the DTD is never fetched
    ok = tmp_path / "ok.tmx"
    ok.write_text(
        TMX_HEAD + f'<!DOCTYPE tmx SYSTEM "tmx14.dtd">\n<tmx><body>{_tu("a &amp; b", "c")}</body></tmx>'
    )
    pairs, skips = _read(ok, "tmx")
    assert [(r.src, r.tgt) for r in pairs] == [("a & b", "c")] and skips == {}


@pytest.mark.slow
def test_tmx_memory_stays_flat(tmp_path):
    """Peak RSS of a fresh process reading a ~45 MB TMX grows by far less than the file."""
    import subprocess
    import sys

    path = tmp_path / "big.tmx"
    n = 300_000
    with path.open("w", encoding="utf-8") as f:
        f.write(TMX_HEAD + '<tmx version="1.4"><header srclang="en"/><body>\n')
        unit = _tu("sentence number {0} with <b>bold</b> words in it", "Satz Nummer {0} mit Wörtern")
        f.writelines(unit.format(i) for i in range(n))
        f.write("</body></tmx>\n")
    size_mb = path.stat().st_size / 2**20
    code = (
        "import resource, sys; from pathlib import Path; from mlctl.data.readers import Counts, read_input\n"
        "import xml.parsers.expat\n"
        "c = Counts(); r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"n = sum(1 for _ in read_input(Path({str(path)!r}), 'tmx', 'en', 'de', c))\n"
        "print(n, dict(c.by_reason), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) / 1024)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert int(out[0]) == n and out[1] == "{}"
    grew = float(out[2])
    assert size_mb > 40 and grew < 4, f"RSS grew {grew:.1f} MiB reading {size_mb:.0f} MiB"
