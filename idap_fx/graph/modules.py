"""Modules the rewrite puts in place of ones whose constructor cannot express a pruned width.

``nn.MultiheadAttention`` ties its attention width (heads x head_dim) to its input and
output width; after head pruning (or pruning of the residual stream) they differ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention with independent input, attention (heads x head_dim) and output widths.

    Parameter names match ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj``) and so does ``forward``'s signature and result.
    """

    def __init__(
        self,
        in_dim: int,
        num_heads: int,
        head_dim: int,
        out_dim: int,
        *,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        width = num_heads * head_dim
        self.num_heads, self.head_dim, self.batch_first, self.dropout = (
            num_heads,
            head_dim,
            batch_first,
            dropout,
        )
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, in_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width)) if bias else None
        self.out_proj = nn.Linear(width, out_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.Module, head_dim: int) -> PrunedMultiheadAttention:
        """Wrap the (already sliced) parameters of an ``nn.MultiheadAttention`` or of another instance."""
        width = mha.in_proj_weight.shape[0] // 3
        new = cls(
            mha.in_proj_weight.shape[1],
            width // head_dim,
            head_dim,
            mha.out_proj.weight.shape[0],
            bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first,
            dropout=mha.dropout,
        )
        new.in_proj_weight = mha.in_proj_weight
        new.in_proj_bias = mha.in_proj_bias
        new.out_proj = mha.out_proj
        new.out_proj.in_features = width
        new.out_proj.out_features = mha.out_proj.weight.shape[0]
        return new

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        b, lq, ls = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(b, -1, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        mask = additive_mask(attn_mask, key_padding_mask, q.dtype, b, lq, ls, is_causal)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        weights = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = (weights @ v).transpose(1, 2).reshape(b, lq, self.num_heads * self.head_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights


def additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    dtype: torch.dtype,
    b: int,
    lq: int,
    ls: int,
    is_causal: bool,
) -> torch.Tensor | None:
    """Combine boolean / additive masks into one additive mask broadcastable to (b, heads, lq, ls)."""
    total = None
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(lq, ls, dtype=torch.bool).triu(1)
    for m, shape in ((attn_mask, None), (key_padding_mask, (b, 1, 1, ls))):
        if m is None:
            continue
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype).masked_fill(m, float("-inf"))
        m = m.reshape(shape) if shape else (m if m.dim() == 2 else m.reshape(b, -1, lq, ls))
        total = m if total is None else total + m
    return total
