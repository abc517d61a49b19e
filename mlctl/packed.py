"""Unpadded ("packed") execution of BERT-family encoders: the same layers, on real tokens only.

A bucketed batch of short pairs still carries a lot of padding once both sides and the MLM copy
share one ``[R, L]`` grid (about 45% of the positions on the de-en training pairs, batch 32). The
transformers forward runs every projection, GELU, LayerNorm and dropout on those positions too.
Here the real tokens are gathered into one ``[T, H]`` tensor and everything that acts per token runs
on it. The weights are the encoder's own modules, called as modules, so DeepSpeed's ZeRO-3
parameter hooks still fire, checkpoints and exports are unchanged, and the outputs match the
transformers forward to float rounding (``tests/test_packed.py``).

Self-attention needs the row structure. Two ways, same numbers (fp32 rounding):

* ``grid``: q, k, v are scattered back to the ``[R, heads, L, d]`` grid and SDPA gets the key
  padding mask. Faster on a CPU (jagged takes 1.18x its time there: bench/attention.py, in
  bench/RESULTS.md), but a dense boolean mask rules out the flash kernel on CUDA.
* ``jagged``: q, k, v stay packed and SDPA gets nested jagged tensors (``torch.nested``, layout
  ``jagged``) with the rows' offsets: no mask, so CUDA runs the flash (bf16/fp16) or the
  memory-efficient (fp32) variable-length kernel. ``auto`` picks it on CUDA.

Everything that depends on the mask's *values* (token positions, row offsets, lengths) is computed
once on the host by :meth:`Packing.of` from the CPU batch, then moved with the batch: the device is
never read back (no ``nonzero``, no ``.item()``), so the host can queue the next step ahead.

Supported: ``BertModel`` (mBERT, MiniLM, ...) and ``RobertaModel`` / ``XLMRobertaModel`` with
absolute positions. Anything else falls back to the transformers forward (``unsupported_reason``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F

# NOTE: SDPA over jagged tensors on a CPU goes through torch's strided nested tensors, which warn
# once per process that their API is a prototype; the jagged layout used here is the supported one.
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")

_BERT_LIKE = {"BertModel": 0, "RobertaModel": 1, "XLMRobertaModel": 1}  # 1: RoBERTa positions
Attention = Literal["auto", "grid", "jagged"]


def unsupported_reason(encoder: Any) -> str | None:
    """None when ``encoder`` can run packed, else why not (for the log line)."""
    name = type(encoder).__name__
    cfg = encoder.config
    if name not in _BERT_LIKE:
        return f"{name} is not one of {', '.join(sorted(_BERT_LIKE))}"
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return f"{name} is configured as a decoder"
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return f"{name} uses {cfg.position_embedding_type} positions"
    return None


@dataclass
class Packing:
    """Where the real tokens of an ``[R, L]`` batch sit: flat positions ``row * L + col``, row-major.

    The tensors live wherever the batch does (:meth:`to`); the ints were read on the host."""

    index: torch.Tensor  # [T] flat positions of the real tokens
    key_mask: torch.Tensor  # [R, 1, 1, L] bool, True where a key may be attended to (grid)
    offsets: torch.Tensor  # [R + 1] int64, row r's tokens are index[offsets[r]:offsets[r + 1]]
    rows: int
    length: int
    tokens: int  # T
    min_len: int
    max_len: int

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing:
        """The packing of ``attention_mask`` [R, L]. Reads the mask: call it on the CPU copy."""
        mask = attention_mask.bool()
        rows, length = mask.shape
        index = mask.flatten().nonzero().squeeze(1)
        lengths = mask.sum(dim=1)
        keys = mask.clone()
        # A row without real tokens would softmax over nothing (NaN); it has no token to keep.
        keys[~mask.any(dim=1), 0] = True
        offsets = torch.zeros(rows + 1, dtype=torch.int64)
        torch.cumsum(lengths, dim=0, out=offsets[1:])
        return cls(
            index=index,
            key_mask=keys[:, None, None, :],
            offsets=offsets,
            rows=rows,
            length=length,
            tokens=int(index.numel()),
            min_len=int(lengths.min()) if rows else 0,
            max_len=int(lengths.max()) if rows else 0,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Packing:
        return moved(self, device, non_blocking)

    def pin_memory(self) -> Packing:
        return moved(self, pin=True)

    def pack(self, grid: torch.Tensor) -> torch.Tensor:
        """``[R, L, ...]`` -> ``[T, ...]``."""
        return grid.flatten(0, 1).index_select(0, self.index)

    def unpack(self, tokens: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """``[T', H]`` -> ``[rows, L, H]`` with zeros at padding; ``T'`` may be a prefix of ``T``
        covering the first ``rows`` rows."""
        rows = self.rows if rows is None else rows
        flat = tokens.new_zeros(rows * self.length, tokens.shape[-1])
        flat = flat.index_copy(0, self.index[: tokens.shape[0]], tokens)
        return flat.view(rows, self.length, -1)


def moved(
    obj: Any, device: torch.device | str | None = None, non_blocking: bool = False, pin: bool = False
) -> Any:
    """A copy of the dataclass ``obj`` whose tensor fields (and fields that move the same way, such
    as a :class:`Packing`) are pinned (``pin``) or moved to ``device``; other fields kept."""
    changes = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor) or (hasattr(value, "to") and hasattr(value, "pin_memory")):
            changes[f.name] = value.pin_memory() if pin else value.to(device, non_blocking=non_blocking)
    return replace(obj, **changes)


def resolve_attention(kind: Attention, device: torch.device, packing: Packing) -> str:
    """``grid`` or ``jagged`` for this call: ``auto`` is jagged on CUDA. A batch with an empty row
    always runs on the grid (a zero-length sequence has no place in the jagged kernels)."""
    if packing.min_len == 0:
        return "grid"
    if kind == "auto":
        return "jagged" if device.type == "cuda" else "grid"
    return kind


def _positions(encoder: Any, input_ids: torch.Tensor, packing: Packing) -> torch.Tensor:
    if _BERT_LIKE[type(encoder).__name__] == 0:
        # BERT: position j of every row, padded or not (what transformers does too).
        return packing.index % packing.length
    pad = encoder.embeddings.padding_idx
    real = input_ids.ne(pad).long()
    return packing.pack((torch.cumsum(real, dim=1) * real + pad).unsqueeze(-1)).squeeze(-1)


def _grid_attention(q, k, v, packing: Packing, heads: int, dropout: float, scale: float) -> torch.Tensor:
    """SDPA on the ``[R, heads, L, d]`` grid with the key padding mask."""
    d = q.shape[-1] // heads
    grid = packing.unpack(torch.cat([q, k, v], dim=-1))  # [R, L, 3H]
    grid = grid.view(packing.rows, packing.length, 3, heads, d).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(
        grid[0], grid[1], grid[2], attn_mask=packing.key_mask, dropout_p=dropout, scale=scale
    )
    return packing.pack(out.transpose(1, 2).reshape(packing.rows, packing.length, heads * d))


def _jagged_attention(q, k, v, packing: Packing, heads: int, dropout: float, scale: float) -> torch.Tensor:
    """SDPA over nested jagged tensors: each row attends within itself, no mask materialised."""
    d = q.shape[-1] // heads

    def nested(x: torch.Tensor) -> torch.Tensor:
        # [T, heads, d] -> [R, heads, j, d]; the offsets and bounds are the host-side ones, so
        # building the nested tensor reads nothing back from the device.
        nt = torch.nested.nested_tensor_from_jagged(
            x.view(packing.tokens, heads, d),
            packing.offsets,
            min_seqlen=packing.min_len,
            max_seqlen=packing.max_len,
        )
        return nt.transpose(1, 2)

    out = F.scaled_dot_product_attention(nested(q), nested(k), nested(v), dropout_p=dropout, scale=scale)
    return out.transpose(1, 2).values().reshape(packing.tokens, heads * d)


def _self_attention(attn: Any, hidden: torch.Tensor, packing: Packing, kind: str) -> torch.Tensor:
    """The attention core: q, k, v projected on the packed tokens, attention per row."""
    sa = attn.self
    q, k, v = sa.query(hidden), sa.key(hidden), sa.value(hidden)
    run = _jagged_attention if kind == "jagged" else _grid_attention
    return run(
        q,
        k,
        v,
        packing,
        sa.num_attention_heads,
        sa.dropout.p if sa.training else 0.0,
        getattr(sa, "scaling", sa.attention_head_size**-0.5),
    )


def hidden_states(
    encoder: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    keep_last: torch.Tensor | None = None,
    packing: Packing | None = None,
    attention: Attention = "auto",
) -> tuple[list[torch.Tensor], Packing]:
    """Per-layer hidden states of the real tokens: ``[embeddings, layer 1, ..., layer N]``, each
    ``[T, H]`` in the packing's row-major order.

    ``packing``: from :meth:`Packing.of` on the host; without it, it is derived from
    ``attention_mask`` here (which reads the mask: fine on a CPU, a host sync on a GPU).
    ``keep_last``: indices into ``T``; the last layer's attention output projection and
    feed-forward then run on those tokens only (its keys and values still see every token), and the
    last entry is ``[len(keep_last), H]``. The MLM copy needs the last layer only where it was masked.
    """
    if packing is None:
        if attention_mask is None:
            raise ValueError("hidden_states needs a packing or an attention mask")
        packing = Packing.of(attention_mask.cpu()).to(input_ids.device)
    kind = resolve_attention(attention, input_ids.device, packing)
    emb = encoder.embeddings
    ids = packing.pack(input_ids.unsqueeze(-1)).squeeze(-1)
    x = emb.word_embeddings(ids) + emb.token_type_embeddings(torch.zeros_like(ids))
    x = x + emb.position_embeddings(_positions(encoder, input_ids, packing))
    h = emb.dropout(emb.LayerNorm(x))
    states = [h]
    layers = encoder.encoder.layer
    for i, layer in enumerate(layers):
        a = _self_attention(layer.attention, h, packing, kind)
        if keep_last is not None and i == len(layers) - 1:
            a, h = a.index_select(0, keep_last), h.index_select(0, keep_last)
        a = layer.attention.output(a, h)  # dense, dropout, LayerNorm(a + h)
        h = layer.output(layer.intermediate(a), a)
        states.append(h)
    return states, packing
