"""Whether a checkpoint may be resumed by this run: the same model, tokenizer and (ZeRO >= 1) world
size, always; the same recipe and shards, unless ``checkpoint.resume_with_changes`` (then the
changes are listed in a warning). A refusal is a :class:`CheckpointMismatch` saying what differs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mlctl.checkpoint_dir import CheckpointMeta

log = logging.getLogger(__name__)


class CheckpointMismatch(ValueError):
    """A checkpoint does not belong to this model, tokenizer, world size, recipe or data."""


def check_compatible(
    meta: CheckpointMeta,
    *,
    model: str,
    tokenizer_hash: str,
    world_size: int | None,
    zero_stage: int,
    where: Path,
) -> None:
    """Refuse a checkpoint of another model, tokenizer or (ZeRO >= 1) world size, saying what
    differs (``world_size`` None: not known yet, an elastic run's)."""
    problems = []
    if meta.model != model:
        problems.append(f"model: checkpoint has {meta.model!r}, config has {model!r}")
    if meta.tokenizer_hash != tokenizer_hash:
        problems.append(
            f"tokenizer vocabulary hash: checkpoint {meta.tokenizer_hash}, config {tokenizer_hash}"
        )
    if meta.zero_stage != zero_stage:
        problems.append(f"ZeRO stage: checkpoint {meta.zero_stage}, config {zero_stage}")
    if world_size is not None and max(meta.zero_stage, zero_stage) >= 1 and meta.world_size != world_size:
        problems.append(
            f"world size: checkpoint was written by {meta.world_size} ranks, this run has {world_size} "
            f"(ZeRO >= 1 shards the optimizer state by rank)"
        )
    if problems:
        raise CheckpointMismatch(f"cannot resume from {where}: " + "; ".join(problems))


def check_changes(path: Path, meta: CheckpointMeta, cfg, manifest_hash: str) -> list[str]:
    """What differs between the checkpoint at ``path`` and the run about to resume from it: recipe
    keys (:meth:`Config.recipe`) and the shards' manifest. Raises :class:`CheckpointMismatch`
    naming them unless ``cfg.checkpoint.resume_with_changes``; then returns them (and warns)."""
    changes = recipe_differences(path, cfg)
    if meta.manifest_hash and meta.manifest_hash != manifest_hash:
        changes.append(f"data: the shards' manifest was {meta.manifest_hash}, now {manifest_hash}")
    if changes and not cfg.checkpoint.resume_with_changes:
        raise CheckpointMismatch(
            f"cannot resume from {path}: the run's recipe changed (checkpoint "
            f"{meta.recipe_fingerprint or meta.config_fingerprint}, config {cfg.recipe_fingerprint()}): "
            + "; ".join(changes)
            + ". Train under another --name, or pass --resume-with-changes "
            "(checkpoint.resume_with_changes=true) to go on with the new settings"
        )
    if changes:
        log.warning("resuming %s with changes: %s", path, "; ".join(changes))
    return changes


def recipe_differences(path: Path, cfg) -> list[str]:
    """What differs between the recipe of the checkpoint at ``path`` (its config.yaml) and
    ``cfg``'s; empty when the checkpoint has no config.yaml (written by hand or by an old version)."""
    from mlctl.config import ConfigError, load_config, recipe_changes

    saved = Path(path) / "config.yaml"
    if not saved.is_file():
        return []
    try:
        before = load_config(saved).recipe()
    except ConfigError as e:  # a key this version no longer knows: say so rather than guess
        return [f"its config.yaml does not load here ({e})"]
    return recipe_changes(before, cfg.recipe())
