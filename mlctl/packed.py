"""Unpadded ("packed") execution of BERT-family encoders: the same layers, on real tokens only.

A bucketed batch of short pairs still carries a lot of padding once both sides and the MLM copy
share one ``[R, L]`` grid (about 45% of the positions on the de-en training pairs, batch 32). The
transformers forward runs every projection, GELU, LayerNorm and dropout on those positions too.
Here the real tokens are gathered into one ``[T, H]`` tensor; everything that acts per token runs on
it, and only self-attention scatters back to the grid (it needs the row structure, and for short
rows it is a small share of the work). The weights are the encoder's own modules, called as
modules, so DeepSpeed's ZeRO-3 parameter hooks still fire, checkpoints and exports are unchanged,
and the outputs match the transformers forward to float rounding (``tests/test_packed.py``).

Supported: ``BertModel`` (mBERT, MiniLM, ...) and ``RobertaModel`` / ``XLMRobertaModel`` with
absolute positions. Anything else falls back to the transformers forward (``unsupported_reason``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

_BERT_LIKE = {"BertModel": 0, "RobertaModel": 1, "XLMRobertaModel": 1}  # 1: RoBERTa positions


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
    """Where the real tokens of an ``[R, L]`` batch sit: flat positions ``row * L + col``, row-major."""

    index: torch.Tensor  # [T] flat positions of the real tokens
    rows: int
    length: int
    key_mask: torch.Tensor  # [R, 1, 1, L] bool, True where a key may be attended to

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing:
        mask = attention_mask.bool()
        rows, length = mask.shape
        index = mask.flatten().nonzero().squeeze(1)
        keys = mask.clone()
        # A row without real tokens would softmax over nothing (NaN); it has no token to keep.
        keys[~mask.any(dim=1), 0] = True
        return cls(index, rows, length, keys[:, None, None, :])

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


def _positions(encoder: Any, input_ids: torch.Tensor, packing: Packing) -> torch.Tensor:
    if _BERT_LIKE[type(encoder).__name__] == 0:
        # BERT: position j of every row, padded or not (what transformers does too).
        return packing.index % packing.length
    pad = encoder.embeddings.padding_idx
    real = input_ids.ne(pad).long()
    return packing.pack((torch.cumsum(real, dim=1) * real + pad).unsqueeze(-1)).squeeze(-1)


def _self_attention(attn: Any, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
    """The attention core on the grid: q, k, v projected on the packed tokens, scattered to
    ``[R, heads, L, d]``, SDPA with the key padding mask, gathered back."""
    sa = attn.self
    heads, d = sa.num_attention_heads, sa.attention_head_size
    q, k, v = sa.query(hidden), sa.key(hidden), sa.value(hidden)
    grid = packing.unpack(torch.cat([q, k, v], dim=-1))  # [R, L, 3H]
    grid = grid.view(packing.rows, packing.length, 3, heads, d).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(
        grid[0],
        grid[1],
        grid[2],
        attn_mask=packing.key_mask,
        dropout_p=sa.dropout.p if sa.training else 0.0,
        scale=getattr(sa, "scaling", d**-0.5),
    )
    return packing.pack(out.transpose(1, 2).reshape(packing.rows, packing.length, heads * d))


def hidden_states(
    encoder: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    keep_last: torch.Tensor | None = None,
    packing: Packing | None = None,
) -> tuple[list[torch.Tensor], Packing]:
    """Per-layer hidden states of the real tokens: ``[embeddings, layer 1, ..., layer N]``, each
    ``[T, H]`` in the packing's row-major order.

    ``keep_last``: indices into ``T``; the last layer's attention output projection and
    feed-forward then run on those tokens only (its keys and values still see every token), and the
    last entry is ``[len(keep_last), H]``. The MLM copy needs the last layer only where it was masked.
    """
    packing = packing or Packing.of(attention_mask)
    emb = encoder.embeddings
    ids = packing.pack(input_ids.unsqueeze(-1)).squeeze(-1)
    x = emb.word_embeddings(ids) + emb.token_type_embeddings(torch.zeros_like(ids))
    x = x + emb.position_embeddings(_positions(encoder, input_ids, packing))
    h = emb.dropout(emb.LayerNorm(x))
    states = [h]
    layers = encoder.encoder.layer
    for i, layer in enumerate(layers):
        a = _self_attention(layer.attention, h, packing)
        if keep_last is not None and i == len(layers) - 1:
            a, h = a.index_select(0, keep_last), h.index_select(0, keep_last)
        a = layer.attention.output(a, h)  # dense, dropout, LayerNorm(a + h)
        h = layer.output(layer.intermediate(a), a)
        states.append(h)
    return states, packing
