"""bf16 training keeps its gradient reductions in fp32 (mlctl.deepspeed_setup.deepspeed_config).

With ``bf16.enabled`` alone, DeepSpeed 0.19 accumulates gradients and all-reduces / reduce-scatters
them in bf16. The config mlctl emits asks for fp32 accumulation (ZeRO >= 1) and fp32
communication; the two-rank test checks what DeepSpeed then does on a real gloo group: the reduced
gradient equals the fp32 mean of the ranks' bf16 gradients, and differs from a bf16 mean.
"""

from __future__ import annotations

import pytest
import torch
from ranks import run_ranks

from mlctl.config import load_config
from mlctl.deepspeed_setup import deepspeed_config


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_config_reduces_in_fp32(stage):
    ds = deepspeed_config(_cfg("deepspeed.precision=bf16", f"deepspeed.zero_stage={stage}"), world_size=8)
    assert ds["bf16"] == {"enabled": True}
    assert ds["communication_data_type"] == "fp32"
    # fp32 accumulation is ZeRO >= 1 only in DeepSpeed 0.19 (ZeRO-0 raises "unsupported mix")
    assert ds.get("data_types") == ({"grad_accum_dtype": "fp32"} if stage >= 1 else None)


def test_fp32_config_leaves_the_defaults():
    ds = deepspeed_config(_cfg(), world_size=2)
    assert "communication_data_type" not in ds and "data_types" not in ds
    # deepspeed.extra still has the last word
    ds = deepspeed_config(
        _cfg("deepspeed.precision=bf16", 'deepspeed.extra={"communication_data_type": "bf16"}'), 2
    )
    assert ds["communication_data_type"] == "bf16"


def _rank(rank: int, world: int, model_dir: str, stage: int) -> dict:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from mlctl.hub import load_tokenizer
    from mlctl.losses import contrastive_loss
    from mlctl.model import EncoderInputs, MLCTLModel

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = _cfg(
        f"model.name_or_path={model_dir}",
        "deepspeed.precision=bf16",
        f"deepspeed.zero_stage={stage}",
        "data.batch_size=4",
        "train.grad_clip=0",
    )
    tok = load_tokenizer(model_dir)
    texts = [
        ["Save the file", "Delete this user", "Open a new window", "Close all tabs"],
        ["Datei speichern", "Diesen Benutzer löschen", "Ein neues Fenster", "Alle Tabs schließen"],
        ["Add a group", "Remove the page", "Show more", "Edit the post"],
        ["Gruppe hinzufügen", "Seite entfernen", "Mehr anzeigen", "Beitrag bearbeiten"],
    ]
    enc = tok(texts[2 * rank] + texts[2 * rank + 1], padding=True, return_tensors="pt")
    inputs = EncoderInputs.build(enc["input_ids"], enc["attention_mask"])

    def local_loss(model) -> torch.Tensor:
        s = model(inputs).sentence
        # each rank's own loss (no gather): what is under test is the reduction of its gradients
        return contrastive_loss(s[:4], s[4:], 0.05)

    torch.manual_seed(0)
    base = MLCTLModel.from_pretrained(model_dir).eval()  # eval: no dropout, same graph twice
    plain = MLCTLModel.from_pretrained(model_dir).eval().to(torch.bfloat16)
    plain.load_state_dict(base.state_dict())
    local_loss(plain).backward()
    mine = {n: p.grad.float() for n, p in plain.named_parameters() if p.grad is not None}

    engine, *_ = deepspeed.initialize(
        model=base,
        optimizer=torch.optim.SGD(base.parameters(), lr=0.0),
        config=deepspeed_config(cfg, world),
    )
    engine.eval()
    engine.backward(local_loss(engine))
    reduced = {}
    for name, p in engine.module.named_parameters():
        g = safe_get_full_grad(p)
        if g is not None and name in mine:
            reduced[name] = g.float().clone()
    # The same bf16 gradients of every rank, reduced two ways here.
    names = sorted(reduced)
    flat = torch.cat([mine[n].reshape(-1) for n in names])
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat)
    return {
        "reduced": torch.cat([reduced[n].reshape(-1) for n in names]),
        "fp32_mean": torch.stack(parts).sum(0) / world,
        "bf16_mean": (torch.stack([p.to(torch.bfloat16) for p in parts]).sum(0) / world).to(torch.bfloat16),
        "engine_optimizer": type(engine.optimizer).__name__,
    }


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_two_rank_bf16_gradients_are_reduced_in_fp32(stage, tiny_model_dir):
    results = run_ranks(_rank, 2, str(tiny_model_dir), stage, init="env", env={"DS_ACCELERATOR": "cpu"})
    for rank, r in enumerate(results):
        assert torch.equal(r["reduced"], r["fp32_mean"]), (
            f"rank {rank} ({r['engine_optimizer']}): max |diff| "
            f"{(r['reduced'] - r['fp32_mean']).abs().max():.3e} from the fp32 mean"
        )
        # and the test can tell: a bf16 reduction of the same gradients differs
        assert not torch.equal(r["reduced"], r["bf16_mean"].float())
