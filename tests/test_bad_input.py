"""Bad input to every verb ends in one clear line naming the file and what is wrong (exit 2), or in
a counted skip; never a traceback. Training-time cases (waiting for CPUs) are in test_output.py."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from s3_server import BUCKET

from launcher.cli import main


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    (tmp_path / "dict.tsv").write_text("hello\thallo\nworld\twelt\n")
    (tmp_path / "pairs.tsv").write_text("Hello world\tHallo Welt\nThe world\tDie Welt\n")
    (tmp_path / "empty.tsv").write_text("")
    (tmp_path / "latin1.tsv").write_bytes(
        "Café au lait\tMilchkaffee\nHello world\tHallo Welt\n".encode("latin-1")
    )
    lines = "".join(f"Hello world {i}\tHallo Welt {i}\n" for i in range(5000)).encode()
    (tmp_path / "trunc.tsv.gz").write_bytes(gzip.compress(lines)[:-200])
    (tmp_path / "afile").write_text("not a folder\n")
    return tmp_path


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def prepare_args(files: Path, tok: Path, inp: str, out: str = "out") -> list[str]:
    return [
        "prepare",
        "--input",
        str(files / inp),
        "--src-lang",
        "en",
        "--tgt-lang",
        "de",
        "--dictionary",
        str(files / "dict.tsv"),
        "--tokenizer",
        str(tok),
        "--out",
        str(files / out),
    ]


@pytest.mark.parametrize(
    "inp, out, expected",
    [
        ("missing.tsv", "out", "input file not found: {files}/missing.tsv"),
        ("trunc.tsv.gz", "out", "{files}/trunc.tsv.gz: truncated or corrupt gzip file"),
        ("pairs.tsv", "afile", "{files}/afile"),
        ("empty.tsv", "out", "nothing to train on from {files}/empty.tsv: no pairs in the input"),
    ],
)
def test_prepare_stops_with_the_file_named(files, tiny_model_dir, capsys, inp, out, expected):
    assert main(prepare_args(files, tiny_model_dir, inp, out)) == 2
    line = error_line(capsys)
    assert line.startswith("mlctl prepare: error:") and expected.format(files=files) in line, line


def _latin1_tsv(path: Path) -> None:
    """200 pairs in Latin-1, 98 of them with accents (the issue's file)."""
    rows = [
        f"Café number {i}\tMilchkaffee Nummer {i} für Sie"
        if i % 2 and i < 196
        else f"Hello world {i}\tHallo Welt {i}"
        for i in range(200)
    ]
    path.write_bytes(("\n".join(rows) + "\n").encode("latin-1"))


def test_a_file_in_another_encoding_is_refused_not_half_read(files, tiny_model_dir, capsys):
    _latin1_tsv(files / "latin1.tsv")
    assert main(prepare_args(files, tiny_model_dir, "latin1.tsv")) == 2
    assert error_line(capsys) == (
        f"mlctl prepare: error: {files}/latin1.tsv: not UTF-8: 10 of its first 20 lines do not decode "
        "(the first at line 2, byte offset 30: 0xe9); it looks like Latin-1/cp1252 (Western European): "
        "re-encode it to UTF-8 (iconv -f cp1252 -t utf-8) or give its encoding (--encoding cp1252, or "
        "encoding: cp1252 on the input)"
    )
    assert not (files / "out").exists()
    # as the message says: with its encoding given, every line is read
    assert main([*prepare_args(files, tiny_model_dir, "latin1.tsv"), "--encoding", "cp1252"]) == 0
    manifest = json.loads((files / "out" / "manifest.json").read_text())
    assert manifest["counts"]["read"] == 200 and manifest["inputs"][0]["encoding"] == "cp1252"
    assert "invalid_utf8" not in manifest["counts"]["dropped"]


def test_a_few_broken_lines_in_a_utf8_file_are_counted_and_skipped(files, tiny_model_dir):
    rows = [f"Grüße {i}\tHello world {i}".encode() for i in range(400)]
    rows[7] = b"Gr\xfc\xdfe\tHello world"  # one line a tool mangled
    (files / "mostly.tsv").write_bytes(b"\n".join(rows) + b"\n")
    args = prepare_args(files, tiny_model_dir, "mostly.tsv")
    args[args.index("--src-lang") + 1 : args.index("--tgt-lang") + 2] = ["de", "--tgt-lang", "en"]
    assert main([*args, "--keep-no-anchor"]) == 0
    counts = json.loads((files / "out" / "manifest.json").read_text())["counts"]
    assert counts["read"] == 399 and counts["dropped"] == {"invalid_utf8": 1}


def _read(path: Path, fmt: str, tgt: str = "de", **kw) -> tuple[list[tuple[str, str]], dict]:
    from mlctl.data.readers import Counts, read_input

    counts = Counts()
    pairs = [(r.src, r.tgt) for r in read_input(path, fmt, "en", tgt, counts, **kw)]
    return pairs, dict(counts.by_reason)


PAIRS = [("Coffee", "Café"), ("Open", "Öffnen"), ("Close", "Schließen")]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
def test_utf16_and_utf32_text_is_read_from_its_bom_or_nul_pattern(tmp_path, encoding):
    # "utf-16" and "utf-32" write a byte-order mark, "-le"/"-be" none
    p = tmp_path / "x.tsv"
    p.write_bytes("".join(f"{a}\t{b}\r\n" for a, b in PAIRS).encode(encoding))
    assert _read(p, "tsv") == (PAIRS, {})


def test_a_po_file_is_read_in_its_declared_charset(tmp_path):
    po = tmp_path / "de.po"
    head = 'msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=ISO-8859-1\\n"\n\n'
    po.write_bytes((head + "".join(f'msgid "{a}"\nmsgstr "{b}"\n\n' for a, b in PAIRS)).encode("latin-1"))
    assert _read(po, "po") == (PAIRS, {})


def test_a_mo_file_is_read_in_its_declared_charset(tmp_path):
    import struct

    entries = sorted(
        [(b"", b"Content-Type: text/plain; charset=ISO-8859-1\n")]
        + [(a.encode("latin-1"), b.encode("latin-1")) for a, b in PAIRS]
    )
    n, blob, tables = len(entries), b"", []
    base = 28 + 16 * n
    for k in (0, 1):
        for e in entries:
            tables.append(struct.pack("<2I", len(e[k]), base + len(blob)))
            blob += e[k] + b"\0"
    mo = tmp_path / "de.mo"
    mo.write_bytes(struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0) + b"".join(tables) + blob)
    assert sorted(_read(mo, "mo")[0]) == sorted(PAIRS)


def _tmx(pairs, tgt: str, encoding: str, declare: bool = True) -> bytes:
    decl = f'<?xml version="1.0" encoding="{encoding}"?>\n' if declare else ""
    units = "".join(
        f'<tu><tuv xml:lang="en"><seg>{a}</seg></tuv><tuv xml:lang="{tgt}"><seg>{b}</seg></tuv></tu>\n'
        for a, b in pairs
    )
    return (decl + f'<tmx version="1.4"><body>\n{units}</body></tmx>\n').encode(encoding)


def test_a_tmx_is_read_in_its_declared_multibyte_encoding(tmp_path):
    ja = [("File", "ファイル"), ("Open", "開く")]
    p = tmp_path / "ja.tmx"
    p.write_bytes(_tmx(ja, "ja", "shift_jis"))  # expat alone: "multi-byte encodings are not supported"
    assert _read(p, "tmx", "ja") == (ja, {})


def test_an_undeclared_latin1_tmx_is_refused_with_its_likely_encoding(files, tiny_model_dir, capsys):
    (files / "x.tmx").write_bytes(_tmx(PAIRS, "de", "latin-1", declare=False))
    assert main(prepare_args(files, tiny_model_dir, "x.tmx")) == 2
    assert error_line(capsys) == (
        f"mlctl prepare: error: {files}/x.tmx: not UTF-8: the bytes at line 2, byte offset 99: 0xe9 do "
        "not decode; it looks like Latin-1/cp1252 (Western European): re-encode it to UTF-8 (iconv -f "
        "cp1252 -t utf-8) or give its encoding (--encoding cp1252, or encoding: cp1252 on the input)"
    )
    assert _read(files / "x.tmx", "tmx", encoding="latin-1") == (PAIRS, {})


def test_dictionaries_in_utf16_are_read_and_in_latin1_named(files):
    from mlctl.data.dictionary import load_dictionary
    from mlctl.data.readers import InputError

    (files / "d16.tsv").write_bytes("café\tKaffee\nöffnen\topen\n".encode("utf-16"))
    assert load_dictionary(files / "d16.tsv", "de", "en").entries["café"] == {"kaffee"}
    (files / "d1.tsv").write_bytes("cafe\tKaffee\ncafé\tKaffee\n".encode("latin-1"))
    with pytest.raises(InputError) as e:
        load_dictionary(files / "d1.tsv", "de", "en")
    assert str(e.value) == (
        f"dictionary {files}/d1.tsv:2: invalid UTF-8 (byte 0xe9 at line offset 3); it looks like "
        "Latin-1/cp1252 (Western European): re-encode it (iconv -f cp1252 -t utf-8)"
    )


@pytest.mark.parametrize(
    "pairs, model, expected",
    [
        ("missing.tsv", None, "pairs file not found: {files}/missing.tsv"),
        ("empty.tsv", None, "{files}/empty.tsv: no en<TAB>xx pairs in the file"),
        ("trunc.tsv.gz", None, "{files}/trunc.tsv.gz: truncated or corrupt gzip file"),
        ("pairs.tsv", "{files}/no_such_model", "model folder not found: {files}/no_such_model"),
    ],
)
def test_eval_stops_with_the_file_named(files, tiny_model_dir, capsys, pairs, model, expected):
    model = (model or str(tiny_model_dir)).format(files=files)
    assert main(["eval", "--model", model, "--pairs", str(files / pairs)]) == 2
    line = error_line(capsys)
    assert line.startswith("mlctl eval: error:") and expected.format(files=files) in line, line


@pytest.fixture()
def no_model_load(monkeypatch):
    """Loading a model or tokenizer fails the test: the cheap checks must have stopped the verb."""
    from mlctl import hub
    from mlctl.model import MLCTLModel

    def refuse(*_args, **_kw):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(MLCTLModel, "from_pretrained", refuse)
    monkeypatch.setattr(hub, "load_tokenizer", refuse)


def test_eval_refuses_a_pair_file_in_another_encoding(files, tiny_model_dir, capsys, no_model_load):
    from mlctl.evaluate import read_pair_file

    _latin1_tsv(files / "latin1.tsv")
    argv = ["eval", "--model", str(tiny_model_dir), "--pairs", str(files / "pairs.tsv")]
    assert main([*argv, "--pairs", str(files / "latin1.tsv")]) == 2
    assert error_line(capsys) == (
        f"mlctl eval: error: {files}/latin1.tsv: not UTF-8: 10 of its first 20 lines do not decode "
        "(the first at line 2, byte offset 30: 0xe9); it looks like Latin-1/cp1252 (Western European): "
        "re-encode it to UTF-8 (iconv -f cp1252 -t utf-8) or give its encoding (--encoding cp1252)"
    )
    # as the message says: with its encoding given, every line is read
    pf = read_pair_file(files / "latin1.tsv", encoding="cp1252")
    assert len(pf.pairs) == 200 and pf.pairs[1] == ("Café number 1", "Milchkaffee Nummer 1 für Sie")
    assert pf.skipped == 0


def test_train_refuses_eval_pairs_in_another_encoding_before_it_starts(files):
    from launcher.preflight import preflight
    from mlctl.config import Config
    from mlctl.data.readers import InputError

    _latin1_tsv(files / "latin1.tsv")
    (files / "shards").mkdir()
    (files / "shards" / "manifest.json").write_text("{}")
    cfg = Config()
    cfg.data.shards, cfg.eval.pairs = str(files / "shards"), [str(files / "latin1.tsv")]
    with pytest.raises(InputError, match=f"^{files}/latin1.tsv: not UTF-8: 10 of its first 20 lines") as info:
        preflight(cfg)
    # training has no --encoding: the message asks for UTF-8 only
    assert str(info.value).endswith("re-encode it to UTF-8 (iconv -f cp1252 -t utf-8)")


def test_eval_reads_utf16_and_counts_a_few_broken_lines(tmp_path, caplog):
    from mlctl.evaluate import read_pair_file

    for encoding in ("utf-16", "utf-16-le", "utf-8-sig"):  # with a BOM, without one, UTF-8's BOM
        p = tmp_path / f"{encoding}.tsv"
        p.write_bytes("".join(f"{a}\t{b}\r\n" for a, b in PAIRS).encode(encoding))
        assert read_pair_file(p).pairs == PAIRS, encoding
    rows = [f"Grüße {i}\tHello world {i}".encode() for i in range(400)]
    rows[7] = b"Gr\xfc\xdfe\tHello world"  # one line a tool mangled
    (tmp_path / "mostly.tsv").write_bytes(b"\n".join(rows) + b"\n")
    pf = read_pair_file(tmp_path / "mostly.tsv")
    assert len(pf.pairs) == 399 and pf.skipped == 1 and pf.reasons == {"not UTF-8": 1}
    assert (
        f"{tmp_path}/mostly.tsv:8: skipped (not UTF-8): 'utf-8' codec can't decode byte 0xfc" in caplog.text
    )


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["export", "{files}/norun", "{files}/exp"], "run folder not found: {files}/norun"),
        (
            ["export", "{files}", "{files}/exp"],
            "{files} is not a run folder (needs config.yaml and checkpoints/)",
        ),
        (["report", "{files}"], "{files}/metrics.jsonl does not exist"),
        (["report", "{files}/afile"], "afile/metrics.jsonl"),
        (["train", "data.shards={files}/noshards"], "no manifest.json in {files}/noshards"),
        (["demo", "--work", "{files}/afile"], "{files}/afile"),
    ],
)
def test_other_verbs_name_what_is_wrong(files, capsys, argv, expected):
    assert main([a.format(files=files) for a in argv]) == 2
    line = error_line(capsys)
    assert line.startswith(f"mlctl {argv[0]}: error:") and expected.format(files=files) in line, line


def test_report_on_a_file_of_garbage(files, capsys):
    run = files / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b"\x00\xff garbage\nnot json\n")
    assert main(["report", str(run)]) == 2
    assert "holds no training steps" in error_line(capsys)


@pytest.fixture()
def small_mount(tmp_path: Path):
    """``mount(options)``: a 16 KiB tmpfs at a fresh folder (read-only with ``ro``), unmounted after."""
    import shutil
    import subprocess

    mounted: list[Path] = []

    def mount(options: str) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no `mount` here")
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size=16k,{options}", "tmpfs", str(where)], capture_output=True
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount

    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.parametrize(
    "options, expected", [("rw", "No space left on device"), ("ro", "Read-only file system")]
)
def test_prepare_into_a_full_or_read_only_folder(
    files, tiny_model_dir, capsys, small_mount, options, expected
):
    out = small_mount(options) / "shards"
    lines = "".join(f"Hello world number {i}\tHallo Welt Nummer {i}\n" for i in range(3000))
    (files / "many.tsv").write_text(lines)
    args = prepare_args(files, tiny_model_dir, "many.tsv")
    args[args.index("--out") + 1] = str(out)
    assert main(args) == 2
    line = error_line(capsys)
    assert line.startswith("mlctl prepare: error:") and expected in line and str(out.parent) in line, line


# --------------------------------------------------------------------------------------------------
# A failed prepare never costs the dataset already in its output (issue 21)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(files: Path, out: str = "out") -> list[str]:
    """Staging folders, old copies and locks of `out` that a finished prepare should not leave."""
    return sorted(p.name for p in files.iterdir() if p.name.startswith(f".{out}."))


@pytest.fixture()
def dataset(files, tiny_model_dir) -> dict[str, bytes]:
    """A good dataset in files/out (two shards); returns its files' bytes."""
    assert main([*prepare_args(files, tiny_model_dir, "pairs.tsv"), "--samples-per-shard", "1"]) == 0
    snap = _snapshot(files / "out")
    assert {"manifest.json", "shard-000000.tar", "shard-000001.tar"} == set(snap)
    return snap


def _interrupt_mid_write(monkeypatch) -> None:
    """Ctrl-C while the shards are being written (the second record)."""
    from mlctl.data.shards import ShardWriter

    write, calls = ShardWriter.write, []

    def write_then_interrupt(self, *rec):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        write(self, *rec)

    monkeypatch.setattr(ShardWriter, "write", write_then_interrupt)


@pytest.mark.parametrize(
    "inp, expected",
    [
        (
            "empty.tsv",
            "mlctl prepare: error: nothing to train on from {files}/empty.tsv: no pairs in the input",
        ),
        ("trunc.tsv.gz", "mlctl prepare: error: {files}/trunc.tsv.gz: truncated or corrupt gzip file"),
        ("interrupt", "mlctl prepare: interrupted; {files}/out is as it was before"),
    ],
)
def test_a_failed_prepare_leaves_the_previous_dataset(
    files, tiny_model_dir, capsys, monkeypatch, dataset, inp, expected
):
    if inp == "interrupt":
        _interrupt_mid_write(monkeypatch)
        inp = "many.tsv"
        (files / inp).write_text("".join(f"Hello world {i}\tHallo Welt {i}\n" for i in range(50)))
    assert main(prepare_args(files, tiny_model_dir, inp)) in (2, 130)
    assert error_line(capsys).startswith(expected.format(files=files))
    assert _snapshot(files / "out") == dataset  # byte for byte
    assert _leftovers(files) == []


def test_nothing_kept_writes_nothing(files, tiny_model_dir, capsys):
    assert main(prepare_args(files, tiny_model_dir, "empty.tsv", out="new")) == 2
    assert "nothing to train on" in error_line(capsys)
    assert not (files / "new").exists() and _leftovers(files, "new") == []  # no 0-sample manifest


def test_a_swap_that_fails_halfway_puts_the_previous_dataset_back(
    files, tiny_model_dir, capsys, monkeypatch, dataset
):
    import mlctl.data.output as output

    rename, calls = os.rename, []

    def rename_then_fail(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # out -> .out.old-PID went through; the staging folder -> out fails
            raise OSError(5, "Input/output error", str(dst))
        rename(src, dst)

    monkeypatch.setattr(output.os, "rename", rename_then_fail)
    args = [*prepare_args(files, tiny_model_dir, "pairs.tsv"), "--samples-per-shard", "2"]
    assert main(args) == 2
    assert "Input/output error" in error_line(capsys)
    assert _snapshot(files / "out") == dataset and _leftovers(files) == []


def test_a_prepare_killed_while_swapping_is_repaired_by_the_next(files, tiny_model_dir, caplog, dataset):
    # What SIGKILL between the two renames leaves: the dataset aside, a complete staging folder, a lock.
    os.rename(files / "out", files / ".out.old-999999")
    shutil.copytree(files / ".out.old-999999", files / ".out.staging-999999")
    (files / ".out.lock").write_text(
        json.dumps({"pid": 999999, "host": socket.gethostname(), "started": "x"})
    )
    assert main(prepare_args(files, tiny_model_dir, "empty.tsv")) == 2  # even a failing run repairs
    assert _snapshot(files / "out") == dataset and _leftovers(files) == []
    assert "restored" in caplog.text and "no longer running" in caplog.text


def test_an_output_folder_holding_other_files_is_refused(files, tiny_model_dir, capsys):
    (files / "mine").mkdir()
    (files / "mine" / "notes.txt").write_text("keep me")
    assert main(prepare_args(files, tiny_model_dir, "pairs.tsv", out="mine")) == 2
    line = error_line(capsys)
    assert f"output folder {files}/mine holds notes.txt, which `mlctl prepare` did not write" in line, line
    assert (files / "mine" / "notes.txt").read_text() == "keep me"


@pytest.fixture()
def s3(s3_bucket, monkeypatch, tmp_path):
    """A prefix in the module's moto bucket (tests/s3_server.py). The local temp folder (staging and
    lock of an object-store output) is a fresh one, so leftovers are visible."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    return s3_bucket.uri("shards")


def test_prepare_into_an_object_store_writes_the_manifest_last(
    files, tiny_model_dir, s3, capsys, monkeypatch
):
    import hashlib

    from mlctl import storage

    def objects() -> dict[str, bytes]:
        return {n: storage.read_bytes(storage.join(s3, n)) for n in storage.list_names(s3)}

    args = prepare_args(files, tiny_model_dir, "pairs.tsv")
    args[args.index("--out") + 1] = s3.replace(BUCKET, "no-such-bucket")
    assert main(args) == 2  # before any work
    assert (
        error_line(capsys)
        == "mlctl prepare: error: output s3://no-such-bucket/shards: there is no bucket 'no-such-bucket'"
    )
    args[args.index("--out") + 1] = s3
    assert main([*args, "--samples-per-shard", "1"]) == 0
    good = objects()
    manifest = json.loads(good["manifest.json"])
    assert {s["name"] for s in manifest["shards"]} | {"manifest.json"} == set(good) and len(good) == 3
    assert all(hashlib.sha256(good[s["name"]]).hexdigest() == s["sha256"] for s in manifest["shards"])

    # a run that fails before publishing touches nothing in the bucket
    empty = prepare_args(files, tiny_model_dir, "empty.tsv")
    empty[empty.index("--out") + 1] = s3
    assert main(empty) == 2 and "nothing to train on" in error_line(capsys)
    assert objects() == good

    # an upload that breaks at the second shard leaves no manifest (never one naming a missing shard)
    upload = storage.upload_file

    def upload_then_fail(local, location):
        if "shard-000001" in str(location):
            raise OSError("connection reset")
        upload(local, location)

    monkeypatch.setattr(storage, "upload_file", upload_then_fail)
    (files / "three.tsv").write_text("Hello world\tHallo Welt\nThe world\tDie Welt\nHello\tHallo\n")
    args[args.index("--input") + 1] = str(files / "three.tsv")
    assert main([*args, "--samples-per-shard", "1"]) == 2
    line = error_line(capsys)
    assert (
        f"mlctl prepare: error: s3://{BUCKET}/shards: uploading shard-000001.tar failed after 1 of 3 "
        "shard(s); no manifest.json was written there, so readers see no dataset until a prepare "
        "succeeds: connection reset" in line
    ), line
    assert "manifest.json" not in storage.list_names(s3)
    assert list((Path(tempfile.gettempdir())).iterdir()) == []  # local staging and lock are gone


# --------------------------------------------------------------------------------------------------
# One prepare per output folder at a time


def test_a_second_prepare_into_a_locked_folder_names_the_holder(files, tiny_model_dir, capsys, dataset):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    code = (
        "import time; from mlctl.lock import RunLock\n"
        f"RunLock({str(files / '.out.lock')!r}).acquire(); print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(prepare_args(files, tiny_model_dir, "pairs.tsv")) == 2
        line = error_line(capsys)
        assert line.startswith(
            f"mlctl prepare: error: output {files}/out is in use by pid {holder.pid} on host {socket.gethostname()}"
        ), line
        assert f"wait for it to finish or stop it (lock file {files}/.out.lock)" in line, line
        assert _snapshot(files / "out") == dataset
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_prepares_at_once_leave_one_complete_dataset(files, tiny_model_dir):
    """Two real `mlctl prepare` processes into one folder: each either finishes or stops with the
    lock error; never a decode error from the other's temporary files, an orphan shard or no manifest."""
    import hashlib
    import subprocess
    import sys

    (files / "many.tsv").write_text("".join(f"Hello world {i}\tHallo Welt {i}\n" for i in range(20000)))
    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-m", "launcher.cli", *prepare_args(files, tiny_model_dir, "many.tsv")]
    env = {**os.environ, "PYTHONPATH": str(root)}
    procs = [
        subprocess.Popen([*argv, "--samples-per-shard", "3000"], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    for rc, err in results:
        assert "Traceback" not in err and (rc == 0 or (rc == 2 and "is in use by pid" in err)), err
    assert any(rc == 0 for rc, _ in results)
    manifest = json.loads((files / "out" / "manifest.json").read_text())
    names = {s["name"] for s in manifest["shards"]}
    assert {p.name for p in (files / "out").iterdir()} == names | {"manifest.json"}
    for s in manifest["shards"]:
        assert hashlib.sha256((files / "out" / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    assert manifest["num_samples"] == 20000 and _leftovers(files) == []
    print([rc for rc, _ in results])


# --------------------------------------------------------------------------------------------------
# Input files that lie about themselves


def test_a_mo_header_claiming_two_billion_strings_is_refused_at_once(files, tiny_model_dir, capsys):
    import signal
    import struct

    mo = files / "huge.mo"
    mo.write_bytes(struct.pack("<7I", 0x950412DE, 0, 2**31, 28, 28, 0, 0) + b"\0" * 100)

    def too_slow(*_):
        raise TimeoutError("the .mo header was believed")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        assert main(prepare_args(files, tiny_model_dir, "huge.mo")) == 2
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    line = error_line(capsys)
    assert line == (
        f"mlctl prepare: error: {files}/huge.mo: corrupt .mo header: it claims 2,147,483,648 strings, "
        "but their original-string table (8 bytes each from byte 28) runs past the end of the file "
        "(128 bytes)"
    ), line


# --------------------------------------------------------------------------------------------------
# Empty dictionaries, broken catalogs, malformed specs and config files


@pytest.mark.parametrize(
    "content, flag, expected",
    [
        ("", "--dictionary", "dictionary {f} has no entries (the file is empty)"),
        (
            "# words\n\n",
            "--dictionary",
            "dictionary {f} has no entries (its 2 line(s) are blank or comments)",
        ),
        ("", "--code-switch", "code-switch dictionary {f} has no entries (the file is empty)"),
    ],
)
def test_an_empty_dictionary_is_an_error_naming_it(files, tiny_model_dir, capsys, content, flag, expected):
    f = files / "nothing.tsv"
    f.write_text(content)
    args = prepare_args(files, tiny_model_dir, "pairs.tsv")
    if flag == "--dictionary":
        args[args.index("--dictionary") + 1] = str(f)
    else:
        args += ["--code-switch", f"zh={f}"]
    assert main(args) == 2
    assert error_line(capsys) == "mlctl prepare: error: " + expected.format(f=f)


def test_a_tmx_broken_midway_counts_every_unit_it_lost(tmp_path, caplog):
    units = [("Save", "Speichern"), ("Open", "Öffnen"), ("Close", "Schließen"), ("&nope;", "x")]
    units += [(f"Word {i}", f"Wort {i}") for i in range(100)]
    p = tmp_path / "broken.tmx"
    p.write_bytes(_tmx(units, "de", "utf-8"))
    pairs, skips = _read(p, "tmx")
    assert pairs == units[:3] and skips == {"malformed_xml": 101}  # the broken unit and the 100 after it
    assert f"skipped (malformed_xml) at {p}:6: undefined entity: line 6, column" in caplog.text
    assert "the file is not read past line 6: 101 unit(s) lost" in caplog.text
    # cut after its last unit: nothing lost, and the manifest still says the file was malformed
    p.write_bytes(_tmx(units[:3], "de", "utf-8")[: -len("</body></tmx>\n")])
    assert _read(p, "tmx") == (units[:3], {"malformed_xml": 0})


def test_a_po_syntax_error_skips_only_its_own_entry(tmp_path):
    po = tmp_path / "de.po"
    entries = {
        "unterminated msgid": 'msgid "Save\nmsgstr "Speichern"\n',
        "unknown keyword": 'msgid "Save"\nmsgtsr "Speichern"\n',
        "unterminated msgstr": 'msgid "Save"\nmsgstr "Speichern\n',
    }
    for broken in entries.values():
        po.write_text(
            f'msgid "Open"\nmsgstr "Öffnen"\n\n{broken}\nmsgid "Close"\nmsgstr "Schließen"\n\n'
            'msgid "Quit"\nmsgstr "Beenden"\n'
        )
        pairs, skips = _read(po, "po")
        assert pairs == [("Open", "Öffnen"), ("Close", "Schließen"), ("Quit", "Beenden")], broken
        assert skips == {"po_syntax": 1}


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("={d}", "code-switch dictionary '={d}' names no language before '='"),
        ("zh=", "code-switch dictionary 'zh=' names no file after '='"),
        ("en-={d}", "code-switch dictionary 'en-={d}': 'en-' is not a language code (TGT) or pair (SRC-TGT)"),
        ("{d}", "code-switch dictionary '{d}' names no language"),
    ],
)
def test_malformed_code_switch_specs_show_the_expected_form(files, tiny_model_dir, capsys, spec, expected):
    spec = spec.format(d=files / "dict.tsv")
    assert main([*prepare_args(files, tiny_model_dir, "pairs.tsv"), "--code-switch", spec]) == 2
    line = error_line(capsys)
    assert line == (
        "mlctl prepare: error: " + expected.format(d=files / "dict.tsv") + ": expected [SRC-]TGT=PATH, e.g. "
        "zh=dicts/en-zh.tsv"
    ), line


@pytest.mark.parametrize(
    "content, expected",
    [
        (
            b"Hello world\tHallo Welt\n",
            "config file {f} is not valid YAML at line 1, column 12: found character '\\t' that cannot start "
            "any token",
        ),
        (
            b"PK\x03\x04\x14\x00\x08\x08\x91\x00",
            "config file {f} is not a YAML text file: byte 0x91 at offset 8 is not UTF-8",
        ),
        (
            b"Hello world\n",
            "config file {f} must hold a mapping at the top level (sections such as model:, data:, train:), not a str",
        ),
    ],
)
@pytest.mark.parametrize("verb", ["train", "prepare"])
def test_a_config_file_that_is_not_yaml_is_named(files, capsys, verb, content, expected):
    f = files / "not-a-config"
    f.write_bytes(content)
    argv = ["train", "-c", str(f)] if verb == "train" else ["prepare", "--config", str(f)]
    assert main(argv) == 2
    assert error_line(capsys) == f"mlctl {verb}: error: " + expected.format(f=f)


# --------------------------------------------------------------------------------------------------
# `mlctl eval` and `mlctl export` on a run whose newest checkpoint is damaged (issue 21, item 10):
# the checkpoint is found as training finds it, a file that does not load is named, and an older
# complete checkpoint is used instead with a warning naming both.


@pytest.fixture(scope="module")
def written_runs(tmp_path_factory, tiny_model_dir):
    """``get(stage)``: a run folder with one complete DeepSpeed checkpoint (step 1), written once."""
    from run_fixture import make_run

    made: dict[int, Path] = {}

    def get(stage: int) -> Path:
        if stage not in made:
            made[stage] = make_run(tmp_path_factory.mktemp(f"run_zero{stage}"), tiny_model_dir, stage)
        return made[stage]

    return get


@pytest.fixture()
def a_run(tmp_path, written_runs):
    """``copy(stage, newest=2)``: a fresh copy of a run with checkpoints step 1 and (``newest``)
    step 2, ``latest`` naming the newest."""
    from run_fixture import add_step

    def copy(stage: int = 0, newest: int | None = 2) -> Path:
        run = tmp_path / f"run{stage}"
        shutil.copytree(written_runs(stage), run)
        if newest:
            add_step(run, newest)
        return run

    return copy


FIXTURE_PAIRS = Path(__file__).parent / "data" / "pairs.en-de.tsv"
STATES = "engine/state/mp_rank_00_model_states.pt"
SHARD = "engine/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _truncate(path: Path, size: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


# damage -> (ZeRO stage, what is done to the run, the checkpoint used, the warning)
DAMAGE = {
    "model states truncated": (
        0,
        lambda run, new: _truncate(new / STATES),
        "step_00000001",
        "cannot load step_00000002: {new}/" + STATES + ": truncated or not a torch file (1,000 bytes, "
        "no zip directory at its end); using {run}/checkpoints/step_00000001, the newest complete "
        "checkpoint before it",
    ),
    "ZeRO shard truncated": (
        1,
        lambda run, new: _truncate(new / SHARD),
        "step_00000001",
        "cannot load step_00000002: {new}/" + SHARD + ": truncated or not a torch file (1,000 bytes, "
        "no zip directory at its end); using {run}/checkpoints/step_00000001, the newest complete "
        "checkpoint before it",
    ),
    "model states deleted": (
        0,
        lambda run, new: (new / STATES).unlink(),
        "step_00000001",
        "{run}/checkpoints/latest names step_00000002, which is damaged: no DeepSpeed model state under "
        "{new}/engine/state; using {run}/checkpoints/step_00000001, the newest complete checkpoint",
    ),
    "meta.json unreadable": (
        0,
        lambda run, new: (new / "meta.json").write_bytes(b"\x00\xff{"),
        "step_00000001",
        "{run}/checkpoints/latest names step_00000002, which is damaged: meta.json is unreadable (",
    ),
    "latest names a missing folder": (
        0,
        lambda run, new: (run / "checkpoints" / "latest").write_text("step_00000003\n"),
        "step_00000002",
        "{run}/checkpoints/latest names step_00000003, which is damaged: the folder is missing; "
        "using {run}/checkpoints/step_00000002, the newest complete checkpoint",
    ),
}


@pytest.mark.slow  # a DeepSpeed checkpoint written by a child process
@pytest.mark.parametrize("verb", ["export", "eval"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(a_run, tmp_path, caplog, verb, damage):
    stage, harm, used, warning = DAMAGE[damage]
    run = a_run(stage)
    new = run / "checkpoints" / "step_00000002"
    harm(run, new)
    out = tmp_path / ("exported" if verb == "export" else "report.json")
    if verb == "export":
        argv = ["export", str(run), str(out)]
    else:
        argv = [
            "eval",
            "--model",
            str(run),
            "--pairs",
            str(FIXTURE_PAIRS),
            "--max-pairs",
            "20",
            "--out",
            str(out),
        ]
    assert main(argv) == 0
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and "step_0000000" in r.getMessage()
    ]
    assert len(warned) == 1 and warned[0].startswith(warning.format(run=run, new=new)), warned
    record = json.loads((out / "mlctl_export.json" if verb == "export" else out).read_text())
    assert record["checkpoint"] == used and record["step"] == int(used[-1])
    skipped = "step_00000003" if damage == "latest names a missing folder" else "step_00000002"
    assert skipped in " ".join(record["passed_over"])


@pytest.fixture(scope="module")
def wider_model(tmp_path_factory) -> Path:
    """Another tiny BERT (hidden size 48): what a run's config names when it was edited by mistake."""
    from tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny48"), hidden=48)


@pytest.mark.slow  # a DeepSpeed checkpoint written by a child process
def test_a_checkpoint_that_does_not_load_and_has_no_older_one_is_named(a_run, capsys):
    run = a_run(0, newest=None)
    _truncate(run / "checkpoints" / "step_00000001" / STATES)
    assert main(["export", str(run), str(run.parent / "exported")]) == 2
    assert error_line(capsys) == (
        f"mlctl export: error: {run}/checkpoints/step_00000001/{STATES}: truncated or not a torch file "
        "(1,000 bytes, no zip directory at its end)"
    )
    assert not (run.parent / "exported").exists()


@pytest.mark.slow  # a DeepSpeed checkpoint written by a child process
@pytest.mark.parametrize("verb", ["export", "eval"])
def test_a_named_checkpoint_is_never_substituted(a_run, capsys, verb):
    run = a_run(0)
    new = run / "checkpoints" / "step_00000002"

    def named(name: str) -> int:
        if verb == "export":
            return main(["export", str(run), str(run.parent / "exported"), "--checkpoint", name])
        return main(["eval", "--model", str(run), "--checkpoint", name, "--pairs", str(FIXTURE_PAIRS)])

    (new / "data_state_rank00000.json").unlink()
    assert named("step_00000002") == 2
    assert error_line(capsys) == (
        f"mlctl {verb}: error: checkpoint {new} is damaged: data state missing: data_state_rank00000.json; "
        "the newest complete one is step_00000001"
    )
    (new / "data_state_rank00000.json").write_text("{}")
    _truncate(new / STATES)
    assert named("step_00000002") == 2
    assert error_line(capsys) == (
        f"mlctl {verb}: error: {new}/{STATES}: truncated or not a torch file (1,000 bytes, no zip directory at its end)"
    )
    assert named("step_00000009") == 2
    assert error_line(capsys) == (
        f"mlctl {verb}: error: {run}/checkpoints/step_00000009: no such checkpoint "
        "(the run has: step_00000001, step_00000002)"
    )


@pytest.mark.slow  # a DeepSpeed checkpoint written by a child process
def test_a_checkpoint_of_another_model_is_named_with_what_differs(a_run, wider_model, capsys, caplog):
    run = a_run(0)
    config = run / "config.yaml"
    config.write_text(
        config.read_text().replace(
            str(Path(json.loads((run / "checkpoints" / "step_00000001" / "meta.json").read_text())["model"])),
            str(wider_model),
        )
    )
    assert main(["export", str(run), str(run.parent / "exported")]) == 2
    line = error_line(capsys)
    assert line.startswith(
        f"mlctl export: error: {run}/checkpoints/step_00000002/engine/state: checkpoint does not match "
        f"{wider_model} (model.name_or_path in {config}): "
    ), line
    assert "weight(s) of another shape (e.g. mlm.bert.embeddings.word_embeddings.weight: checkpoint " in line
    assert "model [" in line and line.endswith("; the older checkpoints failed too (see the warnings above)")
    assert "cannot load step_00000002" in caplog.text and "step_00000001, the newest complete" in caplog.text


def _fake_run(run: Path, model: Path, steps: tuple[int, ...] = (1,)) -> Path:
    """A run folder laid out as training leaves it, its checkpoints complete but without real
    weights: enough for every check made before a model load, and a loader to reach if not."""
    from mlctl.checkpoint import CheckpointDir, CheckpointMeta
    from mlctl.config import Config

    run.mkdir()
    cfg = Config()
    cfg.model.name_or_path = str(model)
    cfg.save(run / "config.yaml")
    ckpts = CheckpointDir(run)
    ckpts.root.mkdir()
    for step in steps:
        tmp = ckpts.prepare(step)
        (tmp / "engine" / "state").mkdir(parents=True)
        (tmp / STATES).write_bytes(b"weights")
        (tmp / "data_state_rank00000.json").write_text("{}")
        meta = dict(samples_seen=0, tokens_seen=0, restarts=0, tokenizer_hash="", manifest_hash="")
        ckpts.publish(
            step,
            CheckpointMeta(
                step=step, model=str(model), world_size=1, zero_stage=0, config_fingerprint="", **meta
            ),
        )
    return run


@pytest.mark.parametrize(
    "harm, expected",
    [
        (
            "all damaged",
            "run {run} has no complete checkpoint (step_00000002: meta.json is missing; "
            "step_00000001: meta.json is missing)",
        ),
        ("none yet", "run {run} has no checkpoint yet ({run}/checkpoints holds none)"),
    ],
)
@pytest.mark.parametrize("verb", ["export", "eval"])
def test_a_run_without_a_complete_checkpoint_is_refused_before_any_load(
    tmp_path, tiny_model_dir, capsys, no_model_load, verb, harm, expected
):
    run = _fake_run(tmp_path / "run", tiny_model_dir, steps=(1, 2) if harm == "all damaged" else ())
    for ckpt in run.glob("checkpoints/step_*"):
        (ckpt / "meta.json").unlink()
    argv = (
        ["export", str(run), str(run.parent / "x")]
        if verb == "export"
        else ["eval", "--model", str(run), "--pairs", str(FIXTURE_PAIRS)]
    )
    assert main(argv) == 2
    assert error_line(capsys) == f"mlctl {verb}: error: " + expected.format(run=run)


# --------------------------------------------------------------------------------------------------
# Every cheap check before the model load (item 10): the loader is never reached


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--pairs", "{files}/pairs.tsv", "--pairs", "{files}/empty.tsv"],
            "{files}/empty.tsv: no en<TAB>xx pairs in the file (0 lines skipped)",
        ),
        (
            ["--pairs", "{files}/pairs.tsv", "--pairs", "{files}/nope.tsv"],
            "pairs file not found: {files}/nope.tsv",
        ),
        (
            ["--pairs", "{files}/pairs.tsv", "--out", "{files}/afile/report.json"],
            "cannot write {files}/afile/report.json: {files}/afile is not a folder",
        ),
        (
            ["--pairs", "{files}/pairs.tsv", "--out", "{files}"],
            "{files} is a folder; give a file name for the report",
        ),
        (
            ["--pairs", "{files}/pairs.tsv", "--checkpoint", "step_00000001"],
            "--checkpoint step_00000001 needs a training run folder as --model; {model} is not one "
            "(it needs config.yaml and checkpoints/)",
        ),
        (["--pairs", "{files}/pairs.tsv", "--max-pairs", "0"], "--max-pairs must be >= 1, got 0"),
    ],
)
def test_eval_checks_its_inputs_before_loading_the_model(
    files, tiny_model_dir, capsys, no_model_load, args, expected
):
    argv = ["eval", "--model", str(tiny_model_dir), *[a.format(files=files) for a in args]]
    assert main(argv) == 2
    assert error_line(capsys) == "mlctl eval: error: " + expected.format(files=files, model=tiny_model_dir)


def test_eval_names_a_folder_that_is_neither_a_model_nor_a_run(files, capsys, no_model_load):
    (files / "somefolder").mkdir()
    assert main(["eval", "--model", str(files / "somefolder"), "--pairs", str(files / "pairs.tsv")]) == 2
    assert error_line(capsys) == (
        f"mlctl eval: error: {files}/somefolder is neither a model folder (no config.json) nor a training "
        "run folder (no config.yaml and checkpoints/)"
    )


@pytest.mark.parametrize(
    "out, expected",
    [
        ("busy", "{files}/busy exists and is not empty; choose a new folder"),
        ("afile", "{files}/afile exists and is not a folder; choose a new folder"),
        ("afile/exp", "cannot write {files}/afile/exp: {files}/afile is not a folder"),
    ],
)
def test_export_checks_its_output_before_loading_the_model(
    files, tiny_model_dir, capsys, no_model_load, out, expected
):
    (files / "busy").mkdir()
    (files / "busy" / "notes.txt").write_text("keep me")
    run = _fake_run(files / "run", tiny_model_dir)
    assert main(["export", str(run), str(files / out)]) == 2
    assert error_line(capsys) == "mlctl export: error: " + expected.format(files=files)
    assert (files / "busy" / "notes.txt").read_text() == "keep me"


def test_export_into_a_read_only_folder_is_refused_before_loading(
    tmp_path, tiny_model_dir, capsys, small_mount, no_model_load
):
    ro = small_mount("ro")
    assert main(["export", str(_fake_run(tmp_path / "run", tiny_model_dir)), str(ro / "exported")]) == 2
    assert error_line(capsys) == (
        f"mlctl export: error: cannot write {ro}/exported: {ro} is on a read-only file system"
    )


# --------------------------------------------------------------------------------------------------
# Quiet by default (item 10): the verb's own lines, not the libraries' loading chatter; -v shows all


def _cli(*argv: str, accelerator: str | None = "cpu") -> tuple[int, list[str]]:
    """``mlctl ARGV`` in a fresh interpreter; ``accelerator`` None: DS_ACCELERATOR unset, as outside
    `make`, so DeepSpeed detects the accelerator itself when it is first imported."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "PYTHONPATH": str(root), **({"DS_ACCELERATOR": accelerator} if accelerator else {})},
    )
    return proc.returncode, (proc.stdout + proc.stderr).replace("\r", "\n").splitlines()


NOISE = (
    "Loading weights",
    "LOAD REPORT",
    "Processing zero checkpoint",
    "Saving model to",
    "Writing model shards",
)


@pytest.mark.slow
@pytest.mark.parametrize("accelerator", ["cpu", None], ids=["DS_ACCELERATOR=cpu", "DS_ACCELERATOR-unset"])
def test_eval_and_export_print_their_own_lines_only(a_run, tmp_path, accelerator):
    run = a_run(1, newest=None)  # ZeRO 1: DeepSpeed rebuilds the fp32 weights, and says so at length
    pairs = ("--pairs", str(FIXTURE_PAIRS), "--max-pairs", "30")
    rc, lines = _cli("eval", "--model", str(run), *pairs, accelerator=accelerator)
    assert rc == 0 and len(lines) == 4, lines  # the model line and the table
    assert lines[0] == f"model: run {run}, checkpoint step_00000001 (step 1)  pool layers: [1, 2]"
    rc, lines = _cli("export", str(run), str(tmp_path / "exported"), accelerator=accelerator)
    assert rc == 0 and lines == [
        f"exported step_00000001 (step 1) of {run} to {tmp_path}/exported (pool layers [1, 2])"
    ], lines
    rc, lines = _cli("-v", "export", str(run), str(tmp_path / "again"), accelerator=accelerator)
    assert rc == 0 and all(any(n in line for line in lines) for n in NOISE[:3]), lines
