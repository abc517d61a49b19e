"""The DeepSpeed side of a run: its JSON config from the typed config, AdamW's parameter groups, the
learning-rate schedule, and the engine around a model."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from mlctl.config import Config

log = logging.getLogger(__name__)


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config from the typed config (``deepspeed.extra`` merged last)."""
    b, gas = cfg.data.batch_size, cfg.train.grad_accum
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": b,
        "gradient_accumulation_steps": gas,
        "train_batch_size": b * gas * world_size,
        "gradient_clipping": cfg.train.grad_clip,
        # NOTE: DeepSpeed's default buckets are 5e8 elements (2 GB of fp32 each); a few tens of
        # millions keep the same overlap for encoders of this size at a tenth of the memory.
        "zero_optimization": {
            "stage": cfg.deepspeed.zero_stage,
            "reduce_bucket_size": 50_000_000,
            "allgather_bucket_size": 50_000_000,
        },
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16"},
        "fp16": {"enabled": cfg.deepspeed.precision == "fp16", "initial_scale_power": 12},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.precision == "bf16":
        # NOTE: bf16.enabled alone makes DeepSpeed (0.19) accumulate gradients over micro-batches
        # and all-reduce / reduce-scatter them in bf16 (8 bits of mantissa): sums over many ranks
        # and micro-batches then lose the small gradients. fp32 for both; accumulation in fp32 is
        # ZeRO >= 1 only (ZeRO-0 raises "unsupported mix"), so ZeRO-0 keeps bf16 accumulation.
        ds["communication_data_type"] = "fp32"
        if cfg.deepspeed.zero_stage >= 1:
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
        elif gas > 1:
            log.warning(
                "deepspeed.precision=bf16 with zero_stage=0 accumulates %d micro-batches' gradients in "
                "bf16 (DeepSpeed accumulates in fp32 from ZeRO-1 on); set deepspeed.zero_stage=1",
                gas,
            )
    for key, value in cfg.deepspeed.extra.items():
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Multiplier of the peak rate: linear warmup, then constant (the paper), linear or cosine decay.

    NOTE: after warmup this is transformers' ``get_{constant,linear,cosine}_schedule_with_warmup``
    exactly (tests/test_checkpoint.py checks it); their warmup is one step behind (step 0 runs at
    lr 0, a wasted step), so this stays rather than change the trained trajectory."""
    warmup, total, kind = cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.schedule

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(cfg: Config, model: torch.nn.Module, world_size: int, device: torch.device) -> Any:
    """``deepspeed.initialize`` with AdamW, the schedule, ZeRO and precision from ``cfg``."""
    import deepspeed

    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.train.weight_decay),
        lr=cfg.train.lr,
        betas=(cfg.train.betas[0], cfg.train.betas[1]),
        # One kernel over all parameters instead of ~10 passes of elementwise ops (12 vs 120 ms
        # a step for 22.7M fp32 parameters on one CPU core); what transformers' Trainer
        # defaults to as well. ZeRO hands it the flat fp32 partitions.
        fused=True,
    )
    schedule = lr_lambda(cfg)
    engine, _, _, _ = deepspeed.initialize(
        # NOTE: without device_rank DeepSpeed picks cuda:LOCAL_RANK, wrong for a Ray worker
        # that sees one GPU (cuda:0) with local rank 1.
        args=SimpleNamespace(device_rank=device.index or 0),
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(cfg, world_size),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    return engine
