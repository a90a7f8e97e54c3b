"""Matrix products with a weight passed as a tensor: ``F.linear`` and ``addmm``.

These appear where a layer's weight is read as a plain attribute rather than through an
``nn.Linear`` call: Hugging Face's ``Conv1D`` (GPT-2: ``addmm(b, x, W)`` with ``W`` of
shape in x out) and every ``torch.export`` graph (``aten.linear`` / ``aten.addmm``). The
weight's dims are parameter spaces (``get_attr``); the contraction couples the input's
last dim with the weight's input dim, the output carries the weight's output dim and the
bias's. The reduced input is masked through an input mask (the mask oracle's zeroing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from idap_fx.graph.layout import Layout
from idap_fx.graph.ops.merge import Operand, merge, to_layout
from idap_fx.graph.ops.registry import register


def contract(ctx, node: fx.Node, x_index: int, w: fx.Node, w_in_dim: int, bias: object) -> Layout:
    """``x @ W (+ bias)`` over the last dim of ``node.args[x_index]``; ``W``'s input dim is ``w_in_dim``."""
    x = node.args[x_index]
    sx, sw, out = ctx.shape(x), ctx.shape(w), ctx.shape(node)
    if len(sw) != 2:
        raise ValueError("weight is not a matrix")
    nd = len(out)
    lay_x = ctx.layout(x)
    lx = {d: nd - len(sx) + d for d in range(len(sx) - 1)} | {len(sx) - 1: "K"}
    lw = {w_in_dim: "K", 1 - w_in_dim: nd - 1}
    operands = [Operand(lay_x, sx, lx), Operand(ctx.layout(w), sw, lw)]
    if isinstance(bias, fx.Node):
        sb = ctx.shape(bias)
        operands.append(Operand(ctx.layout(bias), sb, {d: nd - len(sb) + d for d in range(len(sb))}))
    axes = merge(ctx.coupling, node.name, operands, ["K"])
    # the product opens the output channels (as nn.Linear does), coupled with the weight's output dim
    out_ids = ctx.coupling.new_space(node.name, out[-1])
    for m in axes:
        if m.labels == (nd - 1,):
            ctx.coupling.union(out_ids, m.ids, node.name)
    k_axis = lay_x.axis_of(len(sx) - 1)
    if k_axis is not None:
        ctx.coupling.input_mask(node.name, x_index, k_axis.dims, k_axis.ids)
    return to_layout(nd, axes, {d: d for d in range(nd)})


def _arg(node: fx.Node, index: int, name: str) -> object:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


@register(F.linear)
def _linear_fn(ctx, node: fx.Node) -> Layout:
    """``F.linear(x, W, b)``: ``W`` is out x in."""
    return contract(ctx, node, 0, _arg(node, 1, "weight"), 1, _arg(node, 2, "bias"))


@register(torch.addmm)
def _addmm(ctx, node: fx.Node) -> Layout:
    """``addmm(b, x, W)`` = ``b + x @ W``: ``W`` is in x out."""
    return contract(ctx, node, 1, node.args[2], 0, node.args[0])
