"""The cached step on CUDA (mlctl.gradcache): dropout draws from the device's generator there, and the
replay of each chunk's CUDA random state makes the cached step equal the plain step run chunk by
chunk (tests/test_gradcache.py shows the CPU generator's replay and everything else on the CPU)."""

from __future__ import annotations

import pytest
import torch
from test_gradcache import PAIRS, _cfg, make_batch, tiny_model, worst

from mlctl.gradcache import cached_backward, split_batch
from mlctl.losses import contrastive_terms
from mlctl.model import EncoderOutput, mask_tokens

# float32 on CUDA with TF32 off; the two steps add the same terms in another order (and the flash
# kernels' backward is not bitwise deterministic): ~1e-6 of each tensor's scale. Without the replay
# the masks differ and so do the gradients, at 1e-1 and more.
TOL = 1e-4


def _run(model, calls, terms, weight, cached: bool):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)  # seeds the CUDA generator too
    if cached:
        cached_backward(model, lambda loss, last: loss.backward(), calls, terms, weight)
    else:
        outs = [model(c) for c in calls]

        def whole(parts):
            halves = [(p[: p.shape[0] // 2], p[p.shape[0] // 2 :]) for p in parts]
            return torch.cat([x for x, _ in halves] + [y for _, y in halves])

        out = EncoderOutput(whole([o.sentence for o in outs]), whole([o.fused for o in outs]), None)
        cl, _, _ = terms(out)
        (cl + weight * sum(o.mlm_loss for o in outs)).backward()
    return {n: p.grad.detach().cpu().double() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["jagged", "grid"])
def test_cuda_dropout_is_replayed(attention, tiny_model_dir, tiny_tokenizer, monkeypatch):
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda", 0)
    cfg = _cfg("mlm")
    model = tiny_model(tiny_model_dir, cfg, torch.float32).to(device).train()
    model.attention = attention
    batch = make_batch(tiny_tokenizer, PAIRS)
    special = torch.tensor(sorted(set(tiny_tokenizer.all_special_ids)))
    gen = torch.Generator().manual_seed(0)
    ids, labels = mask_tokens(
        batch["input_ids"],
        batch["attention_mask"],
        special,
        tiny_tokenizer.mask_token_id,
        100,
        0.3,
        generator=gen,
    )
    calls = [
        c.to(device)
        for c in split_batch(batch["input_ids"], batch["attention_mask"], 5, batch["spans"], ids, labels)
    ]
    anchored = batch["anchored"].to(device)

    def terms(out):
        return contrastive_terms(cfg, out, anchored, 0, 1)

    weight = cfg.loss.mlm_weight
    reference = _run(model, calls, terms, weight, cached=False)
    assert worst(reference, _run(model, calls, terms, weight, cached=True)) < TOL
    # the CPU generator alone replayed: the device's masks differ
    monkeypatch.setattr("mlctl.gradcache.set_rng_state", lambda state, dev: torch.set_rng_state(state[0]))
    assert worst(reference, _run(model, calls, terms, weight, cached=True)) > 1e-2
