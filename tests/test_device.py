"""The real training step (real DeepSpeed engine, real gloo group, world sizes 1 and 2) with
collectives that reject tensors not on the step's device (``device_check.StrictDevice``): what NCCL
does on a GPU node, made visible on a CPU machine. Also the device choice itself."""

from __future__ import annotations

import pytest
import torch
from ranks import free_port, run_ranks

from mlctl.distributed import training_device


def _rank(rank: int, world: int, model: str, shards: str, run_dir: str) -> dict:
    from device_check import StrictDevice

    from mlctl.config import load_config
    from mlctl.engine import Trainer

    cfg = load_config(
        None,
        [
            f"model.name_or_path={model}",
            f"data.shards={shards}",
            "data.batch_size=4",
            "train.grad_accum=2",
            "metrics.enabled=false",
            "train.max_steps=100",
        ],
    )
    trainer = Trainer(cfg, run_dir, rank=rank, world_size=world)
    trainer.setup()
    trainer.engine.train()
    it = iter(trainer.loader)
    try:
        with StrictDevice(trainer.engine.device) as strict:  # an off-device collective raises
            steps = [trainer.train_step(it)["loss"] for _ in range(2)]
    finally:
        trainer.loader.close()
    return {"device": str(trainer.engine.device), "steps": steps, "seen": strict.seen}


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_step_collectives_stay_on_the_engine_device(world, tmp_path, tiny_model_dir, tiny_shards):
    args = (str(tiny_model_dir), str(tiny_shards), str(tmp_path / "run"))
    for res in run_ranks(_rank, world, *args, init="env", env={"DS_ACCELERATOR": "cpu"}):
        assert res["device"] == "cpu"
        assert all(torch.isfinite(torch.tensor(res["steps"])))
        ops = {op for op, _, _ in res["seen"]}
        # The wrapper saw the step's figures (all_reduce) and, with 2 ranks, the loss's gather.
        assert "all_reduce" in ops
        if world > 1:
            assert ops & {"all_gather", "all_gather_into_tensor"}
        assert {dev for _, dev, _ in res["seen"]} == {"cpu"}


def test_strict_device_rejects_what_nccl_would(tmp_path):
    """The checker itself: a collective refuses a tensor off the device (here in a 1-process gloo
    group)."""
    import torch.distributed as dist
    from device_check import OffDeviceCollective, StrictDevice

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with StrictDevice("cpu"):
            ones = torch.ones(2)
            dist.all_reduce(ones)  # on the device: fine
            assert torch.equal(ones, torch.ones(2))
            with pytest.raises(OffDeviceCollective, match="on meta; this process group serves cpu only"):
                dist.all_reduce(torch.zeros(2, device="meta"))
    finally:
        dist.destroy_process_group()


def test_training_device_follows_deepspeed_and_the_launcher():
    # A CPU accelerator trains on the CPU even where CUDA exists; a GPU assignment there is an error.
    assert training_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="DS_ACCELERATOR=cuda for GPU workers"):
        training_device("cpu", 0, "cuda:0")
    with pytest.raises(RuntimeError, match="not supported"):
        training_device("xpu", 0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
            training_device("cuda", 0)
        with pytest.raises(RuntimeError, match="was assigned cpu"):
            training_device("cuda", 0, "cpu")
    else:
        # Ray's assignment wins over the local rank (a worker seeing one GPU with local rank 1).
        assert training_device("cuda", 1, "cuda:0") == torch.device("cuda", 0)
