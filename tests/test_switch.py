"""Code-switching: prepare lists switchable source words, the loader swaps them for translations,
deterministically, resumably, never touching the anchor and never past max_tokens."""

from __future__ import annotations

import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mlctl.config import ConfigError, load_config
from mlctl.data.dataset import ShardLoader
from mlctl.data.prepare import prepare
from mlctl.data.readers import InputError
from mlctl.data.switch import apply_switch

DATA = Path(__file__).resolve().parent / "data"
B = 8


def _records(out: Path) -> list[dict]:
    recs = []
    for tar in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if m.name.endswith(".json"):
                    recs.append(json.loads(t.extractfile(m).read()))
    return recs


@pytest.fixture(scope="module")
def switch_shards(tmp_path_factory, tiny_model_dir) -> Path:
    """The fixture catalogs with German and Spanish word lists as code-switch dictionaries."""
    from mlctl.config import PrepareConfig, PrepareInput

    out = tmp_path_factory.mktemp("switch_shards")
    langs = ("de", "fr", "es")
    cfg = PrepareConfig(
        inputs=[PrepareInput(str(DATA / f"pairs.en-{lang}.tsv"), "tsv", "en", lang) for lang in langs],
        dictionaries=[f"{lang}={DATA / f'dict.en-{lang}.tsv'}" for lang in langs],
        code_switch=[f"de={DATA / 'dict.en-de.tsv'}", f"es={DATA / 'dict.en-es.tsv'}"],
        out=str(out),
        samples_per_shard=50,
        max_tokens=40,
        truncate=True,
    )
    prepare(cfg, str(tiny_model_dir))
    return out


def test_apply_switch_spans_keep_and_cap():
    row = np.array([101, 5, 6, 7, 8, 9, 102], dtype=np.int32)
    cands = [[1, 1, [[[50, 51]]]], [3, 4, [[[60]]]], [5, 5, [[[70, 71, 72]]]]]
    rng = np.random.default_rng(0)
    out, n, shift = apply_switch(row, cands, 1.0, rng, keep=(3, 4), max_tokens=64)
    # the anchor (tokens 3-4) is never switched; the word before it grew by one token
    assert n == 2 and shift == 1
    assert out.tolist() == [101, 50, 51, 6, 7, 8, 70, 71, 72, 102]
    assert out[3 + shift : 4 + shift + 1].tolist() == [7, 8]
    # a cap of 8 tokens: the first two switches fit (+1, then -1), the third (+2) would not
    out, n, _ = apply_switch(row, cands, 1.0, np.random.default_rng(0), keep=None, max_tokens=8)
    assert n == 2 and out.tolist() == [101, 50, 51, 6, 60, 9, 102] and len(out) <= 8
    out, n, shift = apply_switch(row, cands, 0.0, np.random.default_rng(0), keep=None, max_tokens=64)
    assert n == 0 and out is row


def test_prepare_lists_switchable_words(switch_shards, tiny_tokenizer):
    m = json.loads((switch_shards / "manifest.json").read_text())
    assert set(m["code_switch"]) == {"en-de", "en-es"}
    assert m["code_switch"]["en-de"]["entries"] > 0
    assert 0 < m["switch_pair_coverage"] <= 1 and m["switch_words_per_pair"] > 0
    recs = _records(switch_shards)
    listed = [r for r in recs if r.get("switch")]
    assert len(listed) == round(m["switch_pair_coverage"] * len(recs))
    de = {}
    for line in (DATA / "dict.en-de.tsv").read_text(encoding="utf-8").splitlines():
        if "\t" in line and not line.startswith("#"):
            en, xx = line.split("\t")[:2]
            de.setdefault(en.strip().lower(), set()).add(xx.strip().lower())
    checked = 0
    for r in listed:
        ids = tiny_tokenizer(r["src"], add_special_tokens=True)["input_ids"]
        for first, last, options in r["switch"]:
            word = tiny_tokenizer.decode(ids[first : last + 1]).replace(" ", "").lower()
            if word in de:  # the listed span is the dictionary word, its options its translations
                wanted = {tuple(tiny_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in de[word]}
                assert any({tuple(o) for o in grp} <= wanted for grp in options)
                checked += 1
    assert checked > 10


def test_loader_switches_words_deterministically(switch_shards):
    plain = ShardLoader(switch_shards, batch_size=B, shuffle_buffer=16)
    on = ShardLoader(switch_shards, batch_size=B, shuffle_buffer=16, code_switch=1.0)
    again = ShardLoader(switch_shards, batch_size=B, shuffle_buffer=16, code_switch=1.0)
    switched = 0
    for p, s, s2 in itertools.islice(zip(plain, on, again, strict=True), 12):
        assert p["pair_ids"] == s["pair_ids"]  # same pairs, same order: only source words change
        assert all(np.array_equal(a, b) for a, b in zip(s["input_ids"], s2["input_ids"], strict=True))
        assert s["switched_words"] == s2["switched_words"]
        switched += s["switched_words"]
        # targets untouched; every anchor still covers the same tokens after the switch
        assert np.array_equal(p["input_ids"][B:, :], _pad(s["input_ids"][B:, :], p["input_ids"].shape[1]))
        for i in range(B):
            (a0, a1), (b0, b1) = p["spans"][i].tolist(), s["spans"][i].tolist()
            assert p["input_ids"][i, a0 : a1 + 1].tolist() == s["input_ids"][i, b0 : b1 + 1].tolist()
        assert int(s["attention_mask"].sum(1).max()) <= 40  # the shards' max_tokens
    assert switched > 0
    fresh = [ShardLoader(switch_shards, batch_size=B, shuffle_buffer=16) for _ in range(2)]
    for p, s in itertools.islice(zip(*fresh, strict=True), 3):
        assert p["input_ids"].equal(s["input_ids"]) and s["switched_words"] == 0  # code_switch 0: plain


def test_switch_anchors_when_no_word_term_reads_them(switch_shards):
    kw = dict(batch_size=B, shuffle_buffer=16, code_switch=1.0)
    kept = sum(b["switched_words"] for b in itertools.islice(ShardLoader(switch_shards, **kw), 12))
    free = ShardLoader(switch_shards, switch_anchors=True, **kw)
    total = 0
    for b in itertools.islice(free, 12):
        total += b["switched_words"]
        rows = b["attention_mask"].sum(1)
        for i in range(2 * B):  # spans stay inside their row (whole side where an anchor was switched)
            assert 0 <= b["spans"][i, 0] <= b["spans"][i, 1] < rows[i]
    assert total > kept  # anchor words are switched too


def _pad(x, width):
    import torch

    return torch.nn.functional.pad(x, (0, width - x.shape[1]))[:, :width]


def test_switched_stream_resumes_exactly(switch_shards):
    kw = dict(batch_size=B, shuffle_buffer=16, code_switch=0.5)
    ref = [b["input_ids"] for b in itertools.islice(ShardLoader(switch_shards, **kw), 40)]  # past an epoch
    first = ShardLoader(switch_shards, **kw)
    it = iter(first)
    for _ in range(17):
        next(it)
    state = first.state_dict()
    resumed = ShardLoader(switch_shards, **kw)
    resumed.load_state_dict(state)
    for want, got in zip(ref[17:], itertools.islice(resumed, 23), strict=True):
        assert want.equal(got["input_ids"])


def test_switch_errors(tiny_shards, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="prepared without code-switch"):
        ShardLoader(tiny_shards, batch_size=B, code_switch=0.3)
    with pytest.raises(ValueError, match=r"probability in \[0, 1\]"):
        ShardLoader(tiny_shards, batch_size=B, code_switch=1.5)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  code_switch: 2\n")
    with pytest.raises(ConfigError, match="data.code_switch"):
        load_config(str(cfg))
    from mlctl.config import PrepareConfig, PrepareInput

    base = dict(
        inputs=[PrepareInput(str(DATA / "pairs.en-de.tsv"), "tsv", "en", "de")],
        out=str(tmp_path / "o"),
        keep_no_anchor=True,
    )
    with pytest.raises(InputError, match="TGT=PATH"):
        prepare(PrepareConfig(**base, code_switch=[str(DATA / "dict.en-es.tsv")]), str(tiny_model_dir))
    with pytest.raises(InputError, match="not found"):
        prepare(PrepareConfig(**base, code_switch=[f"es={tmp_path / 'none.tsv'}"]), str(tiny_model_dir))
    with pytest.raises(InputError, match="nothing could be switched"):
        prepare(PrepareConfig(**base, code_switch=[f"fr-es={DATA / 'dict.en-es.tsv'}"]), str(tiny_model_dir))
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_cli_flag_and_word_lists(tiny_model_dir, tmp_path):
    """`mlctl prepare --code-switch` with the paper's word-list folder format."""
    from launcher.cli import main as cli_main

    out = tmp_path / "cs"
    rc = cli_main(
        [
            "prepare",
            "--input", f"{DATA / 'pairs.en-de.tsv'}:tsv:en-de",
            "--dictionary", f"de={DATA / 'dict.en-de.tsv'}",
            "--code-switch", f"de={DATA / 'usual-words'}",
            "--tokenizer", str(tiny_model_dir),
            "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["code_switch"]["en-de"]["sources"] == [str(DATA / "usual-words")]
    assert m["switch_pair_coverage"] > 0


def test_switch_is_the_same_with_loader_workers_and_ranks(switch_shards):
    """The draw hangs on (seed, epoch, pair id) alone: worker processes and the rank split change
    which consumer reads a pair, never how it is switched."""

    def rows(batches) -> dict[str, list[int]]:
        out = {}
        for b in batches:
            lens = b["attention_mask"].sum(1)
            for i, pid in enumerate(b["pair_ids"]):
                out[pid] = b["input_ids"][i, : lens[i]].tolist()
        return out

    kw = dict(batch_size=B, shuffle_buffer=16, code_switch=0.5)
    one = rows(itertools.islice(ShardLoader(switch_shards, **kw), 10))
    two = rows(itertools.islice(ShardLoader(switch_shards, num_workers=2, **kw), 10))
    split = {}
    for r in range(2):
        split.update(rows(itertools.islice(ShardLoader(switch_shards, rank=r, world_size=2, **kw), 5)))
    assert len(one) == 10 * B
    plain = rows(itertools.islice(ShardLoader(switch_shards, batch_size=B, shuffle_buffer=16), 10))
    assert sum(one[k] != plain[k] for k in one) > B  # what is compared below is switched
    for other in (two, split):
        common = set(one) & set(other)
        assert len(common) > B
        assert all(one[k] == other[k] for k in common)
