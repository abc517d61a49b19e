"""The real training step (real DeepSpeed engine, real gloo group, world sizes 1 and 2) with
collectives that reject tensors not on the step's device (``device_check.StrictDevice``): what NCCL
does on a GPU node, made visible on a CPU machine. Also the device choice itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from ranks import exit_rank, free_port

from mlctl.distributed import training_device


def _worker(rank: int, world: int, port: int, model: str, shards: str, run_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    import torch.distributed as dist
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
    result: dict = {"device": str(trainer.engine.device)}
    try:
        with StrictDevice(trainer.engine.device) as strict:
            result["steps"] = [trainer.train_step(it)["loss"] for _ in range(2)]
        result["seen"] = strict.seen
    except Exception as e:  # reported to the test, which shows it
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        trainer.loader.close()
        torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    exit_rank()


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_step_collectives_stay_on_the_engine_device(world, tmp_path, tiny_model_dir, tiny_shards):
    mp.spawn(
        _worker,
        args=(
            world,
            free_port(),
            str(tiny_model_dir),
            str(tiny_shards),
            str(tmp_path / "run"),
            str(tmp_path),
        ),
        nprocs=world,
        join=True,
    )
    for rank in range(world):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert "error" not in res, f"rank {rank}: {res['error']}"
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
