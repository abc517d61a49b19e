"""`mlctl export RUN_DIR OUT`: a run's encoder as a HuggingFace and sentence-transformers folder.

What the folder holds:

* ``config.json`` + ``model.safetensors``: the base encoder (e.g. ``BertModel``), so
  ``AutoModel.from_pretrained(OUT)`` loads it. The MLM head and the fusion MLP are training-only and
  are not exported (the MLM head is tied to the embeddings anyway; the MLP only scores anchored
  pairs during training, eval never uses it).
* the tokenizer files;
* ``modules.json`` and module configs for sentence-transformers, pooling exactly like `mlctl eval`:
  ``Transformer`` -> ``WeightedLayerPooling`` -> ``Pooling(mean)``. Averaging the pooled layers is
  a weighted layer average whose weights are 1 on the pooled layers and 0 between them, followed
  by the masked mean (both are linear, so the order does not matter). These are stock
  sentence-transformers modules: no ``trust_remote_code``. When only the last layer is pooled the
  layer module is left out. ``config.json`` then asks for hidden states only when needed.
* ``mlctl_export.json``: pool layers, source run, checkpoint and step, and the newer checkpoints
  passed over (with why).

The checkpoint is the one training would resume from: the newest complete one (``latest`` when it
names a complete folder), found by :mod:`mlctl.checkpoint_dir`. One that is complete on disk but does
not load (a truncated file, weights of another model) is named, and the next older complete one is
used instead, with a warning naming both; a checkpoint named with ``--checkpoint`` is never
substituted.

Checkpoints are read from any ZeRO stage: stages 1-3 through DeepSpeed's ``zero_to_fp32``
consolidation (fp32 master weights), stage 0 (no partitioned optimizer files) from the module
state that DeepSpeed saves whole.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlctl.checkpoint_dir import ENGINE_TAG, CheckpointDir, CheckpointMeta, incomplete_reason, step_of

log = logging.getLogger(__name__)

EXPORT_META = "mlctl_export.json"


def is_run_dir(path: str | Path) -> bool:
    """A training run folder: has config.yaml and a checkpoints/ folder."""
    p = Path(path)
    return (p / "config.yaml").is_file() and (p / "checkpoints").is_dir()


class CheckpointUnreadable(ValueError):
    """A checkpoint that cannot be loaded (a truncated file, weights of another model); the message
    names the file or folder and what is wrong with it."""


@dataclass
class RunCheckpoints:
    """A run folder and its checkpoints to read, in order: the one to use, then the older complete
    ones to fall back to should it fail to load (none after a checkpoint named by the user)."""

    run_dir: Path
    cfg: Any  # mlctl.config.Config
    candidates: list[Path]
    passed_over: list[str] = field(default_factory=list)  # why newer checkpoints were not used


@dataclass
class LoadedRun:
    """A run's model with the weights of one checkpoint, and which checkpoint that was."""

    model: Any  # MLCTLModel, in eval mode
    tokenizer: Any
    cfg: Any
    checkpoint: Path
    step: int
    passed_over: list[str]  # newer checkpoints not used, and why

    def describe(self) -> str:
        return f"{self.checkpoint.name} (step {self.step})"


def locate_run(run_dir: str | Path, checkpoint: str | None = None) -> RunCheckpoints:
    """The checkpoints of ``run_dir`` to read, found as training finds its resume point (the newest
    complete one, passing over damaged ones with a warning), without loading anything heavy.

    ``checkpoint`` (a folder name such as step_00000040): that one only; missing or damaged, it is
    an error naming it and why (never a silent substitute)."""
    from mlctl.config import load_config

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    if not is_run_dir(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a run folder (needs config.yaml and checkpoints/)")
    cfg = load_config(run_dir / "config.yaml")
    ckpts = CheckpointDir(run_dir)
    if checkpoint:
        return RunCheckpoints(run_dir, cfg, [_named_checkpoint(ckpts, checkpoint)])
    found = ckpts.newest_complete()
    if found.path is None:
        raise FileNotFoundError(_no_checkpoint(ckpts, run_dir))
    if found.passed_over:
        log.warning("%s; using %s, the newest complete checkpoint", "; ".join(found.passed_over), found.path)
    older = [p for p in ckpts.complete() if step_of(p) < step_of(found.path)]
    return RunCheckpoints(run_dir, cfg, [found.path, *older], found.passed_over)


def _named_checkpoint(ckpts, name: str) -> Path:
    path = ckpts.root / name
    if not path.is_dir():
        have = sorted(p.name for p in ckpts.root.glob("step_*") if p.is_dir())
        raise FileNotFoundError(f"{path}: no such checkpoint (the run has: {', '.join(have) or 'none'})")
    reason = incomplete_reason(path)
    if reason is not None:
        newest = ckpts.latest(quiet=True)
        hint = f"; the newest complete one is {newest.name}" if newest is not None else ""
        raise ValueError(f"checkpoint {path} is damaged: {reason}{hint}")
    return path


def _no_checkpoint(ckpts, run_dir: Path) -> str:
    folders = sorted((p for p in ckpts.root.glob("step_*") if p.is_dir()), reverse=True)
    if not folders:
        return f"run {run_dir} has no checkpoint yet ({ckpts.root} holds none)"
    damaged = "; ".join(f"{p.name}: {incomplete_reason(p)}" for p in folders)
    return f"run {run_dir} has no complete checkpoint ({damaged})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    head = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {head}"[:300] if head else type(e).__name__


def _check_torch_file(path: Path) -> None:
    """A torch.save file whose end is missing says so here, by name, before torch reads a byte of it.

    NOTE: torch's zip format keeps its directory at the end of the file, so a truncated copy has
    none; the legacy format (a pickle from the first byte, 0x80) cannot be checked this cheaply."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointUnreadable(f"{path}: empty file (0 bytes)")
    with open(path, "rb") as f:
        legacy = f.read(1) == b"\x80"
    if not legacy and not zipfile.is_zipfile(path):
        raise CheckpointUnreadable(
            f"{path}: truncated or not a torch file ({size:,} bytes, no zip directory at its end)"
        )


def _deepspeed_quietly(fn, what: str):
    """``fn()`` with DeepSpeed's prints and progress bars logged at DEBUG (``-v``) instead of shown;
    any failure becomes :class:`CheckpointUnreadable` starting with ``what``."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            return fn()
    except Exception as e:  # anything DeepSpeed trips on in a damaged checkpoint: name the folder
        raise CheckpointUnreadable(f"{what} ({_first_line(e)})") from e
    finally:
        for line in captured.getvalue().replace("\r", "\n").splitlines():
            if line.strip():
                log.debug("deepspeed: %s", line.strip())


def consolidated_state_dict(
    engine_dir: str | Path, tag: str = ENGINE_TAG, zero_stage: int | None = None
) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a DeepSpeed checkpoint written by any number of ranks.

    ``zero_stage`` (from meta.json): a stage >= 1 checkpoint must hold its optimizer shards, where
    the fp32 weights are. A file that is missing, truncated or unreadable raises
    :class:`CheckpointUnreadable` naming it."""
    engine_dir = Path(engine_dir)
    tag_dir = engine_dir / tag
    if not tag_dir.is_dir():
        raise CheckpointUnreadable(f"{tag_dir}: no DeepSpeed checkpoint with tag {tag!r}")
    for path in sorted(tag_dir.glob("*.pt")):
        _check_torch_file(path)
    has_shards = any(tag_dir.glob("*optim_states.pt"))
    if zero_stage and not has_shards:
        raise CheckpointUnreadable(
            f"{tag_dir}: a ZeRO stage {zero_stage} checkpoint without its optimizer shards "
            "(*optim_states.pt), which hold the fp32 weights"
        )
    if has_shards and any(tag_dir.glob("*zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = _deepspeed_quietly(
            lambda: get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=tag),
            f"{tag_dir}: DeepSpeed could not rebuild the fp32 weights",
        )
    else:
        # NOTE: ZeRO stage 0 keeps no partitioned fp32 groups, so zero_to_fp32 cannot read it; the
        # whole module state sits in the model-states file. DeepSpeed pickles more than tensors, so
        # weights_only=False: this is the user's own run folder.
        path = tag_dir / "mp_rank_00_model_states.pt"
        if not path.is_file():
            raise CheckpointUnreadable(f"{path}: not a DeepSpeed checkpoint (no model states file)")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a corrupt file fails in many ways (zip, pickle, storage); name it
            raise CheckpointUnreadable(f"{path}: cannot be read ({_first_line(e)})") from e
        if not isinstance(saved, dict) or not isinstance(saved.get("module"), dict):
            raise CheckpointUnreadable(
                f"{path}: holds no model weights ('module'); not a DeepSpeed model state"
            )
        state = saved["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def check_weights_fit(model, state: dict[str, torch.Tensor], where: Path, model_name: str) -> None:
    """:class:`CheckpointUnreadable` unless ``state`` has every weight of ``model``, in its shape.

    Checked before anything is copied, so a checkpoint that does not fit leaves ``model`` as it was
    (to try an older checkpoint with). The MLM decoder is tied to the word embeddings, so a
    checkpoint may store it once."""
    own = model.state_dict()
    tied = ("decoder.weight", "decoder.bias")
    missing = [k for k in own if k not in state and not k.endswith(tied)]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if reshaped:
        k = reshaped[0]
        problems.append(
            f"{len(reshaped)} weight(s) of another shape (e.g. {k}: checkpoint {list(state[k].shape)}, "
            f"model {list(own[k].shape)})"
        )
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if problems:
        raise CheckpointUnreadable(f"{where}: checkpoint does not match {model_name}: " + "; ".join(problems))


def load_run(located: RunCheckpoints) -> LoadedRun:
    """Load the run's model with the weights of its first candidate checkpoint; when that fails and
    older complete ones exist, fall back to them in turn, with a warning naming both."""
    from mlctl.hub import load_tokenizer
    from mlctl.model import MLCTLModel

    cfg = located.cfg
    model = MLCTLModel.from_pretrained(cfg.model.name_or_path, cfg.model.pool_layers, head_matters=False)
    model_name = f"{cfg.model.name_or_path} (model.name_or_path in {located.run_dir / 'config.yaml'})"
    passed_over = list(located.passed_over)
    failures: list[CheckpointUnreadable] = []
    for i, ckpt in enumerate(located.candidates):
        try:
            meta = CheckpointMeta.load(ckpt / "meta.json")
            state = consolidated_state_dict(ckpt / "engine", ENGINE_TAG, meta.zero_stage)
            check_weights_fit(model, state, ckpt / "engine" / ENGINE_TAG, model_name)
        except CheckpointUnreadable as e:
            failures.append(e)
            passed_over.append(f"skipped {ckpt.name}: {e}")
            if i + 1 < len(located.candidates):
                log.warning(
                    "cannot load %s: %s; using %s, the newest complete checkpoint before it",
                    ckpt.name,
                    e,
                    located.candidates[i + 1],
                )
            continue
        model.load_state_dict(state, strict=False)
        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
        return LoadedRun(model.eval(), tokenizer, cfg, ckpt, meta.step, passed_over)
    if len(failures) > 1:
        raise CheckpointUnreadable(
            f"{failures[0]}; the older checkpoints failed too (see the warnings above)"
        )
    raise failures[0]


def load_run_model(run_dir: str | Path, checkpoint: str | None = None):
    """(MLCTLModel with the checkpoint's weights, tokenizer, Config) of a training run: the named
    checkpoint, or the newest one that loads (see :func:`locate_run` and :func:`load_run`)."""
    loaded = load_run(locate_run(run_dir, checkpoint))
    return loaded.model, loaded.tokenizer, loaded.cfg


def export_encoder(
    model, tokenizer, out: str | Path, source: dict[str, Any] | None = None, max_seq_length: int = 128
) -> Path:
    """Write ``model``'s encoder, ``tokenizer`` and the sentence-transformers pooling to ``out``.

    Without the optional sentence-transformers package the folder holds the HuggingFace model, the
    tokenizer and ``mlctl_export.json`` (which ``mlctl eval`` reads its pooling from); the
    sentence-transformers module files are left out, with a warning naming the extra."""
    from mlctl.extras import available, install_hint
    from mlctl.preflight import check_new_folder

    with_st = available("sentence_transformers")
    out = check_new_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    layers = list(model.pool_layers)
    last_only = layers == [model.num_layers]
    encoder = model.encoder
    # The layer module reads hidden_states, which the encoder returns only when its config says so.
    encoder.config.output_hidden_states = not last_only
    try:
        encoder.save_pretrained(out, safe_serialization=True)
    finally:
        encoder.config.output_hidden_states = False
    tokenizer.save_pretrained(out)
    if with_st:
        _write_sentence_transformers(model, out, layers, last_only, max_seq_length)
    else:
        log.warning(
            "sentence-transformers is not installed: %s holds the HuggingFace model only "
            "(AutoModel, mlctl eval); for SentenceTransformer(%s): %s",
            out,
            out,
            install_hint("sentence_transformers"),
        )

    meta = {
        "pool_layers": layers,
        "num_layers": model.num_layers,
        "max_seq_length": max_seq_length,
        "fusion_mlp": "not exported (training only)",
        "sentence_transformers": with_st,
        **(source or {}),
    }
    (out / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _write_sentence_transformers(
    model, out: Path, layers: list[int], last_only: bool, max_seq_length: int
) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, WeightedLayerPooling
    from sentence_transformers.sentence_transformer.modules import Transformer as STTransformer

    transformer = STTransformer(str(out), max_seq_length=max_seq_length)
    hidden = model.hidden_size
    modules: list[torch.nn.Module] = [transformer]
    if not last_only:
        start = min(layers)
        weights = torch.tensor([float(layers.count(i)) for i in range(start, model.num_layers + 1)])
        modules.append(
            WeightedLayerPooling(
                hidden,
                num_hidden_layers=model.num_layers,
                layer_start=start,
                layer_weights=torch.nn.Parameter(weights, requires_grad=False),
            )
        )
    modules.append(Pooling(hidden, pooling_mode="mean"))
    SentenceTransformer(modules=modules, device="cpu").save(str(out))


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | None = None) -> Path:
    """Export the newest complete (or the named) checkpoint of a run; returns ``out``, whose
    mlctl_export.json records the checkpoint, its step and any newer checkpoint passed over."""
    from mlctl.preflight import check_new_folder

    check_new_folder(out)  # before the model load: a wrong OUT should not cost that wait
    loaded = load_run(locate_run(run_dir, checkpoint))
    source = {
        "run_dir": str(Path(run_dir).resolve()),
        "checkpoint": loaded.checkpoint.name,
        "step": loaded.step,
        "base_model": loaded.cfg.model.name_or_path,
        "passed_over": loaded.passed_over,
    }
    return export_encoder(loaded.model, loaded.tokenizer, out, source)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="training run folder")
    parser.add_argument(
        "out", metavar="OUT", help="new folder for the HuggingFace / sentence-transformers model"
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint folder name, e.g. step_00000040 (default: the newest complete one)",
    )


def run(args: argparse.Namespace) -> int:
    from mlctl.console import quiet_libraries

    with quiet_libraries(getattr(args, "verbose", False)):
        out = export_run(args.run_dir, args.out, args.checkpoint)
    meta = json.loads((out / EXPORT_META).read_text())
    print(
        f"exported {meta['checkpoint']} (step {meta['step']}) of {args.run_dir} to {out} "
        f"(pool layers {meta['pool_layers']})"
    )
    return 0
