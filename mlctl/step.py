"""What one micro-step computes, apart from the engine that runs it: the batch's MLM copy and its
encoder inputs (everything that depends on the data derived on the host, from the CPU batch, so the
device is never read back to learn a shape), and the loss the step back-propagates.

:class:`mlctl.engine.Trainer` runs these under DeepSpeed (and :mod:`mlctl.gradcache` in chunks);
benchmarks run them around a plain model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mlctl.checkpoint import step_seed
from mlctl.config import Config
from mlctl.losses import contrastive_terms
from mlctl.model import EncoderInputs, mask_tokens


@dataclass(frozen=True)
class Vocab:
    """What MLM masking needs of the tokenizer and the model."""

    special_ids: torch.Tensor  # never masked
    mask_id: int
    size: int  # the model's vocabulary (random replacements are drawn from it)

    @classmethod
    def of(cls, tokenizer: Any, size: int) -> Vocab:
        return cls(
            torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long),
            tokenizer.mask_token_id,
            size,
        )


def mlm_copy(
    batch: dict[str, Any], cfg: Config, vocab: Vocab, step: int, rank: int, micro: int
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """The batch's masked copy and its labels (CPU), seeded by (seed, step, rank, micro-batch) so a
    resumed step masks exactly as the first run did; (None, None) without an MLM term."""
    if cfg.loss.mlm_weight <= 0:
        return None, None
    gen = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, rank, micro))
    return mask_tokens(
        batch["input_ids"],
        batch["attention_mask"],
        vocab.special_ids,
        vocab.mask_id,
        vocab.size,
        cfg.loss.mlm_probability,
        generator=gen,
    )


def host_inputs(
    batch: dict[str, Any], cfg: Config, mlm_ids: torch.Tensor | None, mlm_labels: torch.Tensor | None
) -> tuple[EncoderInputs, torch.Tensor | None, torch.Tensor]:
    """The encoder inputs (MLM copy included), the anchor flags (word level) and the source ids of a
    CPU batch, all still on the CPU."""
    word_level = cfg.model.word_level
    inputs = EncoderInputs.build(
        batch["input_ids"],
        batch["attention_mask"],
        batch["spans"] if word_level else None,
        mlm_ids,
        mlm_labels,
    )
    return inputs, batch["anchored"] if word_level else None, batch["source_ids"]


def step_loss(
    cfg: Config,
    out: Any,
    anchored: torch.Tensor | None,
    rank: int,
    world_size: int,
    source_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, contrastive, mlm, x, y)`` of an encoder output: the contrastive terms (gathered
    across ranks) plus ``loss.mlm_weight`` x MLM; ``x``, ``y`` are the rows the in-batch accuracy
    reads. Translations of one source sentence (multiway corpora) are never each other's negatives."""
    cl, x, y = contrastive_terms(cfg, out, anchored, rank, world_size, source_ids=source_ids)
    mlm = out.mlm_loss.float() if out.mlm_loss is not None else torch.zeros((), device=cl.device)
    return cl + cfg.loss.mlm_weight * mlm, cl, mlm, x, y
