"""The training worker without Ray: DeepSpeed config, schedules, checkpoints, resume checks."""

from __future__ import annotations

import json

import pytest
import torch
from ranks import run_engine_worker

from mlctl.checkpoint import CheckpointDir, CheckpointMeta, CheckpointMismatch, check_compatible
from mlctl.config import load_config
from mlctl.deepspeed_setup import deepspeed_config, lr_lambda


def test_deepspeed_config_follows_the_typed_config():
    cfg = load_config(
        None,
        [
            "deepspeed.zero_stage=2",
            "deepspeed.precision=bf16",
            "data.batch_size=8",
            "train.grad_accum=3",
            "train.grad_clip=0.5",
            "deepspeed.extra={zero_optimization: {overlap_comm: true}}",
        ],
    )
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 8 * 3 * 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["overlap_comm"] is True
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedules(schedule):
    cfg = load_config(None, [f"train.schedule={schedule}", "train.warmup_steps=10", "train.max_steps=110"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    if schedule == "constant":
        assert f(60) == 1.0 and f(109) == 1.0
    else:
        assert f(60) == pytest.approx(0.5, abs=1e-6)
        assert f(110) == pytest.approx(0.0, abs=1e-6)


def _meta(**kw) -> CheckpointMeta:
    base = dict(
        step=4,
        samples_seen=32,
        tokens_seen=100,
        restarts=0,
        model="m",
        tokenizer_hash="aaa",
        world_size=2,
        zero_stage=1,
        manifest_hash="h",
        config_fingerprint="c",
    )
    base.update(kw)
    return CheckpointMeta(**base)


def test_resume_refuses_other_model_tokenizer_or_world_size(tmp_path):
    ok = dict(model="m", tokenizer_hash="aaa", world_size=2, zero_stage=1, where=tmp_path)
    check_compatible(_meta(), **ok)
    with pytest.raises(CheckpointMismatch, match="model: checkpoint has 'm', config has 'other'"):
        check_compatible(_meta(), **{**ok, "model": "other"})
    with pytest.raises(CheckpointMismatch, match="tokenizer vocabulary hash: checkpoint aaa, config bbb"):
        check_compatible(_meta(), **{**ok, "tokenizer_hash": "bbb"})
    with pytest.raises(CheckpointMismatch, match="written by 2 ranks, this run has 4"):
        check_compatible(_meta(), **{**ok, "world_size": 4})
    # ZeRO 0 keeps no per-rank optimizer shards: another world size is allowed.
    check_compatible(_meta(zero_stage=0), **{**ok, "zero_stage": 0, "world_size": 4})


def test_checkpoint_dir_publishes_atomically_and_keeps_last_k(tmp_path):
    ck = CheckpointDir(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        tmp = ck.prepare(step)
        (tmp / "engine" / "state").mkdir(parents=True)  # what a complete checkpoint holds
        (tmp / "engine" / "state" / "mp_rank_00_model_states.pt").write_text(str(step))
        for r in range(2):
            (tmp / f"data_state_rank{r:05d}.json").write_text("{}")
        ck.publish(step, _meta(step=step))
    assert ck.latest().name == "step_00000003"
    assert sorted(p.name for p in ck.root.glob("step_*")) == ["step_00000002", "step_00000003"]
    # An interrupted save: the temporary folder exists, `latest` is untouched, and the next save
    # clears the leftover.
    tmp = ck.prepare(4)
    (tmp / "payload").write_text("half")
    assert ck.latest().name == "step_00000003"
    ck.prepare(5)
    assert not tmp.exists()


def _base(model_dir, shards, **extra) -> list[str]:
    d = {
        "model.name_or_path": str(model_dir),
        "data.shards": str(shards),
        "data.batch_size": 4,
        "train.max_steps": 8,
        "checkpoint.every_steps": 4,
        "metrics.enabled": False,
        "train.lr": 1e-3,
    }
    d.update(extra)
    return [f"{k}={v}" for k, v in d.items()]


@pytest.mark.slow
def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path, tiny_model_dir, tiny_shards):
    run = tmp_path / "run"
    out = run_engine_worker(run, {"event": "save", "step": 8}, _base(tiny_model_dir, tiny_shards))
    assert out.returncode == -9, out.stdout[-2000:] + out.stderr[-2000:]
    ck = CheckpointDir(run)
    assert ck.latest().name == "step_00000004"  # the save at step 8 never got published
    assert ck.tmp_path(8).exists()
    out = run_engine_worker(run, None, _base(tiny_model_dir, tiny_shards))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr and "step_00000004" in out.stderr
    assert json.loads(out.stdout.split("FINAL", 1)[1])["step"] == 8
    assert ck.latest().name == "step_00000008" and not ck.tmp_path(8).exists()


@pytest.mark.slow
def test_damaged_newest_checkpoint_and_pointer_fall_back_to_the_one_before(
    tmp_path, tiny_model_dir, tiny_shards
):
    run = tmp_path / "run"
    out = run_engine_worker(run, None, _base(tiny_model_dir, tiny_shards))
    assert out.returncode == 0, out.stderr[-3000:]
    ck = CheckpointDir(run)
    for f in (ck.root / "step_00000008" / "engine" / "state").glob("*model_states.pt"):
        f.unlink()  # e.g. a disk that filled up, or a copy that stopped halfway
    (ck.root / "latest").write_text("garbage\n")
    out = run_engine_worker(run, None, _base(tiny_model_dir, tiny_shards, **{"train.max_steps": 10}))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no DeepSpeed model state" in out.stderr and "resuming from" in out.stderr
    assert "resumed from" in out.stderr and "step_00000004 at step 4" in out.stderr
    assert json.loads(out.stdout.split("FINAL", 1)[1])["step"] == 10
    assert ck.latest().name == "step_00000010"


@pytest.mark.slow
def test_every_restart_counts_even_between_the_same_two_checkpoints(tmp_path, tiny_model_dir, tiny_shards):
    run = tmp_path / "run"
    args = _base(tiny_model_dir, tiny_shards, **{"train.max_steps": 6, "checkpoint.every_steps": 2})
    for _ in range(2):  # two crashes at step 3, both after the step-2 checkpoint and before the next
        out = run_engine_worker(run, {"event": "step", "step": 2}, args)
        assert out.returncode == -9, out.stderr[-3000:]
    out = run_engine_worker(run, None, args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(restart 2)" in out.stderr
    assert json.loads(out.stdout.split("FINAL", 1)[1])["restarts"] == 2
    assert json.loads((run / "checkpoints" / "step_00000006" / "meta.json").read_text())["restarts"] == 2


@pytest.mark.slow
def test_resume_from_a_checkpoint_of_another_model_is_refused(
    tmp_path, tiny_model_dir, tiny_tokenizer, tiny_shards
):
    from tiny_models import build_tiny_bert

    run = tmp_path / "run"
    out = run_engine_worker(run, None, _base(tiny_model_dir, tiny_shards, **{"train.max_steps": 4}))
    assert out.returncode == 0, out.stderr[-3000:]
    other = build_tiny_bert(tmp_path / "other", tiny_tokenizer, hidden=48)
    out = run_engine_worker(run, None, _base(other, tiny_shards, **{"train.max_steps": 6}))
    assert out.returncode != 0
    assert "cannot resume from" in out.stderr and f"config has '{other}'" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (2, "fp32"), (3, "fp32"), (1, "bf16")])
def test_zero_stages_and_precisions_train_and_resume(tmp_path, tiny_model_dir, tiny_shards, zero, precision):
    run = tmp_path / "run"

    def args(steps: int) -> list[str]:
        return _base(
            tiny_model_dir,
            tiny_shards,
            **{
                "deepspeed.zero_stage": zero,
                "deepspeed.precision": precision,
                "train.max_steps": steps,
                "checkpoint.every_steps": 2,
            },
        )

    out = run_engine_worker(run, None, args(2))
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_engine_worker(run, None, args(3))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr
    final = json.loads(out.stdout.split("FINAL", 1)[1])
    assert final["step"] == 3 and final["restarts"] == 1
    assert torch.isfinite(torch.tensor(final["samples_seen"], dtype=torch.float))
