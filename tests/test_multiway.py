"""Multiway corpora without false negatives: source-sentence ids from `mlctl prepare`, a global
shuffle, ids through collate, and the loss masking every negative that shares the anchor's id (one
process and a real 2-rank gloo group)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ranks import run_ranks

from mlctl.config import PrepareConfig, PrepareInput
from mlctl.data.clean import normalize
from mlctl.data.collate import source_id_int
from mlctl.data.dataset import ShardLoader
from mlctl.data.prepare import prepare, source_id
from mlctl.data.readers import Counts, read_multiway
from mlctl.losses import _loss_rows, contrastive_loss

LANGS = ("ar", "es", "fr", "ru", "zh")  # with en: the paper's 6-way UN corpus
TEMP = 0.1


def _six_way(folder: Path, lines: int) -> Path:
    """A 6-way folder: line k of every file is a translation of English line k."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.en").write_text("".join(f"the house number {k} is red\n" for k in range(lines)))
    for lang in LANGS:
        (folder / f"corpus.{lang}").write_text("".join(f"{lang} maison {k} rouge\n" for k in range(lines)))
    return folder


def _fixture_batch(tmp_path: Path, lines: int = 4, dim: int = 8):
    """Every pair of a 6-way folder (lines x 5) with ids computed as prepare + collate do, and
    embeddings where translations of one sentence sit close together (so masking matters)."""
    pairs = list(read_multiway(_six_way(tmp_path / "mw", lines), "en", "", Counts()))
    assert len(pairs) == lines * len(LANGS)
    sids = torch.tensor([source_id_int({"sid": source_id(normalize(p.src))}) for p in pairs])
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(lines, dim, generator=g, dtype=torch.float64)
    line = torch.tensor([int(p.src.split()[3]) for p in pairs])
    x = centre[line] + 0.3 * torch.randn(len(pairs), dim, generator=g, dtype=torch.float64)
    y = centre[line] + 0.3 * torch.randn(len(pairs), dim, generator=g, dtype=torch.float64)
    perm = torch.randperm(len(pairs), generator=g)  # the order the global shuffle would give
    return x[perm], y[perm], sids[perm]


def _reference(x, y, sids, cross_zero: bool, same_lang: bool) -> float:
    """Anchor by anchor in numpy: the negatives are exactly the rows of other source ids."""
    x, y, s = x.numpy(), y.numpy(), sids.numpy()
    n = len(s)

    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) / TEMP

    total = 0.0
    for anchors, others in ((x, y), (y, x)):
        for i in range(n):
            p = cos(anchors[i], others[i])
            negs = [j for j in range(n) if s[j] != s[i]]
            terms = [cos(anchors[i], others[j]) for j in negs]
            if same_lang:
                terms += [cos(anchors[i], anchors[j]) for j in negs]
            if not terms:
                continue  # nothing to contrast: 0
            if not cross_zero:
                terms.append(p)
            m = max(terms)
            total += m + math.log(sum(math.exp(t - m) for t in terms)) - p
    return total / (2 * n)


@pytest.mark.parametrize("cross_zero", [True, False], ids=["cz_nce", "info_nce"])
@pytest.mark.parametrize("same_lang", [True, False])
def test_masked_loss_matches_reference(tmp_path, cross_zero, same_lang):
    x, y, sids = _fixture_batch(tmp_path)
    got = contrastive_loss(
        x, y, TEMP, cross_zero=cross_zero, same_language_negatives=same_lang, source_ids=sids
    )
    assert abs(got.item() - _reference(x, y, sids, cross_zero, same_lang)) < 1e-9
    unmasked = contrastive_loss(x, y, TEMP, cross_zero=cross_zero, same_language_negatives=same_lang)
    assert abs(got.item() - unmasked.item()) > 1e-3  # the fixture does have false negatives


def test_no_negative_with_the_same_source_id_survives(tmp_path):
    """Each anchor's loss has zero gradient with respect to every other row of its source id."""
    x, y, sids = _fixture_batch(tmp_path)
    x.requires_grad_(True)
    y.requires_grad_(True)
    per_anchor = _loss_rows(x, x, y, 0, TEMP, True, True, sids, sids)  # anchors x_i
    same = sids[:, None] == sids[None, :]
    assert int(same.sum()) == len(sids) * len(LANGS)  # 5 rows per source sentence, itself included
    for i in range(len(sids)):
        gx, gy = torch.autograd.grad(per_anchor[i], (x, y), retain_graph=True)
        others = same[i].clone()
        others[i] = False
        assert others.any()
        assert torch.all(gx[others] == 0) and torch.all(gy[others] == 0)
        assert gy[i].abs().sum() > 0  # the positive is kept
        assert gy[~same[i]].abs().sum() > 0 and gx[~same[i]].abs().sum() > 0  # real negatives kept


def test_distinct_ids_give_the_unmasked_loss_and_all_same_gives_zero(tmp_path):
    x, y, _ = _fixture_batch(tmp_path)
    distinct = torch.arange(len(x)) * 7919 - 3
    for cz in (True, False):
        assert torch.equal(
            contrastive_loss(x, y, TEMP, cross_zero=cz, source_ids=distinct),
            contrastive_loss(x, y, TEMP, cross_zero=cz),
        )
    same = torch.zeros(len(x), dtype=torch.int64)
    assert contrastive_loss(x, y, TEMP, source_ids=same).item() == 0.0


def _rank(rank: int, world: int, tmp: str) -> dict:
    x, y, sids = _fixture_batch(Path(tmp) / f"r{rank}")  # the same global batch on both ranks
    b = len(x) // world
    rows = slice(rank * b, (rank + 1) * b)
    xr = x[rows].clone().requires_grad_(True)
    yr = y[rows].clone().requires_grad_(True)
    loss = contrastive_loss(xr, yr, TEMP, rank=rank, world_size=world, source_ids=sids[rows])
    loss.backward()
    return {"loss": loss.item(), "gx": xr.grad, "gy": yr.grad}


@pytest.mark.slow
def test_gathered_two_ranks_equal_single_process(tmp_path):
    res = run_ranks(_rank, 2, str(tmp_path))
    x, y, sids = _fixture_batch(tmp_path / "single")
    x.requires_grad_(True)
    y.requires_grad_(True)
    single = contrastive_loss(x, y, TEMP, source_ids=sids)
    single.backward()
    assert abs((res[0]["loss"] + res[1]["loss"]) / 2 - single.item()) < 1e-12
    # the gathered gradients are N = 2 times the single-process gradient (see losses.py)
    gx = torch.cat([res[0]["gx"], res[1]["gx"]]).double()
    gy = torch.cat([res[0]["gy"], res[1]["gy"]]).double()
    assert torch.allclose(gx, 2 * x.grad, atol=1e-12) and torch.allclose(gy, 2 * y.grad, atol=1e-12)
    same = sids[:, None] == sids[None, :]
    assert bool((same[:10, 10:]).any())  # some source sentences do span both ranks


def test_prepare_gives_ids_and_shuffles_globally(tmp_path, tiny_model_dir):
    lines = 40
    cfg = PrepareConfig(
        inputs=[PrepareInput(str(_six_way(tmp_path / "mw", lines)), "multiway", "en", "")],
        out=str(tmp_path / "out"),
        samples_per_shard=50,
        keep_no_anchor=True,
        seed=3,
    )
    m = prepare(cfg, str(tiny_model_dir))
    assert m["num_samples"] == lines * len(LANGS) and m["seed"] == 3
    lo = ShardLoader(tmp_path / "out", batch_size=lines * len(LANGS), shuffle_buffer=1)
    batch = next(iter(lo))
    lo.close()
    # ids: the 5 translations of one English line share one, different lines never do
    by_line: dict[int, set] = {}
    for sid, i in zip(batch["source_ids"].tolist(), range(len(batch["pair_ids"])), strict=True):
        line = int(batch["pair_ids"][i].rsplit("-", 1)[1]) // len(LANGS)  # keys in input order
        by_line.setdefault(line, set()).add(sid)
    assert len(by_line) == lines and all(len(v) == 1 for v in by_line.values())
    assert len({next(iter(v)) for v in by_line.values()}) == lines
    # the shards hold a global shuffle: far fewer same-sentence neighbours than read_multiway wrote
    order = [rec for shard in m["shards"] for rec in _keys(tmp_path / "out" / shard["name"])]
    lines_in_order = [int(k.rsplit("-", 1)[1]) // len(LANGS) for k in order]
    neighbours = sum(a == b for a, b in zip(lines_in_order[:-1], lines_in_order[1:], strict=True))
    assert neighbours < 0.2 * (lines * (len(LANGS) - 1))
    again = prepare(cfg, str(tiny_model_dir))  # deterministic from the seed
    assert again["shards"] == m["shards"]
    cfg.seed = 4
    assert prepare(cfg, str(tiny_model_dir))["shards"] != m["shards"]


def _keys(path: Path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return [m.name.split(".")[0] for m in tar if m.name.endswith(".json")]
