"""Ops that combine or move values along dims: reductions, pooling / resizing / padding, softmax, roll / flip,
matmul, attention.

A dim these ops mix is never a channel dim that may shrink, except where the combination
stays exact or is a statistic: ``sum`` over channels masks its input (a removed channel adds
nothing), a statistic over whole channel axes (``mean``, ``var`` ...) makes them inexact (as
LayerNorm), anything else over channels freezes them. Matmul contracts matching channel
axes (attention's q·kᵀ and attn·v couple the heads of q, k and v).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from idap_fx.graph.layout import Axis, Layout
from idap_fx.graph.ops.linalg import contract
from idap_fx.graph.ops.merge import Operand, collapse, merge, to_layout
from idap_fx.graph.ops.registry import register
from idap_fx.graph.ops.shape import arg, norm_dim

REDUCTIONS = ("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm", "prod")


@register(*REDUCTIONS, torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp)
def _reduce(ctx, node: fx.Node) -> Layout:
    src = node.args[0]
    lay = ctx.layout(src)
    nd_in, nd_out = lay.ndim, len(ctx.shape(node))
    dims = arg(node, 1, "dim", None)
    if dims is None:
        reduced = set(range(nd_in))
    else:
        reduced = {norm_dim(d, nd_in) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    keep = nd_out == nd_in
    mapping = {
        d: (d if keep else d - sum(1 for r in reduced if r < d)) for d in range(nd_in) if d not in reduced
    }
    name = (
        node.target if isinstance(node.target, str) else node.target.__name__.split(".")[0]
    )  # aten: sum.dim_IntList
    axes = []
    for ax in lay.axes:
        if not set(ax.dims) & reduced:
            axes.append(ax.moved(mapping))
        elif len(ax.dims) > 1 and ax.free is not None and ax.free not in reduced:
            axes.append(_within_units(ctx, node, ax, reduced, mapping))
        elif name == "sum" and set(ax.dims) <= reduced:
            ctx.coupling.input_mask(node.name, 0, ax.dims, ax.ids)
        elif (
            set(ax.dims) <= reduced
        ):  # a statistic over whole channel axes: shapes survive pruning, values move
            ctx.coupling.inexact(
                ax.ids, f"{node.name}: {name} over channels (a statistic, as in LayerNorm / RMSNorm)"
            )
        else:
            ctx.coupling.freeze(ax.ids, f"{node.name}: {name} over part of a channel axis")
    return Layout(nd_out, tuple(axes))


def _within_units(ctx, node: fx.Node, ax: Axis, reduced: set[int], mapping: dict[int, int]) -> Axis:
    """A reduction over fixed sub-dims only (per-head q/k RMSNorm's mean over head_dim): each unit's value
    depends on that unit alone, so removing whole units stays exact; the axis keeps its other dims."""
    ids = collapse(ctx.coupling, ax.ids, [k for k, d in enumerate(ax.dims) if d in reduced], node.name)
    rest = tuple(d for d in ax.dims if d not in reduced)
    return Axis(rest, ids, ax.free if len(rest) > 1 else None).moved(mapping)


SPATIAL_MODULES = {
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.Upsample: -2, nn.UpsamplingNearest2d: 2,
    nn.UpsamplingBilinear2d: 2, nn.ZeroPad2d: 2, nn.ReflectionPad2d: 2, nn.ReplicationPad2d: 2,
}  # fmt: skip
SPATIAL_FUNCTIONS = {
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool2d: 2,
    F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3, F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
    F.interpolate: -2, F.upsample: -2,
}  # fmt: skip


@register(*SPATIAL_MODULES, *SPATIAL_FUNCTIONS, F.pad)
def _spatial(ctx, node: fx.Node) -> Layout:
    """Pooling/resizing/padding: the trailing spatial dims are mixed; the channel dims pass."""
    src = node.args[0]
    lay = ctx.layout(src)
    if node.op == "call_module":
        n = SPATIAL_MODULES[type(ctx.module(node))]
    elif node.target is F.pad:
        return padded_axes(ctx, node, lay, arg(node, 1, "pad"))
    else:
        n = SPATIAL_FUNCTIONS[node.target]
    if n < 0:
        n = lay.ndim + n
    if len(ctx.shape(node)) != lay.ndim:
        raise ValueError("rank changes")
    return spatial_axes(ctx, node, lay, n)


def padded_axes(ctx, node: fx.Node, lay: Layout, pad: Sequence[Any]) -> Layout:
    """Padding mixes only the dims it pads: ``pad`` pairs run from the last dim backwards, and a pair of
    literal zeros leaves its dim alone (channels-last windows: ``F.pad(x, (0, 0, 0, pw, 0, ph))``)."""
    padded = {lay.ndim - 1 - k for k in range(len(pad) // 2) if not (pad[2 * k] == 0 and pad[2 * k + 1] == 0)}
    return _drop_axes(ctx, node, lay, padded)


def _drop_axes(
    ctx, node: fx.Node, lay: Layout, mixed: set[int], why: str = "channels on a pooled/resized dim"
) -> Layout:
    """``lay`` without the channel axes on ``mixed`` dims, which freeze (``why``)."""
    axes = []
    for ax in lay.axes:
        if set(ax.dims) & mixed:
            ctx.coupling.freeze(ax.ids, f"{node.name}: {why}")
        else:
            axes.append(ax)
    return Layout(lay.ndim, tuple(axes))


@register(torch.triu, torch.tril, "triu", "tril", torch.ops.aten.triu.default, torch.ops.aten.tril.default)
def _triangle(ctx, node: fx.Node) -> Layout:
    """``triu`` / ``tril`` (causal masks) keep entries by position in the last two dims: channels there freeze."""
    lay = ctx.layout(node.args[0])
    return _drop_axes(ctx, node, lay, {lay.ndim - 2, lay.ndim - 1}, "keeps entries by position")


def spatial_axes(ctx, node: fx.Node, lay: Layout, n: int) -> Layout:
    """The layout with its last ``n`` (spatial) dims mixed: channel axes on them are frozen and dropped."""
    return _drop_axes(ctx, node, lay, set(range(lay.ndim - n, lay.ndim)))


@register(nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax")
def _softmax(ctx, node: fx.Node) -> Layout:
    lay = ctx.layout(node.args[0])
    dim = ctx.module(node).dim if node.op == "call_module" else arg(node, 1, "dim")
    if dim is None:
        raise ValueError("implicit softmax dim")
    dim = norm_dim(dim, lay.ndim)
    ax = lay.axis_of(dim)
    if ax is not None:
        ctx.coupling.freeze(ax.ids, f"{node.name}: softmax normalises across channels")
        lay = Layout(lay.ndim, tuple(a for a in lay.axes if a is not ax))
    return lay


@register(F.normalize)
def _normalize(ctx, node: fx.Node) -> Layout:
    """``F.normalize(x, p, dim)``: a norm over ``dim``. Over a fixed sub-dim of a multi-dim axis (head_dim:
    Swin v2's cosine attention, XCiT) it stays inside each unit; over channels it mixes them."""
    lay = ctx.layout(node.args[0])
    dim = norm_dim(arg(node, 2, "dim", 1), lay.ndim)
    ax = lay.axis_of(dim)
    if ax is not None and (len(ax.dims) == 1 or ax.free in (None, dim)):
        ctx.coupling.freeze(ax.ids, f"{node.name}: normalizes across channels")
        lay = Layout(lay.ndim, tuple(a for a in lay.axes if a is not ax))
    return lay


@register(torch.roll, torch.flip, "roll", "flip")
def _roll(ctx, node: fx.Node) -> Layout:
    """``roll`` / ``flip`` move values along ``dims`` (Swin's shifted windows): channel axes elsewhere pass,
    on a moved dim they freeze; ``roll`` without ``dims`` moves the flattened tensor."""
    lay = ctx.layout(node.args[0])
    name = str(getattr(node.target, "__name__", node.target)).split(".")[0]  # aten: roll.default
    dims = arg(node, 2, "dims", None) if name == "roll" else arg(node, 1, "dims")
    if dims is None:
        moved = set(range(lay.ndim))
    else:
        moved = {norm_dim(d, lay.ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    return _drop_axes(ctx, node, lay, moved, f"{name} moves channels")


_VIEWS_OF_WEIGHT = {"T", "mT", "t", "transpose", "permute", torch.t, torch.transpose, torch.permute}
_ATEN_VIEWS_OF_WEIGHT = {"t.default", "transpose.int", "permute.default"}


def _weight_matrix(node: object) -> bool:
    """Whether ``node`` is a parameter matrix, possibly transposed (``self.weight.T``, ``w.t()``)."""
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method"):
        target = node.args[1] if node.target is getattr else node.target
        if target not in _VIEWS_OF_WEIGHT and getattr(target, "__name__", None) not in _ATEN_VIEWS_OF_WEIGHT:
            return False
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op == "get_attr"


@register(operator.matmul, torch.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm")
def _matmul(ctx, node: fx.Node) -> Layout:
    a, b = node.args[0], node.args[1]
    sa, sb, out = ctx.shape(a), ctx.shape(b), ctx.shape(node)
    if len(sa) < 2 or len(sb) < 2:
        raise ValueError("1-D matmul")
    if len(sb) == 2 and _weight_matrix(b):  # ``x @ W.T`` (Falcon's linears): a layer, as F.linear is
        return contract(ctx, node, 0, b, 0, None)
    nd = len(out)
    la = {d: nd - 2 - (len(sa) - 2) + d for d in range(len(sa) - 2)}
    la.update({len(sa) - 2: nd - 2, len(sa) - 1: "K"})
    lb = {d: nd - 2 - (len(sb) - 2) + d for d in range(len(sb) - 2)}
    lb.update({len(sb) - 2: "K", len(sb) - 1: nd - 1})
    lay_a = ctx.layout(a)
    axes = merge(ctx.coupling, node.name, [Operand(lay_a, sa, la), Operand(ctx.layout(b), sb, lb)], ["K"])
    k_axis = lay_a.axis_of(len(sa) - 1)
    if k_axis is not None:
        ctx.coupling.input_mask(node.name, 0, k_axis.dims, k_axis.ids)
    return to_layout(nd, axes, {d: d for d in range(nd)})


@register(torch.baddbmm, "baddbmm", torch.ops.aten.baddbmm.default)
def _baddbmm(ctx, node: fx.Node) -> Layout:
    """``baddbmm(c, a, b)`` = β·c + α·(a @ b) (Bloom's alibi plus q·kᵀ): the batched product, with ``c``
    broadcast onto it as in an addition."""
    c, a, b = node.args[0], arg(node, 1, "batch1"), arg(node, 2, "batch2")
    sa, sb, sc, out = ctx.shape(a), ctx.shape(b), ctx.shape(c), ctx.shape(node)
    nd = len(out)
    operands = [
        Operand(ctx.layout(a), sa, {0: 0, 1: 1, 2: "K"}),
        Operand(ctx.layout(b), sb, {0: 0, 1: "K", 2: 2}),
        Operand(ctx.layout(c), sc, {d: nd - len(sc) + d for d in range(len(sc))}),
    ]
    if (k_axis := ctx.layout(a).axis_of(2)) is not None:  # batch1 by position or by keyword
        ctx.coupling.input_mask(node.name, 1 if len(node.args) > 1 else "batch1", k_axis.dims, k_axis.ids)
    return to_layout(nd, merge(ctx.coupling, node.name, operands, ["K"]), {d: d for d in range(nd)})


def _repeat_heads(lay: Layout, shape: tuple[int, ...], heads: int) -> tuple[Layout, tuple[int, ...]]:
    """``lay`` / ``shape`` with the heads dim (third from last) copied up to ``heads``, each head in place
    ``heads // shape[-3]`` times (``sdpa(..., enable_gqa=True)``'s ``repeat_interleave``)."""
    dim, n_rep = len(shape) - 3, heads // shape[-3]
    axes = tuple(
        Axis(ax.dims, np.repeat(ax.ids, n_rep, axis=ax.dims.index(dim)), ax.free) if dim in ax.dims else ax
        for ax in lay.axes
    )
    return Layout(lay.ndim, axes), (*shape[:dim], heads, *shape[dim + 1 :])


@register(F.scaled_dot_product_attention)
def _sdpa(ctx, node: fx.Node) -> Layout:
    q, k, v = (arg(node, i, name) for i, name in enumerate(("query", "key", "value")))  # ALBERT: by keyword
    sq, sk, sv, out = ctx.shape(q), ctx.shape(k), ctx.shape(v), ctx.shape(node)
    nd = len(out)
    lq = {d: d for d in range(nd - 2)} | {nd - 2: nd - 2, nd - 1: "E"}
    lk = {d: d for d in range(nd - 2)} | {nd - 2: "S", nd - 1: "E"}
    lv = {d: d for d in range(nd - 2)} | {nd - 2: "S", nd - 1: nd - 1}
    lay_q, lay_k, lay_v = ctx.layout(q), ctx.layout(k), ctx.layout(v)
    if (ax := lay_q.axis_of(nd - 1)) is not None and ax.dims == (nd - 1,):
        raise ValueError("head_dim itself is prunable; it sets the softmax scale")
    if arg(node, 7, "enable_gqa") and nd >= 3 and sk[-3] != sq[-3]:
        # each key / value head serves the next sq / sk query heads: a unit is it with them
        (lay_k, sk), (lay_v, sv) = _repeat_heads(lay_k, sk, sq[-3]), _repeat_heads(lay_v, sv, sq[-3])
    operands = [Operand(lay_q, sq, lq), Operand(lay_k, sk, lk), Operand(lay_v, sv, lv)]
    mask = arg(node, 3, "attn_mask")
    # an additive bias per head (BEiT's relative positions) couples to the heads (or pins them)
    if isinstance(mask, fx.Node):
        sm = ctx.shape(mask)
        lm = {j: ("S" if j == len(sm) - 1 else nd - len(sm) + j) for j in range(len(sm))}
        operands.append(Operand(ctx.layout(mask), sm, lm))
    axes = merge(ctx.coupling, node.name, operands, ["E", "S"])
    return to_layout(nd, axes, {d: d for d in range(nd)})
