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
* ``mlctl_export.json``: pool layers, source run, checkpoint and step.

Checkpoints are read from any ZeRO stage: stages 1-3 through DeepSpeed's ``zero_to_fp32``
consolidation (fp32 master weights), stage 0 (no partitioned optimizer files) from the module
state that DeepSpeed saves whole.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

EXPORT_META = "mlctl_export.json"
ENGINE_TAG = "state"


def is_run_dir(path: str | Path) -> bool:
    """A training run folder: has config.yaml and a checkpoints/ folder."""
    p = Path(path)
    return (p / "config.yaml").is_file() and (p / "checkpoints").is_dir()


def find_checkpoint(run_dir: str | Path, checkpoint: str | None = None) -> Path:
    """The checkpoint folder named ``checkpoint`` (e.g. step_00000040), or the one ``latest`` names."""
    root = Path(run_dir) / "checkpoints"
    if checkpoint:
        path = root / checkpoint
        if not (path / "engine").is_dir():
            raise FileNotFoundError(f"{path}: no such checkpoint (no engine/ folder)")
        return path
    pointer = root / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(f"{pointer} is missing: the run has no complete checkpoint yet")
    path = root / pointer.read_text().strip()
    if not (path / "engine").is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which has no engine/ folder")
    return path


def consolidated_state_dict(engine_dir: str | Path, tag: str = ENGINE_TAG) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a DeepSpeed checkpoint written by any number of ranks."""
    engine_dir = Path(engine_dir)
    tag_dir = engine_dir / tag
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"{tag_dir}: no DeepSpeed checkpoint with tag {tag!r}")
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("*zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=tag)
    else:
        # NOTE: ZeRO stage 0 keeps no partitioned fp32 groups, so zero_to_fp32 cannot read it; the
        # whole module state sits in the model-states file. DeepSpeed pickles more than tensors, so
        # weights_only=False: this is the user's own run folder.
        path = tag_dir / "mp_rank_00_model_states.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a DeepSpeed checkpoint (no model states file)")
        state = torch.load(path, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_run_model(run_dir: str | Path, checkpoint: str | None = None):
    """(MLCTLModel with the checkpoint's weights, tokenizer, Config) of a training run."""
    from mlctl.config import load_config
    from mlctl.hub import load_tokenizer
    from mlctl.model import MLCTLModel

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a run folder (needs config.yaml and checkpoints/)")
    cfg = load_config(run_dir / "config.yaml")
    ckpt = find_checkpoint(run_dir, checkpoint)
    model = MLCTLModel.from_pretrained(cfg.model.name_or_path, cfg.model.pool_layers)
    state = consolidated_state_dict(ckpt / "engine")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The MLM decoder is tied to the word embeddings, so a checkpoint may store it once.
    missing = [k for k in missing if not k.endswith("decoder.weight") and not k.endswith("decoder.bias")]
    if missing or unexpected:
        raise ValueError(
            f"{ckpt}: checkpoint does not match {cfg.model.name_or_path}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.checkpoint_path = str(ckpt)  # type: ignore[assignment]
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    return model.eval(), tokenizer, cfg


def export_encoder(
    model, tokenizer, out: str | Path, source: dict[str, Any] | None = None, max_seq_length: int = 128
) -> Path:
    """Write ``model``'s encoder, ``tokenizer`` and the sentence-transformers pooling to ``out``.

    Without the optional sentence-transformers package the folder holds the HuggingFace model, the
    tokenizer and ``mlctl_export.json`` (which ``mlctl eval`` reads its pooling from); the
    sentence-transformers module files are left out, with a warning naming the extra."""
    from mlctl.extras import available, install_hint

    with_st = available("sentence_transformers")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder")
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
    """Export the latest (or the named) checkpoint of a run; returns ``out``."""
    model, tokenizer, cfg = load_run_model(run_dir, checkpoint)
    ckpt = Path(model.checkpoint_path)
    meta_path = ckpt / "meta.json"
    step = json.loads(meta_path.read_text()).get("step") if meta_path.is_file() else None
    source = {
        "run_dir": str(Path(run_dir).resolve()),
        "checkpoint": ckpt.name,
        "step": step,
        "base_model": cfg.model.name_or_path,
    }
    return export_encoder(model, tokenizer, out, source)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="training run folder")
    parser.add_argument(
        "out", metavar="OUT", help="new folder for the HuggingFace / sentence-transformers model"
    )
    parser.add_argument(
        "--checkpoint", default=None, help="checkpoint folder name, e.g. step_00000040 (default: the latest)"
    )


def run(args: argparse.Namespace) -> int:
    out = export_run(args.run_dir, args.out, args.checkpoint)
    meta = json.loads((out / EXPORT_META).read_text())
    print(
        f"exported {meta['checkpoint']} (step {meta['step']}) of {args.run_dir} to {out} "
        f"(pool layers {meta['pool_layers']})"
    )
    return 0
