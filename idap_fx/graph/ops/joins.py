"""Ops that join or cut tensors along a dim: ``cat``, ``stack``, ``split`` / ``chunk``.

``cat`` concatenates the pieces' channel ids along a channel dim (and couples the others);
along a fixed sub-dim of a heads x head_dim axis (RoPE's rotate-half) it joins the pieces'
units instead. ``split`` hands each piece its slice of the ids; literal sizes are rewritten
after pruning (``_fix_split``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx

from idap_fx.graph.layout import Axis, Layout
from idap_fx.graph.ops.merge import Operand, collapse, merge, to_layout
from idap_fx.graph.ops.registry import Rewrite, register
from idap_fx.graph.ops.shape import arg, norm_dim


@register(torch.cat, torch.concat, torch.concatenate)
def _cat(ctx, node: fx.Node) -> Layout:
    tensors = [t for t in arg(node, 0, "tensors") if 0 not in ctx.shape(t)]  # empty pieces add nothing
    out = ctx.shape(node)
    nd = len(out)
    dim = norm_dim(arg(node, 1, "dim", 0), nd)
    cut = [ctx.layout(t).axis_of(dim) for t in tensors]
    within = _within_unit_axes(cut, dim)
    pieces, operands = [], []
    for k, (t, ax) in enumerate(zip(tensors, cut, strict=True)):
        lay, shape = ctx.layout(t), ctx.shape(t)
        rest = tuple(a for a in lay.axes if a is not ax)
        if within is not None or all(a is None for a in cut):
            pass
        elif ax is not None and len(ax.dims) == 1:
            pieces.append(ax.ids)
        else:
            if ax is not None:
                ctx.coupling.freeze(ax.ids, f"{node.name}: concatenates a multi-dim channel axis")
            fresh = ctx.coupling.new_space(node.name, shape[dim], f"cat{k}")
            ctx.coupling.freeze(fresh, f"{node.name}: input {t.name} has a fixed size along the cat dim")
            pieces.append(fresh)
        operands.append(Operand(Layout(nd, rest), shape, {d: d for d in range(nd) if d != dim}))
    lay = to_layout(nd, merge(ctx.coupling, node.name, operands), {d: d for d in range(nd) if d != dim})
    if all(ax is None for ax in cut):  # no piece has channels there (a class token joining the patches)
        return lay
    if within is not None:
        return Layout(nd, (*lay.axes, _join_units(ctx, node, within, dim)))
    return Layout(nd, (*lay.axes, Axis((dim,), np.concatenate(pieces))))


def _within_unit_axes(cut: list[Axis | None], dim: int) -> list[Axis] | None:
    """The pieces' axes when ``cat`` runs along a fixed sub-dim (head_dim) of every piece's multi-dim axis,
    over the same dims with the same free dim and unit count (RoPE's rotate-half); else None."""
    first = cut[0] if cut else None
    if first is None or len(first.dims) < 2 or first.free in (None, dim):
        return None
    f = first.dims.index(first.free)
    same = all(
        a is not None
        and a.dims == first.dims
        and a.free == first.free
        and a.ids.shape[f] == first.ids.shape[f]
        for a in cut
    )
    return list(cut) if same else None  # type: ignore[arg-type]


def _join_units(ctx, node: fx.Node, axes: list[Axis], dim: int) -> Axis:
    """One axis whose unit ``j`` joins every piece's unit ``j`` (coupled: they are removed together)."""
    first = axes[0]
    f = first.dims.index(first.free)
    units = [collapse(ctx.coupling, a.ids, [j for j in range(a.ids.ndim) if j != f], node.name) for a in axes]
    for u in units[1:]:
        ctx.coupling.union(units[0], u, node.name)
    return Axis(first.dims, np.concatenate([a.ids for a in axes], axis=first.dims.index(dim)), first.free)


@register(torch.stack)
def _stack(ctx, node: fx.Node) -> Layout:
    tensors = list(arg(node, 0, "tensors"))
    nd = len(ctx.shape(node))
    dim = norm_dim(arg(node, 1, "dim", 0), nd)
    operands = []
    for t in tensors:
        shape = ctx.shape(t)
        operands.append(
            Operand(ctx.layout(t), shape, {d: d if d < dim else d + 1 for d in range(len(shape))})
        )
    return to_layout(nd, merge(ctx.coupling, node.name, operands), {d: d for d in range(nd)})


def _fix_split(rw: Rewrite, node: fx.Node) -> None:
    """``split``/``chunk`` become ``split`` with explicit sizes once the parts differ in width."""
    old_meta = node.meta["tensor_meta"]
    src = node.args[0]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    nd = len(old_meta[0].shape)
    d = dim + nd if dim < 0 else dim
    sizes = [rw.shape(node, i)[d] for i in range(len(old_meta))]
    if sizes == [int(m.shape[d]) for m in old_meta] and node.target in ("split", torch.split):
        return
    node.kwargs = {}
    if node.op == "call_method":
        node.target = "split"
        node.args = (src, sizes, dim)
    else:
        node.target = torch.split
        node.args = (src, sizes, dim)


@register("split", "chunk", torch.split, torch.chunk, fix=_fix_split)
def _split(ctx, node: fx.Node) -> tuple[Layout, ...]:
    src = node.args[0]
    lay, shape = ctx.layout(src), ctx.shape(src)
    dim = norm_dim(arg(node, 2, "dim", 0), len(shape))
    sizes = [int(m.shape[dim]) for m in node.meta["tensor_meta"]]
    ax = lay.axis_of(dim)
    # a fixed sub-dim (GPT-NeoX's fused q|k|v along 3 * head_dim) never shrinks: every piece keeps the units
    within = ax is not None and len(ax.dims) > 1 and ax.free is not None and ax.free != dim
    if ax is not None and len(ax.dims) > 1 and not within:
        ctx.coupling.freeze(ax.ids, f"{node.name}: splits a multi-dim channel axis")
    rest = tuple(a for a in lay.axes if a is not ax)
    outs, off = [], 0
    for size in sizes:
        axes = rest
        if within:
            piece = np.take(ax.ids, np.arange(off, off + size), axis=ax.dims.index(dim))
            axes = (*rest, Axis(ax.dims, piece, ax.free))
        elif ax is not None and len(ax.dims) == 1:
            axes = (*rest, Axis((dim,), ax.ids[off : off + size]))
        outs.append(Layout(lay.ndim, axes))
        off += size
    return tuple(outs)
