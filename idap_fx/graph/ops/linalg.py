"""Matrix products with a weight passed as a tensor: ``F.linear``, ``addmm`` and grouped products.

These appear where a layer's weight is read as a plain attribute rather than through an
``nn.Linear`` call: Hugging Face's ``Conv1D`` (GPT-2: ``addmm(b, x, W)`` with ``W`` of
shape in x out) and every ``torch.export`` graph (``aten.linear`` / ``aten.addmm``). The
weight's dims are parameter spaces (``get_attr``); the contraction couples the input's
last dim with the weight's input dim, the output carries the weight's output dim and the
bias's. The reduced input is masked through an input mask (the mask oracle's zeroing).
Mixture-of-Experts layers in transformers 5 run all experts as one grouped product of the tokens
(sorted by expert) with a stacked (experts × in × out) weight: the same contraction per expert,
so position ``j`` of every expert's width is one unit; the experts dim itself never shrinks
(the routing and the per-expert offsets count experts).
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
    return _product(ctx, node, x_index, lay_x, merge(ctx.coupling, node.name, operands, ["K"]))


def _product(ctx, node: fx.Node, x_index: int, lay_x: Layout, axes: list) -> Layout:
    """The output of a product with a weight: it opens the output channels (as ``nn.Linear`` does),
    coupled with the weight's output dim, and the reduced input is masked (the mask oracle's zeroing)."""
    nd = len(ctx.shape(node))
    out_ids = ctx.coupling.new_space(node.name, ctx.shape(node)[-1])
    for m in axes:
        if m.labels == (nd - 1,):
            ctx.coupling.union(out_ids, m.ids, node.name)
    if (k_axis := lay_x.axis_of(lay_x.ndim - 1)) is not None:
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


def _grouped_mm(ctx, node: fx.Node) -> Layout:
    """``grouped_mm(x, W, offs)``: rows of ``x`` (S x K, sorted by expert) times ``W[e]`` (E x K x N)."""
    x, w = node.args[0], _arg(node, 1, "mat2")
    sx, sw = ctx.shape(x), ctx.shape(w)
    if len(sx) != 2 or len(sw) != 3:
        raise ValueError("not a 2-D by 3-D grouped product")
    lay_w = ctx.layout(w)
    experts = [ax for ax in lay_w.axes if 0 in ax.dims]
    for ax in experts:
        ctx.coupling.freeze(ax.ids, f"{node.name}: experts (the routing counts them)")
    lay_w = Layout(3, tuple(ax for ax in lay_w.axes if 0 not in ax.dims))
    lay_x = ctx.layout(x)
    operands = [Operand(lay_x, sx, {0: 0, 1: "K"}), Operand(lay_w, sw, {0: "E", 1: "K", 2: 1})]
    return _product(ctx, node, 0, lay_x, merge(ctx.coupling, node.name, operands, ["K", "E"]))


register(torch.ops.aten._grouped_mm.default, "torch._ops.transformers.transformers::grouped_mm_fallback")(
    _grouped_mm
)
if hasattr(F, "grouped_mm"):
    register(F.grouped_mm)(_grouped_mm)
