"""Bad input to every verb ends in one clear line naming the file and what is wrong (exit 2), or in
a counted skip; never a traceback. Training-time cases (waiting for CPUs) are in test_output.py."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from mlctl.cli import main


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


def test_prepare_counts_a_wrong_encoding_and_goes_on(files, tiny_model_dir):
    assert main(prepare_args(files, tiny_model_dir, "latin1.tsv")) == 0
    counts = json.loads((files / "out" / "manifest.json").read_text())["counts"]
    assert counts["read"] == 1 and counts["dropped"]["invalid_utf8"] == 1


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


def test_eval_skips_and_counts_lines_in_another_encoding(files):
    from mlctl.evaluate import read_pair_file

    pf = read_pair_file(files / "latin1.tsv")
    assert pf.pairs == [("Hello world", "Hallo Welt")]
    assert pf.reasons == {"not UTF-8": 1}


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["export", "{files}/norun", "{files}/exp"], "{files}/norun is not a run folder"),
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
