"""The ML-CTL encoder: a BERT-like masked LM, layer-averaged mean pooling, and the fusion MLP.

Architecture only: no DeepSpeed, no collectives, no checkpoint policy (those live in the engine).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mlctl import packed
from mlctl.hub import resolve_model_path

log = logging.getLogger(__name__)


def _no_hub_kernels() -> dict[str, Any]:
    """transformers >= 5.25 kernelizes every loaded model by default: it swaps layers for code from
    the Hub at load and on each ``train()``/``eval()``. mlctl runs its own packed attention over
    the encoder's weights, so it loads the plain torch layers; transformers before 4.53 has no
    such switch (and no hub kernels)."""
    import transformers
    from packaging.version import Version

    return {"use_kernels": False} if Version(transformers.__version__) >= Version("4.53") else {}


class EncoderOutput(NamedTuple):
    """What the encoder returns. A tuple on purpose: DeepSpeed finds the output tensors of a forward
    in tuples, lists and dicts (not in a dataclass) and hangs its backward prologue on them, which
    under ZeRO clears and tracks the gradients of each backward (without it, ZeRO-1 + bf16 added
    earlier micro-batches' gradients again)."""

    sentence: torch.Tensor  # [R, H] sentence vectors s
    fused: torch.Tensor | None  # [R, 2H] MLP(concat(s, w)), when anchor spans were given
    mlm_loss: torch.Tensor | None  # scalar, 0.5 * (MLM(x) + MLM(y)), when masked inputs were given


@dataclass
class MaskedTokens:
    """Where the MLM copy was masked, read on the host from its labels.

    Positions are in the order the packed encoder meets them (row-major): every masked token of a
    source row comes before those of the target rows, so ``x_count`` splits the two sides."""

    keep_last: torch.Tensor  # [clean tokens + M]: what the packed encoder's last layer runs on
    flat: torch.Tensor  # [M] row * L + col in the call's [2R, L] grid (the padded forward)
    labels: torch.Tensor  # [M] the original token ids
    x_count: int  # masked tokens on source rows
    # Each side's mean is scaled by its weight. A chunk of a larger batch (mlctl.gradcache) gets its
    # share of the batch's masked tokens, so the chunks' losses add up to the batch's mean.
    x_weight: float = 1.0
    y_weight: float = 1.0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskedTokens:
        return packed.moved(self, device, non_blocking)

    def pin_memory(self) -> MaskedTokens:
        return packed.moved(self, pin=True)


@dataclass
class EncoderInputs:
    """One encoder call: the clean rows (source rows, then target rows) and, for MLM, their masked
    copy, with everything that depends on the mask's values derived on the host by :meth:`build`.

    Build it from CPU tensors, then move it with :meth:`to`: the forward never reads the device
    back (no ``nonzero``, no ``.item()``), so on a GPU the host can run ahead of the kernels."""

    input_ids: torch.Tensor  # [R, L], or [2R, L] with the masked copy after the clean rows
    attention_mask: torch.Tensor  # same shape
    rows: int  # R clean rows: 2B for a batch of B pairs
    clean_tokens: int  # real tokens in the clean rows
    packing: packed.Packing
    spans: torch.Tensor | None = None  # [R, 2] inclusive anchor-word spans (word-level term)
    masked: MaskedTokens | None = None

    @classmethod
    def build(
        cls,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        spans: torch.Tensor | None = None,
        mlm_input_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
    ) -> EncoderInputs:
        """From CPU tensors (it reads them): ``mlm_labels`` holds -100 where nothing was masked."""
        rows = input_ids.shape[0]
        ids, mask = input_ids, attention_mask
        if mlm_input_ids is not None and mlm_labels is not None:
            ids = torch.cat([input_ids, mlm_input_ids], dim=0)
            mask = torch.cat([attention_mask, attention_mask], dim=0)
        packing = packed.Packing.of(mask)
        clean_tokens = int(attention_mask.bool().sum())
        masked = None
        if mlm_input_ids is not None and mlm_labels is not None:
            labels = torch.cat([torch.full_like(mlm_labels, -100), mlm_labels], dim=0)
            flat_labels = packing.pack(labels.unsqueeze(-1)).squeeze(-1)
            at = (flat_labels != -100).nonzero().squeeze(1)  # positions among the packed tokens
            flat = packing.index[at]
            source_rows_end = (rows + rows // 2) * packing.length  # masked copies of the x rows
            masked = MaskedTokens(
                keep_last=torch.cat([torch.arange(clean_tokens), at]),
                flat=flat,
                labels=flat_labels[at],
                x_count=int((flat < source_rows_end).sum()),
            )
        return cls(ids, mask, rows, clean_tokens, packing, spans, masked)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EncoderInputs:
        return packed.moved(self, device, non_blocking)

    def pin_memory(self) -> EncoderInputs:
        return packed.moved(self, pin=True)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [R, T, H] over positions where ``mask`` [R, T] is true.

    Sums run in (at least) float32 and the result comes back in ``hidden``'s dtype: a bf16 sum over
    128 tokens would otherwise carry ~1% error into every sentence vector. Rows with an empty mask
    give zeros."""
    compute = torch.promote_types(hidden.dtype, torch.float32)
    m = mask.to(compute).unsqueeze(-1)
    total = (hidden.to(compute) * m).sum(dim=1)
    count = m.sum(dim=1).clamp_min(1.0)
    return (total / count).to(hidden.dtype)


def span_mask(spans: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean [R, T] mask of the inclusive token spans ``spans`` [R, 2] = (start, end)."""
    pos = torch.arange(length, device=spans.device).unsqueeze(0)
    return (pos >= spans[:, :1]) & (pos <= spans[:, 1:2])


def pool_layers(
    hidden_states: tuple[torch.Tensor, ...], layers: list[int], mask: torch.Tensor
) -> torch.Tensor:
    """Average over ``layers`` of the masked mean of each layer's hidden states."""
    pooled = [masked_mean(hidden_states[i], mask) for i in layers]
    return torch.stack(pooled, dim=0).mean(dim=0)


class FusionMLP(nn.Module):
    """MLP(concat(s, w)) with Linear(2H, 2H) -> ReLU -> Linear(2H, 2H)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(2 * hidden_size, 2 * hidden_size)
        self.fc2 = nn.Linear(2 * hidden_size, 2 * hidden_size)

    def forward(self, sentence: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(torch.cat([sentence, word], dim=-1))))


class MLCTLModel(nn.Module):
    """Wraps a ``*ForMaskedLM`` model whose MLM decoder is tied to the input embeddings."""

    def __init__(
        self, mlm_model: nn.Module, pool_layers: list[int], unpad: bool = True, attention: str = "auto"
    ):
        super().__init__()
        self.mlm: Any = mlm_model  # a transformers *ForMaskedLM
        cfg: Any = mlm_model.config
        self.hidden_size: int = cfg.hidden_size
        self.num_layers: int = cfg.num_hidden_layers
        self.pool_layers = self._normalise_layers(pool_layers)
        self.fusion = FusionMLP(cfg.hidden_size)
        # Training runs the encoder on real tokens only where the architecture allows (mlctl.packed).
        why_not = packed.unsupported_reason(self.encoder) if unpad else None
        self.unpad = unpad and why_not is None
        # How the packed path attends (mlctl.packed): "auto" is the mask-free jagged kernel on CUDA.
        self.attention: packed.Attention = attention  # type: ignore[assignment]
        if why_not is not None:
            log.info("model.unpad: %s; using the padded transformers forward", why_not)

    def _normalise_layers(self, layers: list[int]) -> list[int]:
        out = []
        for layer in layers:
            idx = layer if layer > 0 else self.num_layers + 1 + layer
            if not 1 <= idx <= self.num_layers:
                raise ValueError(
                    f"pool layer {layer} is out of range for a {self.num_layers}-layer encoder "
                    f"(use 1..{self.num_layers} or -1..-{self.num_layers})"
                )
            out.append(idx)
        return out

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        pool_layers: list[int] | None = None,
        unpad: bool = True,
        attention: str = "auto",
        head_matters: bool = True,
    ) -> MLCTLModel:
        """The encoder with its MLM head. ``head_matters=False`` (eval, export: the head is never
        used, or comes from a checkpoint) logs a fresh head at DEBUG instead of WARNING."""
        from transformers import AutoModelForMaskedLM

        path = resolve_model_path(name_or_path)
        mlm, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True, **_no_hub_kernels())
        missing = [k for k in info.get("missing_keys", []) if "decoder.weight" not in k]
        if missing:
            # all-MiniLM-L6-v2 and other sentence encoders ship without an MLM head: its transform
            # and bias start fresh; the decoder is still tied to the pretrained embeddings.
            log.log(
                logging.WARNING if head_matters else logging.DEBUG,
                "%s: %d MLM-head weights not in the checkpoint, initialised fresh: %s",
                name_or_path,
                len(missing),
                ", ".join(sorted(missing)[:6]),
            )
        return cls(mlm, pool_layers or [1, -1], unpad, attention)

    @property
    def encoder(self) -> nn.Module:
        return self.mlm.base_model

    @property
    def config(self):
        return self.mlm.config

    def _lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # `cls` is BERT's prediction head (transform + tied decoder); other encoders expose
        # their head as the module holding the output embeddings.
        # NOTE: explicit None checks; a head that defines __len__ (nn.Sequential) is falsy when empty.
        head = getattr(self.mlm, "cls", None)
        if head is None:
            head = getattr(self.mlm, "lm_head", None)
        if head is None:
            raise TypeError(f"{type(self.mlm).__name__} has no MLM head (cls or lm_head)")
        return head(hidden)

    def forward(self, inputs: EncoderInputs) -> EncoderOutput:
        """One encoder call over the ``R`` clean rows of ``inputs`` (R = 2B, x rows first).

        With a masked copy (``inputs.masked``) it rides in the same call (2R rows); the MLM head runs
        only at masked positions, so its vocabulary projection costs ~15% of a full one.
        """
        rows = inputs.rows
        run = self._packed_states if self.unpad else self._padded_states
        clean, masked = run(inputs)
        clean_mask = inputs.attention_mask[:rows].bool()
        sentence = pool_layers(clean, self.pool_layers, clean_mask)
        fused = None
        if inputs.spans is not None:
            word = pool_layers(
                clean, self.pool_layers, span_mask(inputs.spans, clean_mask.shape[1]) & clean_mask
            )
            fused = self.fusion(sentence, word)
        mlm_loss = None
        if inputs.masked is not None and masked is not None:
            mlm_loss = self._mlm_loss(masked, inputs.masked, sentence[:1])
        return EncoderOutput(sentence=sentence, fused=fused, mlm_loss=mlm_loss)

    # Both return (clean, masked): ``clean[i]`` the [R, L, H] states of layer i for the clean rows
    # (only the pooled layers are filled), and the last layer's states [M, H] at the masked
    # positions of the MLM rows (None without them).

    def _padded_states(self, inputs: EncoderInputs):
        out = self.encoder(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, output_hidden_states=True
        )
        hs = out.hidden_states
        masked = None
        if inputs.masked is not None:
            masked = hs[-1].flatten(0, 1).index_select(0, inputs.masked.flat)
        return tuple(h[: inputs.rows] for h in hs), masked

    def _packed_states(self, inputs: EncoderInputs, layers: list[int] | None = None):
        packing = inputs.packing
        layers = self.pool_layers if layers is None else layers
        keep = inputs.masked.keep_last if inputs.masked is not None else None
        states, _ = packed.hidden_states(
            self.encoder, inputs.input_ids, keep_last=keep, packing=packing, attention=self.attention
        )
        n = inputs.clean_tokens
        clean: list[torch.Tensor | None] = [
            packing.unpack(h[:n], inputs.rows) if i in self.pool_layers else None
            for i, h in enumerate(states)
        ]
        masked = states[-1][n:] if inputs.masked is not None else None
        return clean, masked

    def _mlm_loss(self, hidden: torch.Tensor, masked: MaskedTokens, fallback: torch.Tensor) -> torch.Tensor:
        """0.5 * (MLM(x) + MLM(y)) from the last-layer states ``hidden`` [M, H] at the masked
        positions (source rows' first). ``fallback`` is any [1, H] input for the head when a side
        has nothing masked."""
        losses = []
        total = masked.labels.shape[0]
        sides = ((slice(0, masked.x_count), masked.x_weight), (slice(masked.x_count, total), masked.y_weight))
        for side, weight in sides:
            if side.stop == side.start:
                # Nothing masked on this side (short rows): still run the head, with weight 0, so
                # every parameter gets a gradient. Otherwise this rank's gradient buckets differ
                # from the other ranks' and the data-parallel reduction exchanges mismatched
                # messages (gloo aborts with "op.preamble.length <= op.nbytes").
                losses.append(self._lm_logits(fallback).float().sum() * 0.0)
                continue
            logits = self._lm_logits(hidden[side])
            # at least float32 (a float64 model stays float64, for exact reference checks)
            loss = F.cross_entropy(
                logits.to(torch.promote_types(logits.dtype, torch.float32)), masked.labels[side]
            )
            losses.append(loss if weight == 1.0 else loss * weight)
        return 0.5 * (losses[0] + losses[1])

    @torch.no_grad()
    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int] | None = None
    ) -> torch.Tensor:
        """Sentence vectors for inference (no anchor word, no MLP). Reads the mask on the host (a
        sync when it lives on a GPU): :meth:`encode_inputs` takes inputs built on the CPU instead."""
        inputs = EncoderInputs.build(input_ids.cpu(), attention_mask.cpu()).to(input_ids.device)
        return self.encode_inputs(inputs, layers)

    @torch.no_grad()
    def encode_inputs(self, inputs: EncoderInputs, layers: list[int] | None = None) -> torch.Tensor:
        """Sentence vectors of ``inputs``' rows, pooled over ``layers`` (default: the model's)."""
        use = self._normalise_layers(layers) if layers else self.pool_layers
        if self.unpad:
            clean, _ = self._packed_states(inputs, use)
        else:
            clean, _ = self._padded_states(inputs)
        return pool_layers(clean, use, inputs.attention_mask[: inputs.rows].bool())


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special_ids: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking on a copy: pick ``probability`` of real, non-special tokens; of those 80% become
    [MASK], 10% a random token, 10% stay. Returns (masked copy, labels with -100 where unpicked)."""
    ids = input_ids.clone()
    labels = input_ids.clone()
    eligible = attention_mask.bool() & ~torch.isin(input_ids, special_ids)
    u = torch.rand(ids.shape, generator=generator)
    picked = eligible & (u < probability)
    labels[~picked] = -100
    r = torch.rand(ids.shape, generator=generator)
    to_mask = picked & (r < 0.8)
    to_random = picked & (r >= 0.8) & (r < 0.9)
    ids[to_mask] = mask_token_id
    random_tokens = torch.randint(vocab_size, ids.shape, generator=generator, dtype=ids.dtype)
    ids[to_random] = random_tokens[to_random]
    return ids, labels
