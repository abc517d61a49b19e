"""The training step, the in-training evaluation, checkpoint save/load and export under CUDA's
device rules (tests/cuda_rules.py): parameters and batches on ``meta``, every op checked for mixed
devices, every read of the device by the host counted.

What must hold on a GPU, shown here without one:
* no op mixes the step's device with a CPU tensor (0-dim CPU scalars aside);
* one host read per optimizer step in the hot path: the packed all-reduce of the step's figures
  (loss terms, accuracy, gradient norm, counts, flags) copied back at the end; everything else the
  step needs on the host is derived from the CPU batch before it moves;
* every collective gets tensors on the step's device;
* the jagged (variable-length, mask-free) attention runs, on meta as on CUDA, through the flash
  kernel.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from cuda_rules import CudaRules, HostSync, MixedDevices, StandInEngine
from fixture_data import DATA, prepare_fixture_shards
from ranks import exit_rank, free_port

from mlctl.config import load_config
from mlctl.engine import Trainer

STEPS = 2


class MetaTrainer(Trainer):
    """The real Trainer with its parameters on ``meta`` and the DeepSpeed engine stood in for."""

    def _pick_device(self) -> torch.device:
        return torch.device("meta")

    def _build_engine(self, model):
        return StandInEngine(model, self.device, self.cfg, self.rank)


@pytest.fixture(scope="module")
def switch_shards(tmp_path_factory, tiny_model_dir) -> Path:
    """The fixture pairs with code-switch word lists and anchorless pairs kept: batches mix anchored
    and anchorless pairs, switch words, and carry source ids (the three catalogs share English
    sources, as a multiway corpus does), so the step runs the source-id masking. On meta no value
    steers the step, so the code that runs does not depend on which pairs a batch drew."""
    return prepare_fixture_shards(
        tmp_path_factory.mktemp("cuda_rules_shards"),
        str(tiny_model_dir),
        keep_no_anchor=True,
        code_switch=[f"de={DATA / 'dict.en-de.tsv'}", f"es={DATA / 'dict.en-es.tsv'}"],
    )


RECIPES = {
    # the paper's loss with MLM, both word-level terms (anchorless pairs feed only the sentence
    # term), gradient accumulation, the CUDA attention path
    "paper+mlm+accum": [
        "loss.kind=cz_nce",
        "loss.mlm_weight=0.1",
        "model.word_level=true",
        "loss.sentence_weight=0.5",
        "train.grad_accum=2",
        "model.attention=jagged",
    ],
    # the default recipe: InfoNCE on s, no MLM, code-switching, margin
    "proof": [
        "loss.kind=info_nce",
        "loss.mlm_weight=0",
        "model.word_level=false",
        "loss.temperature=0.05",
        "loss.margin=0.1",
        "model.attention=jagged",
    ],
    # the paper exactly (no sentence term) on the CPU's attention path
    "paper-grid": ["model.word_level=true", "loss.mlm_weight=0.1", "model.attention=grid"],
    # the cached step (mlctl.gradcache): chunks of 3 and 1 pairs, MLM riding in each chunk call,
    # both word-level terms, gradient accumulation
    "cached": [
        "loss.cache_chunk=3",
        "loss.kind=cz_nce",
        "loss.mlm_weight=0.1",
        "model.word_level=true",
        "loss.sentence_weight=0.5",
        "train.grad_accum=2",
        "model.attention=jagged",
    ],
}


def _config(model_dir: Path, shards: Path, recipe: list[str]):
    return load_config(
        None,
        [
            f"model.name_or_path={model_dir}",
            f"data.shards={shards}",
            "data.batch_size=4",
            "data.shuffle_buffer=16",
            "data.code_switch=0.5",
            "metrics.enabled=false",
            f"eval.pairs=[{DATA / 'pairs.en-de.tsv'}]",
            "eval.max_pairs=24",
            "eval.batch_size=8",
            "train.max_steps=100",
            *recipe,
        ],
    )


def run_under_rules(cfg, run_dir: Path, out: Path, rank: int = 0, world: int = 1) -> dict:
    """Steps, evaluation, save, load and export of one recipe under the rules; what was seen."""
    from mlctl.export import export_encoder

    trainer = MetaTrainer(cfg, run_dir, rank=rank, world_size=world)
    trainer.setup()
    assert next(trainer.model.parameters()).device.type == "meta"
    trainer.engine.train()
    it = iter(trainer.loader)
    try:
        with CudaRules("meta") as rules:
            for step in range(STEPS):
                rules.section(f"step{step}")
                trainer.train_step(it)
            rules.section("eval")
            trainer.evaluate()
            rules.section("save")
            path = trainer.save_checkpoint()
            rules.section("load")
            trainer.load_checkpoint(path)
            rules.section("export")
            if rank == 0:
                export_encoder(trainer.model, trainer.tokenizer, out / "export")
    finally:
        trainer.loader.close()
    return {
        "reads": rules.reads,
        "collectives": rules.collectives,
        "ops": dict(rules.ops),
        "flops": rules.flops.get_total_flops(),
        "steps": trainer.state.step,
        "exported": sorted(p.name for p in (out / "export").iterdir()) if rank == 0 else [],
    }


def _check(seen: dict, world: int) -> None:
    for step in range(STEPS):
        reads = [(what, where) for s, what, where in seen["reads"] if s == f"step{step}"]
        # the one copy of the packed all-reduce, and nothing else
        assert len(reads) == 1, f"step {step} read the device {len(reads)} times: {reads}"
        assert "train_step" in reads[0][1], reads
    devices = {dev for _, dev in seen["collectives"]}
    assert devices == {"meta"}, seen["collectives"]
    names = {name for name, _ in seen["collectives"]}
    assert "all_reduce" in names
    if world > 1:
        assert {"all_gather", "reduce_scatter"} <= names, names  # the loss's gather and its backward
    assert seen["steps"] == STEPS + 0  # load restored the saved step


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_one_rank_under_cuda_rules(recipe, tmp_path, tiny_model_dir, switch_shards):
    import torch.distributed as dist

    cfg = _config(tiny_model_dir, switch_shards, RECIPES[recipe])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        seen = run_under_rules(cfg, tmp_path / "run", tmp_path)
    finally:
        dist.destroy_process_group()
    _check(seen, world=1)
    assert "model.safetensors" in seen["exported"] and "modules.json" in seen["exported"]
    if "attention=jagged" in " ".join(RECIPES[recipe]):
        # the variable-length path: flash attention forward and backward, no dense mask
        assert seen["ops"].get("_flash_attention_forward.default", 0) > 0, seen["ops"]
        assert seen["ops"].get("_flash_attention_backward.default", 0) > 0, seen["ops"]
    else:
        assert seen["ops"].get("_flash_attention_forward.default", 0) == 0
    assert seen["flops"] > 0


def _rank(rank: int, world: int, port: int, model_dir: str, shards: str, tmp: str, recipe: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = _config(Path(model_dir), Path(shards), RECIPES[recipe])
    result: dict = {}
    try:
        result = run_under_rules(cfg, Path(tmp) / "run", Path(tmp), rank, world)
    except Exception as e:  # shown by the test
        result = {"error": f"{type(e).__name__}: {e}"}
    finally:
        torch.save(result, Path(tmp) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    exit_rank()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["paper+mlm+accum", "cached"])
def test_two_ranks_under_cuda_rules(recipe, tmp_path, tiny_model_dir, switch_shards):
    mp.spawn(
        _rank,
        args=(2, free_port(), str(tiny_model_dir), str(switch_shards), str(tmp_path), recipe),
        nprocs=2,
        join=True,
    )
    for rank in range(2):
        seen = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert "error" not in seen, f"rank {rank}: {seen['error']}"
        _check(seen, world=2)
        evals = [what for s, what, _ in seen["reads"] if s == "eval"]
        # one shard of the encoding per rank; only rank 0 copies the gathered vectors back
        assert (len(evals) > 0) == (rank == 0), evals


def test_the_rules_catch_what_cuda_rejects():
    """The checker itself, on the mistakes that crashed the GPU step before."""
    x = torch.ones(3, device="meta")
    with CudaRules("meta") as rules:
        with pytest.raises(MixedDevices, match=r"stack"):
            torch.stack([x, torch.ones(3)])
        with pytest.raises(MixedDevices, match=r"mm"):
            torch.ones(2, 3, device="meta") @ torch.ones(3, 2)  # passes on meta alone
        with pytest.raises(HostSync, match="nonzero"):
            x.nonzero()
        with pytest.raises(HostSync, match="boolean-mask"):
            x[x > 0]
        x * torch.tensor(2.0)  # a 0-dim CPU scalar is fine in an elementwise op, as on CUDA
        with pytest.raises(MixedDevices, match=r"stack"):
            # what engine.py did before: the accuracy copied to the host, stacked with the losses
            torch.stack([x.sum(), x.sum().cpu()])
        assert float(x.sum()) == 0.0 and x.cpu().shape == (3,)  # reads return zeros, counted
        with pytest.raises(Exception, match="serves meta only"):
            torch.distributed.all_reduce(torch.ones(2))
    assert [what.split(" ")[0].split(".")[0] for _, what, _ in rules.reads] == [
        "nonzero",
        "boolean-mask",
        "copy",
        "_local_scalar_dense",
        "copy",
    ]
