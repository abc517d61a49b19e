"""The packed (unpadded) encoder path against the transformers forward over the padded batch."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from mlctl import packed
from mlctl.model import EncoderInputs, MLCTLModel, mask_tokens

VOCAB, SPECIAL = 120, torch.tensor([0, 1, 2, 3])  # pad/cls/sep/unk-like ids never masked
MASK_ID = 4


def _tiny(arch: str, layers: int):
    """A random tiny ``{arch}ForMaskedLM``; RoBERTa's positions start after its padding id (1)."""
    import transformers

    config = getattr(transformers, f"{arch}Config")(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=72,
        pad_token_id={"Bert": 0, "Roberta": 1}[arch],
    )
    return getattr(transformers, f"{arch}ForMaskedLM")(config)


_bert = partial(_tiny, "Bert", 3)
_roberta = partial(_tiny, "Roberta", 2)


def _pair(make, layers=(1, -1), attention="grid"):
    """The same weights twice: the packed path and the padded transformers forward."""
    torch.manual_seed(0)
    mlm = make()
    fast = MLCTLModel(mlm, list(layers), unpad=True, attention=attention)
    slow = MLCTLModel(make(), list(layers), unpad=False)
    slow.load_state_dict(fast.state_dict())
    assert fast.unpad and not slow.unpad
    return fast, slow


def _batch(rows=6, length=14, pad=0, seed=0):
    """Right-padded rows of different lengths (one uses the whole width); x rows first."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (rows, length), generator=g)
    lengths = torch.randint(3, length, (rows,), generator=g)
    lengths[2] = length
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids[:, 0] = 2
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    spans = torch.stack([torch.ones(rows, dtype=torch.long), torch.minimum(lengths - 1, torch.tensor(3))], 1)
    mlm_ids, labels = mask_tokens(ids, mask, SPECIAL, MASK_ID, VOCAB, 0.3, generator=g)
    return ids, mask, spans, mlm_ids, labels


def _no_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


ATTENTION = pytest.mark.parametrize("attention", ["grid", "jagged"])


@ATTENTION
@pytest.mark.parametrize("make,pad", [(_bert, 0), (_roberta, 1)], ids=["bert", "roberta"])
def test_packed_forward_matches_the_padded_forward(make, pad, attention):
    fast, slow = _pair(make, attention=attention)
    fast.eval(), slow.eval()
    batch = _batch(pad=pad)
    with torch.no_grad():
        a, b = fast(EncoderInputs.build(*batch)), slow(EncoderInputs.build(*batch))
    torch.testing.assert_close(a.sentence, b.sentence, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.fused, b.fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.mlm_loss, b.mlm_loss, rtol=1e-5, atol=1e-6)
    # Without the MLM copy and without anchors too.
    with torch.no_grad():
        a, b = fast(EncoderInputs.build(*batch[:2])), slow(EncoderInputs.build(*batch[:2]))
    torch.testing.assert_close(a.sentence, b.sentence, rtol=1e-5, atol=1e-6)
    assert a.mlm_loss is None and a.fused is None


@ATTENTION
def test_left_padding_and_empty_rows(attention):
    fast, slow = _pair(_bert, attention=attention)
    fast.eval(), slow.eval()
    ids, mask, *_ = _batch()
    width = ids.shape[1]
    left_ids = torch.stack([row.roll(width - int(n)) for row, n in zip(ids, mask.sum(1), strict=True)])
    left_mask = mask.flip(1)
    assert torch.equal(left_ids[left_mask.bool()], ids[mask.bool()])
    with torch.no_grad():
        a, b = fast(EncoderInputs.build(left_ids, left_mask)), slow(EncoderInputs.build(left_ids, left_mask))
    torch.testing.assert_close(a.sentence, b.sentence, rtol=1e-5, atol=1e-6)
    # An all-padding row gives zeros, not NaN, and leaves the other rows alone.
    left_mask[1] = 0
    with torch.no_grad():
        c = fast(EncoderInputs.build(left_ids, left_mask))
    assert torch.isfinite(c.sentence).all() and not c.sentence[1].any()
    torch.testing.assert_close(c.sentence[2:], a.sentence[2:])


@ATTENTION
@pytest.mark.parametrize("make,pad", [(_bert, 0), (_roberta, 1)], ids=["bert", "roberta"])
def test_packed_gradients_match_the_padded_forward(make, pad, attention):
    fast, slow = _pair(make, attention=attention)
    grads = []
    for model in (fast, slow):
        model.train()
        _no_dropout(model)
        out = model(EncoderInputs.build(*_batch(pad=pad)))
        (out.fused.square().sum() + out.sentence.sum() + out.mlm_loss).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    scale = max(float(g.abs().max()) for g in grads[1].values())
    for name, g in grads[1].items():
        # (The key bias has a zero gradient in exact arithmetic: softmax ignores a per-query
        # constant. Both paths give rounding noise there, hence the absolute scale.)
        torch.testing.assert_close(grads[0][name], g, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_the_last_layer_runs_only_where_kept():
    fast, _ = _pair(_bert)
    fast.eval()
    ids, mask, *_ = _batch()
    with torch.no_grad():
        full, packing = packed.hidden_states(fast.encoder, ids, mask)
        keep = torch.tensor([0, 3, 7, len(packing.index) - 1])
        part, _ = packed.hidden_states(fast.encoder, ids, mask, keep_last=keep)
    assert part[-1].shape == (4, 32) and full[-1].shape == (int(mask.sum()), 32)
    torch.testing.assert_close(part[-1], full[-1][keep], rtol=1e-5, atol=1e-6)
    for a, b in zip(part[:-1], full[:-1], strict=True):
        assert torch.equal(a, b)


def test_packing_round_trip_and_padding_ignored():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    p = packed.Packing.of(mask)
    assert p.index.tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    grid = torch.arange(12.0).view(3, 4, 1)
    back = p.unpack(p.pack(grid))
    assert torch.equal(back.squeeze(-1), grid.squeeze(-1) * mask)
    # Whatever sits at padded positions cannot change the real tokens' states.
    fast, _ = _pair(_bert)
    fast.eval()
    ids, mask, *_ = _batch()
    noisy = torch.where(mask.bool(), ids, torch.randint(5, VOCAB, ids.shape))
    with torch.no_grad():
        a, _ = packed.hidden_states(fast.encoder, ids, mask)
        b, _ = packed.hidden_states(fast.encoder, noisy, mask)
    assert torch.equal(a[-1], b[-1])


def test_other_architectures_fall_back_to_the_padded_forward(caplog):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    mlm = DistilBertForMaskedLM(
        DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    )
    with caplog.at_level("INFO", logger="mlctl.model"):
        model = MLCTLModel(mlm, [1, -1], unpad=True).eval()
    assert not model.unpad
    assert "DistilBertModel is not one of" in caplog.text
    ids, mask, *_ = _batch()
    with torch.no_grad():
        out = model(EncoderInputs.build(ids, mask))
    assert out.sentence.shape == (6, 32) and torch.isfinite(out.sentence).all()


def test_attention_choice():
    p = packed.Packing.of(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert (p.min_len, p.max_len, p.offsets.tolist()) == (2, 3, [0, 2, 5])
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert packed.resolve_attention("auto", cuda, p) == "jagged"
    assert packed.resolve_attention("auto", cpu, p) == "grid"
    assert packed.resolve_attention("jagged", cpu, p) == "jagged"
    # a row without tokens has no place in the variable-length kernels
    empty = packed.Packing.of(torch.tensor([[1, 1, 0], [0, 0, 0]]))
    assert packed.resolve_attention("jagged", cuda, empty) == "grid"
