"""The demo's prepare summary: its counts add up (kept + skipped = the input's entries)."""

from __future__ import annotations

import re

from test_data_readers import _write_mo

from launcher.demo import prepare_shards
from mlctl.config import load_config

DICT = "open\töffnen\nfile\tDatei\nsave\tspeichern\n"


def test_summary_counts_add_up(tmp_path, tiny_model_dir, capsys):
    mo = tmp_path / "django.mo"
    entries = [(b"", b"Content-Type: text/plain; charset=UTF-8\n")]  # the header is no entry
    entries += [(f"Open file {i}".encode(), f"Datei {i} öffnen".encode()) for i in range(6)]
    entries += [(b"one file\x00many files", b"eine Datei\x00viele Dateien"), (b"Same", b"Same")]
    entries += [(b"Open file 0 again", "Datei 0 öffnen".encode())]  # kept: a distinct pair
    _write_mo(mo, entries)
    d = tmp_path / "dict.tsv"
    d.write_text(DICT, encoding="utf-8")
    cfg = load_config(overrides=[f"model.name_or_path={tiny_model_dir}", "data.prepare.keep_no_anchor=true"])
    out = prepare_shards(cfg, tmp_path / "work", [(mo, "de")], {"de": d})
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[demo] shards:"))
    m = re.match(
        r"\[demo\] shards: (\d+) pairs kept of (\d+) input entries \((\d+) read as pairs\); skipped: (.*)",
        line,
    )
    assert m, line
    kept, entries_n, read = int(m[1]), int(m[2]), int(m[3])
    skipped = {k: int(v) for k, v in (s.rsplit(" ", 1) for s in m[4].split(", "))}
    assert (kept, read) == (7, 7)  # six + "again"; the plural and the identical entry never become pairs
    assert skipped == {"po_plural": 1, "po_identical": 1}
    assert entries_n == kept + sum(skipped.values()) == 9
    assert (out / "manifest.json").is_file()


def test_demo_switches_into_its_own_languages(tmp_path, tiny_model_dir):
    """With the recipe's data.code_switch, the demo lists its dictionaries' words for switching."""
    import json

    mo = tmp_path / "django.mo"
    _write_mo(
        mo, [(b"", b"Content-Type: text/plain; charset=UTF-8\n"), (b"Open file", "Datei öffnen".encode())]
    )
    d = tmp_path / "dict.tsv"
    d.write_text(DICT, encoding="utf-8")
    ov = [f"model.name_or_path={tiny_model_dir}", "data.code_switch=0.25"]
    out = prepare_shards(load_config(overrides=ov), tmp_path / "work", [(mo, "de")], {"de": d})
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["code_switch"]) == ["en-de"] and m["switch_pair_coverage"] == 1.0
