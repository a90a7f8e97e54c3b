"""Tensor factories (``arange``, ``zeros``, ``new_ones`` ...): fresh tensors that carry no channels.

Their sizes are literals or values read off other tensors; a size that pruning would
change freezes the channels it was read from (the analyzer does that for every rule),
so the new tensor's extent never changes and it holds no prunable channel.
"""

from __future__ import annotations

import torch
from torch import fx

from idap_fx.graph.layout import Layout
from idap_fx.graph.ops.registry import register

FACTORIES = (
    torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.as_tensor, torch.eye,
    torch.linspace, "new_ones", "new_zeros", "new_full", "new_empty", "new_tensor",
)  # fmt: skip


@register(*FACTORIES)
def _factory(ctx, node: fx.Node) -> Layout:
    return Layout(len(ctx.shape(node)))


@register("timm.layers.attention.resolve_self_attn_mask")
def _mask_from_shape(ctx, node: fx.Node) -> Layout:
    """timm's ``resolve_self_attn_mask(n, scores, attn_mask, is_causal)``: a causal mask built from ``n``
    (the scores lend dtype and device only) or the given mask; declined when that mask carries channels."""
    given = node.args[2] if len(node.args) > 2 else node.kwargs.get("attn_mask")
    value = ctx.value(given) if isinstance(given, fx.Node) else None
    if isinstance(value, Layout) and value.axes:
        raise ValueError("the given mask carries channels")
    return Layout(len(ctx.shape(node)))
