"""Resume that cannot strand a run: fallback to the newest complete checkpoint, safe publication,
per-step seeds, run naming and the learning-rate schedules."""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

import pytest

from mlctl.checkpoint import CheckpointDir, CheckpointMeta, step_seed
from mlctl.config import load_config


def _meta(step: int, world_size: int = 2) -> CheckpointMeta:
    return CheckpointMeta(
        step=step,
        samples_seen=8 * step,
        tokens_seen=100 * step,
        restarts=0,
        model="m",
        tokenizer_hash="t",
        world_size=world_size,
        zero_stage=1,
        manifest_hash="h",
        config_fingerprint="c",
    )


def _save(ck: CheckpointDir, step: int, world_size: int = 2) -> Path:
    """What the ranks write, in the layout DeepSpeed and the data loader use."""
    tmp = ck.prepare(step)
    (tmp / "engine" / "state").mkdir(parents=True)
    (tmp / "engine" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    for r in range(world_size):
        (tmp / f"data_state_rank{r:05d}.json").write_text("{}")
    return ck.publish(step, _meta(step, world_size))


@pytest.fixture
def three(tmp_path) -> CheckpointDir:
    ck = CheckpointDir(tmp_path, keep_last=3)
    for step in (4, 8, 12):
        _save(ck, step)
    assert ck.latest().name == "step_00000012"
    return ck


@pytest.mark.parametrize(
    "damage",
    [
        "pointer_missing",
        "pointer_garbage",
        "pointer_names_missing",
        "meta_missing",
        "engine_missing",
        "rank_missing",
    ],
)
def test_damaged_latest_falls_back_to_newest_complete_with_a_warning(three, damage, caplog):
    root, newest = three.root, three.root / "step_00000012"
    if damage == "pointer_missing":
        (root / "latest").unlink()
        want = "step_00000012"  # the folders themselves are the record
    elif damage == "pointer_garbage":
        (root / "latest").write_bytes(b"\x00\xff../../etc")
        want = "step_00000012"
    elif damage == "pointer_names_missing":
        (root / "latest").write_text("step_00000016\n")
        want = "step_00000012"
    elif damage == "meta_missing":
        (newest / "meta.json").unlink()
        want = "step_00000008"
    elif damage == "engine_missing":
        (newest / "engine" / "state" / "mp_rank_00_model_states.pt").unlink()
        want = "step_00000008"
    else:
        (newest / "data_state_rank00001.json").unlink()
        want = "step_00000008"
    with caplog.at_level(logging.WARNING, logger="mlctl.checkpoint"):
        got = three.latest()
    assert got.name == want
    assert "newest complete checkpoint" in caplog.text and str(root / want) in caplog.text


def test_nothing_complete_starts_fresh_with_a_warning(tmp_path, caplog):
    ck = CheckpointDir(tmp_path)
    _save(ck, 4)
    (ck.root / "step_00000004" / "meta.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="mlctl.checkpoint"):
        assert ck.latest() is None
    assert "meta.json is unreadable" in caplog.text and "starting from scratch" in caplog.text
    assert CheckpointDir(tmp_path / "fresh").latest() is None  # a new run: no warning needed


def test_a_newer_complete_checkpoint_than_the_pointer_wins(three):
    # Killed between the rename and the pointer update: step 16 is complete, `latest` still says 12.
    _save(three, 16)
    (three.root / "latest").write_text("step_00000012\n")
    assert three.latest().name == "step_00000016"


def test_republishing_a_step_never_leaves_it_without_a_complete_copy(three, monkeypatch):
    """A redone step replaces its older copy; a kill between the two renames must still leave a
    complete step 12 (the old code deleted it first)."""
    real_replace = os.replace
    calls = []

    def dying_replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src).name.startswith(".tmp-step_"):
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        _save(three, 12)
    monkeypatch.setattr(os, "replace", real_replace)
    got = three.latest()
    assert got is not None and got.name.endswith("step_00000012"), got
    assert CheckpointMeta.load(got / "meta.json").step == 12
    # The next publication of that step puts it back under its own name and clears the copy.
    _save(three, 12)
    assert three.latest() == three.root / "step_00000012"
    assert not list(three.root.glob(".old-*")) and not list(three.root.glob(".tmp-*"))


def test_prune_keeps_the_resume_point_and_keep_last(tmp_path):
    ck = CheckpointDir(tmp_path, keep_last=2)
    for step in (2, 4, 6, 8):
        _save(ck, step)
    assert sorted(p.name for p in ck.root.glob("step_*")) == ["step_00000006", "step_00000008"]


def test_step_seeds_do_not_collide():
    """The old linear mix (seed*1000003 + step*1009 + rank*31 + micro) gave rank 1 / micro 0 and
    rank 0 / micro 31 the same seed, among others."""
    seen = {}
    for key in itertools.product(range(3), range(120), range(8), [*range(40), 10_000]):
        s = step_seed(*key)
        assert 0 <= s < 2**63
        assert s not in seen, f"{key} and {seen[s]} share seed {s}"
        seen[s] = key
    assert step_seed(0, 5, 1, 2) == step_seed(0, 5, 1, 2)  # a function of its arguments only


def test_run_name_survives_longer_runs_and_other_cadence_not_other_training():
    from launcher.naming import run_name

    base = ["data.shards=/x", "model.name_or_path=m"]
    name = run_name(load_config(None, base))
    same = [
        "train.max_steps=1000",
        "train.log_every=1",
        "train.log_pair_ids=true",
        "eval.every_steps=7",
        "eval.pairs=[a.tsv]",
        "checkpoint.every_steps=3",
        "checkpoint.every_minutes=5",
        "checkpoint.keep_last=9",
        "metrics.port=9999",
        "ray.max_failures=9",
        "ray.address=auto",
        "ray.storage_path=/elsewhere",
        "ray.cpus_per_worker=4",
        "data.prepare.workers=8",
    ]
    for o in same:
        assert run_name(load_config(None, [*base, o])) == name, o
    other = [
        "train.lr=1e-3",
        "train.schedule=cosine",
        "train.seed=1",
        "loss.temperature=0.1",
        "model.name_or_path=other",
        "model.pool_layers=[-1]",
        "data.batch_size=8",
        "data.shards=/y",
        "deepspeed.zero_stage=2",
        "ray.num_workers=4",
    ]
    for o in other:
        assert run_name(load_config(None, [*base, o])) != name, o
    assert run_name(load_config(None, [*base, "ray.name=mine"])) == "mine"


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedule_against_transformers(schedule):
    """After warmup the multiplier is transformers' schedule exactly; during warmup ours is one step
    ahead (step 0 trains at lr/warmup, transformers' at 0: a step spent at lr 0), which is why
    lr_lambda stays. (Past max_steps transformers' cosine rises again; ours stays at 0.)"""
    import torch
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    from mlctl.deepspeed_setup import lr_lambda

    warmup, total = 10, 110
    cfg = load_config(
        None, [f"train.schedule={schedule}", f"train.warmup_steps={warmup}", f"train.max_steps={total}"]
    )
    ours = lr_lambda(cfg)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if schedule == "constant":
        ref = get_constant_schedule_with_warmup(opt, warmup)
    elif schedule == "linear":
        ref = get_linear_schedule_with_warmup(opt, warmup, total)
    else:
        ref = get_cosine_schedule_with_warmup(opt, warmup, total)
    theirs = ref.lr_lambdas[0]
    for step in range(total + 1):
        if step < warmup:
            assert ours(step) == pytest.approx(theirs(step + 1))
        else:
            assert ours(step) == pytest.approx(theirs(step), abs=1e-12), step
    assert theirs(0) == 0.0 and ours(0) > 0


def test_each_checkpoint_file_is_uploaded_by_its_writer_and_downloaded_by_who_reads_it():
    from launcher.reporters import _rank_of_file, _writer_of

    assert _writer_of("zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert _writer_of("zero_pp_rank_12_mp_rank_00_model_states.pt") == 12  # ZeRO-3
    assert _writer_of("bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt") == 2
    assert _writer_of("data_state_rank00007.json") == 7
    for shared in ("mp_rank_00_model_states.pt", "meta.json", "config.yaml"):
        assert _writer_of(shared) == 0
    # A rank downloads its own optimizer shard; everything else once per node (every rank reads it,
    # all data states included: a resized run re-splits the old ranks' positions).
    assert _rank_of_file("zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    for shared in ("mp_rank_00_model_states.pt", "meta.json", "config.yaml", "data_state_rank00007.json"):
        assert _rank_of_file(shared) is None
