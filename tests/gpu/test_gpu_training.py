"""The real training step on CUDA (DeepSpeed, NCCL, the tiny test model and shards): every
collective on the engine's GPU (the CPU suite's ``StrictDevice``), bf16 weights with a float32
loss, and bf16 and fp32 loss curves that agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gpu_util import needs_gpus
from ranks import run_ranks

STEPS = 20
# bf16 vs fp32, same seed, data and dropout masks: per-step |loss_bf16 - loss_fp32| within
# ABS + REL * |loss_fp32|. NOTE: not yet calibrated on a GPU (none was available while writing it).
ABS, REL = 0.05, 0.05


def _train(rank, world, model, shards, run_dir, precisions, steps) -> dict:
    from device_check import StrictDevice

    from mlctl.config import load_config
    from mlctl.engine import Trainer

    result: dict = {}
    for precision in precisions:
        cfg = load_config(
            None,
            [
                f"model.name_or_path={model}",
                f"data.shards={shards}",
                "data.batch_size=8",
                "metrics.enabled=false",
                f"train.max_steps={steps}",
                "train.lr=1e-3",
                "train.warmup_steps=2",
                f"deepspeed.precision={precision}",
            ],
        )
        trainer = Trainer(cfg, Path(run_dir) / precision, rank=rank, world_size=world)
        trainer.setup()
        trainer.engine.train()
        it = iter(trainer.loader)
        with StrictDevice(trainer.engine.device):
            losses = [trainer.train_step(it)["loss"] for _ in range(steps)]
        result[precision] = {
            "device": str(trainer.engine.device),
            "param_dtype": str(next(trainer.model.parameters()).dtype),
            "losses": losses,
        }
        trainer.loader.close()
    return result


def _spawn(world, tmp_path, model, shards, precisions, steps) -> list[dict]:
    args = (str(model), str(shards), str(tmp_path / "run"), precisions, steps)
    # DS_ACCELERATOR before deepspeed is imported (in _train): its accelerator is fixed then.
    return run_ranks(_train, world, *args, init="env", env={"DS_ACCELERATOR": "cuda"})


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=needs_gpus(2))])
def test_step_on_cuda_keeps_collectives_on_the_engine_gpu(world, tmp_path, tiny_model_dir, tiny_shards):
    results = _spawn(world, tmp_path, tiny_model_dir, tiny_shards, ("bf16",), 3)
    for rank, res in enumerate(results):
        r = res["bf16"]
        assert r["device"] == f"cuda:{rank}"  # LOCAL_RANK indexes the node's GPUs (torchrun-style)
        assert r["param_dtype"] == "torch.bfloat16"
        assert all(torch.isfinite(torch.tensor(r["losses"])))
    # The logged loss is the rank mean: every rank reports the same figure.
    assert all(res["bf16"]["losses"] == results[0]["bf16"]["losses"] for res in results)


def test_bf16_and_fp32_loss_curves_agree(tmp_path, tiny_model_dir, tiny_shards):
    (res,) = _spawn(1, tmp_path, tiny_model_dir, tiny_shards, ("fp32", "bf16"), STEPS)
    fp32, bf16 = torch.tensor(res["fp32"]["losses"]), torch.tensor(res["bf16"]["losses"])
    assert res["fp32"]["param_dtype"] == "torch.float32"
    assert fp32[-5:].mean() < fp32[:5].mean(), "fp32 did not train"
    bad = (bf16 - fp32).abs() > ABS + REL * fp32.abs()
    assert not bad.any(), f"bf16 {bf16.tolist()} vs fp32 {fp32.tolist()}"
