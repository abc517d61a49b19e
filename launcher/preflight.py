"""Driver-side checks before Ray starts: everything that would otherwise fail on every worker, once
per retry, with a traceback each time. Each check fails with one line saying what and where.

* paths made absolute (Ray workers do not run in the driver's working directory);
* the shards: a manifest (local or in an object store) with samples enough for every rank;
* the model and tokenizer resolve here (a local folder, the packaged encoder, the Hugging Face cache
  or a hub that answers), and the tokenizer is the one the shards were prepared with;
* resuming a local run: the newest checkpoint belongs to this model, tokenizer and world size, and
  its recipe and data are this run's (unless ``checkpoint.resume_with_changes``);
* disk space for the next checkpoint where it will be written.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import shutil
from pathlib import Path

from mlctl import storage
from mlctl.config import Config

log = logging.getLogger(__name__)


def preflight(cfg: Config, run_dir: Path | None = None) -> Config:
    """The checks above on a copy of ``cfg``; returns the copy with absolute paths."""
    cfg = copy.deepcopy(cfg)

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path

    cfg.model.name_or_path = absolute(cfg.model.name_or_path)
    cfg.model.tokenizer = absolute(cfg.model.tokenizer)
    if not cfg.data.shards:
        raise FileNotFoundError("data.shards is empty: point it at a folder written by `mlctl prepare`")
    if not storage.is_remote(cfg.data.shards):
        cfg.data.shards = str(Path(cfg.data.shards).expanduser().resolve())
    missing = [p for p in cfg.eval.pairs if not Path(p).expanduser().is_file()]
    if missing:
        raise FileNotFoundError(f"eval.pairs not found: {', '.join(missing)}")
    cfg.eval.pairs = [absolute(p) for p in cfg.eval.pairs]
    from mlctl.pair_files import read_pair_file

    for path in cfg.eval.pairs:
        # Read once here: a file every worker would refuse at its first evaluation (in another
        # encoding, without a pair) stops the run before it starts, not steps into it.
        read_pair_file(path, cfg.eval.max_pairs, options="")  # training reads UTF-8 only
    manifest = read_manifest(cfg)
    if isinstance(cfg.ray.num_workers, list) and cfg.deepspeed.zero_stage != 0:
        raise ValueError(
            f"ray.num_workers={cfg.ray.num_workers} (elastic) needs deepspeed.zero_stage=0, got "
            f"{cfg.deepspeed.zero_stage}: ZeRO >= 1 shards the optimizer state by rank, so a checkpoint "
            "cannot be resumed by a different number of workers"
        )
    tokenizer_hash = check_model(cfg, manifest)
    if run_dir is not None:
        check_resume(cfg, run_dir, tokenizer_hash)
        check_space(cfg, run_dir)
    return cfg


def read_manifest(cfg: Config) -> dict:
    """The shards' manifest, with enough samples for the largest world the run may have."""
    where = storage.join(cfg.data.shards, "manifest.json")
    try:
        manifest = json.loads(storage.read_text(where))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no manifest.json in {storage.display(cfg.data.shards)}: run `mlctl prepare` first"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{storage.display(where)} is not a manifest written by `mlctl prepare`: {e}"
        ) from None
    shards = [s for s in manifest.get("shards", []) if isinstance(s, dict)]
    samples = sum(s.get("samples", 0) for s in shards)
    if (
        shards
        and not storage.is_remote(cfg.data.shards)
        and not any(_intact(cfg.data.shards, s) for s in shards)
    ):
        raise ValueError(
            f"no shard listed in {storage.display(where)} is readable ({len(shards)} listed, each missing "
            "or not the size the manifest records): re-run `mlctl prepare`"
        )
    need = cfg.ray.max_workers * cfg.data.batch_size * max(1, cfg.data.num_workers)
    if samples < need:
        raise ValueError(
            f"{storage.display(where)} lists {samples} samples: too few for {cfg.ray.max_workers} worker(s) x "
            f"{max(1, cfg.data.num_workers)} loader worker(s) x batch {cfg.data.batch_size} (one batch each); "
            "prepare more pairs or lower data.batch_size"
        )
    return manifest


def _intact(root: str, entry: dict) -> bool:
    """One stat: the shard exists with the size the manifest recorded (as rank 0 checks at start)."""
    try:
        size = storage.size(storage.join(root, str(entry.get("name", ""))))
    except OSError:
        return False
    return not isinstance(entry.get("bytes"), int) or size == entry["bytes"]


def check_model(cfg: Config, manifest: dict) -> str:
    """The model and tokenizer resolve on this machine, and the tokenizer is the shards'. Returns
    the tokenizer's fingerprint."""
    from mlctl.hub import check_available, load_tokenizer, tokenizer_fingerprint

    check_available(cfg.model.name_or_path)
    key = "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"
    name = cfg.model.tokenizer or cfg.model.name_or_path
    check_available(name, key)
    try:
        fingerprint = tokenizer_fingerprint(load_tokenizer(name))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"{key}={name!r}: its tokenizer does not load: {str(e).splitlines()[0]}"
        ) from None
    tok = manifest.get("tokenizer", {})
    if tok.get("hash") != fingerprint:
        raise ValueError(
            f"shards in {storage.display(cfg.data.shards)} were tokenized with {tok.get('name')!r} (hash "
            f"{tok.get('hash')}), but {key}={name!r} has hash {fingerprint}: re-run `mlctl prepare` with "
            "the model's tokenizer"
        )
    return fingerprint


def check_resume(cfg: Config, run_dir: Path, tokenizer_hash: str) -> None:
    """A local run's newest checkpoint must be one this config may resume (the workers check it
    again; here it fails before any of them starts)."""
    from launcher.naming import is_object_store
    from mlctl.checkpoint_dir import CheckpointDir, CheckpointMeta
    from mlctl.data.manifest import manifest_hash
    from mlctl.resume_checks import check_changes, check_compatible

    if is_object_store(cfg.ray.storage_path) or not cfg.checkpoint.resume:
        return
    newest = CheckpointDir(run_dir).latest(quiet=True)
    if newest is None:
        return
    meta = CheckpointMeta.load(newest / "meta.json")
    check_compatible(
        meta,
        model=cfg.model.name_or_path,
        tokenizer_hash=tokenizer_hash,
        world_size=None if isinstance(cfg.ray.num_workers, list) else cfg.ray.num_workers,
        zero_stage=cfg.deepspeed.zero_stage,
        where=newest,
    )
    check_changes(newest, meta, cfg, manifest_hash(cfg.data.shards))


def checkpoint_bytes(cfg: Config, run_dir: Path) -> tuple[int, str]:
    """About how many bytes the next checkpoint takes, and how that was judged: the newest
    checkpoint's size, else the model's weight files times the optimizer state that comes with them
    (AdamW's two moments and the fp32 copy ZeRO partitions, plus the bf16/fp16 weights)."""
    from mlctl.checkpoint_dir import CheckpointDir
    from mlctl.hub import resolve_model_path

    newest = CheckpointDir(run_dir).latest(quiet=True)
    if newest is not None:
        return sum(f.stat().st_size for f in newest.rglob("*") if f.is_file()), f"the size of {newest.name}"
    folder = Path(resolve_model_path(cfg.model.name_or_path)).expanduser()
    weights = sum(
        f.stat().st_size
        for pattern in ("*.safetensors", "*.bin")
        for f in folder.glob(pattern)
        if f.is_file()
    )
    factor = 4 if cfg.deepspeed.precision == "fp32" else 5
    return weights * factor, f"{factor} x the model's weight files"


def check_space(cfg: Config, run_dir: Path) -> None:
    """Room for one more checkpoint where it is written (the run folder, or this node's staging
    folder when checkpoints go to an object store)."""
    need, how = checkpoint_bytes(cfg, run_dir)
    if need == 0:
        return
    probe = Path(run_dir)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"not enough space for a checkpoint: about {need / 2**20:.0f} MiB needed ({how}), "
            f"{free / 2**20:.0f} MiB free; free some space or point ray.storage_path elsewhere",
            str(probe),
        )
