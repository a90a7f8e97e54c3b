"""Ops that move, split or join dims: reshape family, permute, cat, split, indexing.

A reshape maps index blocks (runs of input dims whose sizes multiply to runs of output
dims); a channel dim that becomes two dims (heads x head_dim, groups x per-group) gets
one dim that may shrink and is made uniform along the others. Literal sizes in the
node's arguments are rewritten after pruning (fixers here, run by surgery). Ops that combine
values along dims (reductions, pooling, softmax, matmul) are in ``mixing``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import fx, nn

from idap_fx.graph.layout import Axis, Dynamic, Layout
from idap_fx.graph.ops.merge import Operand, collapse, merge, to_layout
from idap_fx.graph.ops.registry import register
from idap_fx.graph.ops.sizes import (
    arg,
    check_size_args,
    fix_broadcast_to,
    fix_reshape_args,
    fix_shape_args,
    shape_args,
    shape_of,
)


def norm_dim(dim: int, nd: int) -> int:
    """``dim`` as a non-negative index into ``nd`` dims."""
    return dim + nd if dim < 0 else dim


def _blocks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of dims of ``a`` and ``b`` whose sizes multiply to the same number."""
    blocks, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        ia, jb, pa, pb = [], [], 1, 1
        if i < len(a):
            ia.append(i)
            pa *= a[i]
            i += 1
        if j < len(b):
            jb.append(j)
            pb *= b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                ia.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                jb.append(j)
                pb *= b[j]
                j += 1
            else:
                raise ValueError(f"cannot map shape {a} onto {b}")
        blocks.append((ia, jb))
    return blocks


def reshape_layout(
    ctx, node: fx.Node, layout: Layout, src: tuple[int, ...], dst: tuple[int, ...], free_pref=None
):
    """The layout after reshaping ``src`` to ``dst``; ``free_pref(dims)`` picks the dim allowed to shrink."""
    blocks = _blocks(src, dst)
    layout = _pin_inner_axes(ctx, node, layout, blocks, dst)
    axes = []
    for ax in layout.axes:
        hit = [b for b in blocks if set(ax.dims) & set(b[0])]
        if len(hit) > 1 and (spread := _reshape_spread(ctx, node, ax, hit, src, dst)) is not None:
            axes.append(spread)
            continue
        if len(hit) != 1 or not set(ax.dims) <= set(hit[0][0]):
            ctx.coupling.freeze(ax.ids, f"{node.name}: reshape mixes channels across unrelated dims")
            continue
        ins, outs = hit[0]
        others = [a for a in layout.axes if a is not ax and set(a.dims) & set(ins)]
        if others:
            ctx.coupling.freeze(ax.ids, f"{node.name}: reshape merges two channel axes")
            continue
        sizes = [src[d] for d in ins]
        placed = ax.ids.reshape([src[d] if d in ax.dims else 1 for d in ins])
        full = np.broadcast_to(placed, sizes)
        repeats = math.prod(sizes) != ax.ids.size
        out_dims = [d for d in outs if dst[d] > 1]
        if not out_dims:
            ctx.coupling.freeze(ax.ids, f"{node.name}: channels squeezed to a size-1 dim")
            continue
        ids = np.ascontiguousarray(full).reshape([dst[d] for d in out_dims])
        varying = [k for k in range(ids.ndim) if (ids != ids.take([0], axis=k)).any()]
        if len(out_dims) > 1 and len(varying) == 1:
            # a merged batch x heads dim split back: the ids repeat along batch, so the axis is heads alone
            k = varying[0]
            axes.append(
                Axis((out_dims[k],), ids[tuple(slice(None) if j == k else 0 for j in range(ids.ndim))])
            )
            continue
        if len(out_dims) > 1:
            if repeats:
                ctx.coupling.freeze(ax.ids, f"{node.name}: reshape splits a repeated channel dim")
                continue
            free = free_pref(out_dims) if free_pref else out_dims[0]
            collapse(ctx.coupling, ids, [k for k, d in enumerate(out_dims) if d != free], node.name)
            axes.append(Axis(tuple(out_dims), ids, free))
            continue
        axes.append(Axis(tuple(out_dims), ids))
    return Layout(len(dst), tuple(axes))


def _pin_inner_axes(ctx, node: fx.Node, layout: Layout, blocks: list, dst: tuple[int, ...]) -> Layout:
    """Where a reshape merges several channel axes into one dim (multi-query attention's heads with the
    head_dim channels of the one value it read), the merged dim can only lose whole slices of the
    outermost axis: the inner ones are pinned (they always stay) and dropped from the layout."""
    pinned = []
    for ins, outs in blocks:
        inside = [a for a in layout.axes if set(a.dims) <= set(ins)]
        if len([d for d in outs if dst[d] > 1]) != 1 or len(inside) < 2:
            continue
        if len([a for a in layout.axes if set(a.dims) & set(ins)]) != len(inside):
            continue
        outer = min(inside, key=lambda a: min(a.dims))
        if any(min(a.dims) <= max(outer.dims) for a in inside if a is not outer):
            continue
        for a in inside:
            if a is not outer:
                ctx.coupling.pin(a.ids, f"{node.name}: merged inside the units of an outer channel dim")
                pinned.append(a)
    if not pinned:
        return layout
    return Layout(layout.ndim, tuple(a for a in layout.axes if all(a is not p for p in pinned)))


def _reshape_spread(ctx, node: fx.Node, ax: Axis, hit: list, src: tuple[int, ...], dst: tuple[int, ...]):
    """A multi-dim axis whose dims lie in several index blocks, each block becoming one output dim (GQA's
    repeat_kv: (kv_heads, n_rep) -> kv_heads * n_rep beside head_dim). The free dim's block may merge
    broadcast or batch dims into it: its ids repeat, so removing a KV head removes every query head it
    serves (Bloom's batch × heads). A block may also split into several dims if the ids vary along one
    of them only (batch × heads back into batch, heads); the free dim's block may split where they vary
    along more, its outermost such dim shrinking and the inner ones joining its units (Falcon's
    8 slots → 2 key/value groups × (2 query heads, k, v)). None otherwise, or where the other axes share
    the blocks."""
    if ax.free is None:
        return None
    lo, hi = min(hit[0][0]), max(hit[-1][0])
    olo, ohi = min(hit[0][1]), max(hit[-1][1])
    placed = ax.ids.reshape([src[d] if d in ax.dims else 1 for d in range(lo, hi + 1)])
    full = np.broadcast_to(placed, [src[d] for d in range(lo, hi + 1)])
    ids = np.ascontiguousarray(full).reshape([dst[d] for d in range(olo, ohi + 1)])

    def varies(d: int) -> bool:
        k = d - olo
        return bool((ids != ids.take([0], axis=k)).any())

    primary, inner = [], []
    for ins, outs in hit:
        moving = [d for d in outs if dst[d] > 1 and varies(d)]
        if len(moving) > 1:
            if ax.free not in ins:
                return None
            inner.extend(moving[1:])
        wide = [d for d in outs if dst[d] > 1]
        # a block of size 1 (multi-query attention's one key / value slot) stays a dim of size 1
        primary.append(moving[0] if moving else wide[0] if wide else outs[0] if len(outs) == 1 else None)
    if None in primary:
        return None
    dims = sorted(primary + inner)
    ids = ids[tuple(slice(None) if d in dims else 0 for d in range(olo, ohi + 1))]
    free = next(d for (ins, _), d in zip(hit, primary, strict=True) if ax.free in ins)
    collapse(ctx.coupling, ids, [k for k, d in enumerate(dims) if d != free], node.name)
    return Axis(tuple(dims), ids, free)


def _free_by_args(node: fx.Node):
    """Prefer the output dim whose size is computed in the graph (it adapts), else the outermost one
    that is not unbound later (timm's ``reshape(B, N, 3, heads, head_dim)``: the 3 is q|k|v)."""
    args = shape_args(node)
    aligned = len(args) == len(node.meta["tensor_meta"].shape)

    def pick(dims: list[int]) -> int:
        dynamic = [d for d in dims if aligned and isinstance(args[d], fx.Node)]
        if len(dynamic) == 1:
            return dynamic[0]
        return next((d for d in dims if not unbound_later(node, d)), dims[0])

    return pick


def unbound_later(node: fx.Node, dim: int, depth: int = 4) -> bool:
    """Whether ``dim`` of ``node`` reaches an ``unbind`` through at most ``depth`` permutes / transposes."""
    for user in node.users:
        name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
        rest = list(user.args[1:])
        if name == "unbind":
            if (rest[0] if rest else user.kwargs.get("dim", 0)) % len(node.meta["tensor_meta"].shape) == dim:
                return True
        elif depth and name == "permute":
            perm = rest[0] if isinstance(rest[0], (list, tuple)) else rest
            if unbound_later(user, [d % len(perm) for d in perm].index(dim), depth - 1):
                return True
        elif depth and name == "transpose" and len(rest) == 2:
            nd = len(node.meta["tensor_meta"].shape)
            a, b = (r % nd for r in rest)
            if unbound_later(user, {a: b, b: a}.get(dim, dim), depth - 1):
                return True
    return False


@register("view", "reshape", torch.reshape, fix=fix_reshape_args, sizes=True)
def _reshape(ctx, node: fx.Node) -> Layout:
    src = node.args[0]
    lay = ctx.layout(src)
    sizes = shape_args(node)
    whole = ctx.value(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], fx.Node) else None
    if (
        isinstance(whole, Dynamic)
        and whole.shape_of is not None
        and whole.shape_of.ndim == len(ctx.shape(node))
    ):
        return _follow_shape(ctx, node, whole.shape_of)  # ``x.reshape(y.shape)`` is ``x.reshape_as(y)``
    out = reshape_layout(ctx, node, lay, ctx.shape(src), ctx.shape(node), _free_by_args(node))
    check_size_args(ctx, node, lay, out, infer=True)
    return out


@register(
    torch.flatten, "flatten", "unflatten", "squeeze", "unsqueeze", torch.squeeze, torch.unsqueeze, nn.Flatten
)
def _flatten(ctx, node: fx.Node) -> Layout:
    src = node.args[0]
    return reshape_layout(ctx, node, ctx.layout(src), ctx.shape(src), ctx.shape(node))


@register("permute", torch.permute)
def _permute(ctx, node: fx.Node) -> Layout:
    lay = ctx.layout(node.args[0])
    perm = list(node.args[1:]) if node.op == "call_method" else [arg(node, 1, "dims")]
    if len(perm) == 1 and isinstance(perm[0], (list, tuple)):
        perm = list(perm[0])
    perm = [norm_dim(p, lay.ndim) for p in perm]
    return lay.moved({old: new for new, old in enumerate(perm)}, lay.ndim)


@register(getattr)
def _tensor_attribute(ctx, node: fx.Node) -> Layout:
    """``w.T`` / ``w.mT`` (Falcon's ``x @ self.weight.T``): permutations; other tensor attributes have no rule."""
    src, name = node.args[:2]
    lay = ctx.layout(src)
    if name == "T":
        return lay.moved({d: lay.ndim - 1 - d for d in range(lay.ndim)}, lay.ndim)
    if name == "mT" and lay.ndim >= 2:
        mapping = {d: d for d in range(lay.ndim)}
        mapping[lay.ndim - 1], mapping[lay.ndim - 2] = lay.ndim - 2, lay.ndim - 1
        return lay.moved(mapping, lay.ndim)
    raise ValueError(f"tensor attribute {name!r}")


@register("t", torch.t, torch.ops.aten.t.default)
def _t(ctx, node: fx.Node) -> Layout:
    """``w.t()``: swaps the two dims of a matrix (a vector or a scalar passes)."""
    lay = ctx.layout(node.args[0])
    return lay.moved({d: lay.ndim - 1 - d for d in range(lay.ndim)}, lay.ndim)


@register("transpose", "swapaxes", torch.transpose, torch.swapaxes)
def _transpose(ctx, node: fx.Node) -> Layout:
    lay = ctx.layout(node.args[0])
    d0 = norm_dim(arg(node, 1, "dim0"), lay.ndim)
    d1 = norm_dim(arg(node, 2, "dim1"), lay.ndim)
    mapping = {d: d for d in range(lay.ndim)}
    mapping[d0], mapping[d1] = d1, d0
    return lay.moved(mapping, lay.ndim)


@register("expand", fix=fix_shape_args, sizes=True)
def _expand(ctx, node: fx.Node) -> Layout:
    """``x.expand(*sizes)``: broadcast dims; a size-1 fixed sub-dim of a head axis (Falcon's key head beside its
    query heads, once exported) repeats each head's elements, so the head stays one unit."""
    src = node.args[0]
    lay, shape, out = ctx.layout(src), list(ctx.shape(src)), ctx.shape(node)
    off = len(out) - len(shape)
    axes = []
    for ax in lay.axes:
        wide = [d for d in ax.dims if shape[d] == 1 and out[d + off] > 1 and ax.free not in (None, d)]
        if wide:
            for d in wide:
                shape[d] = out[d + off]
            ax = Axis(ax.dims, np.broadcast_to(ax.ids, [shape[d] for d in ax.dims]), ax.free)
        axes.append(ax)
    lay = Layout(lay.ndim, tuple(axes))
    op = Operand(lay, shape, {d: d + off for d in range(len(shape))})
    result = to_layout(len(out), merge(ctx.coupling, node.name, [op]), {d: d for d in range(len(out))})
    check_size_args(ctx, node, lay, result)
    return result


@register(torch.broadcast_to, "broadcast_to", fix=fix_broadcast_to, sizes=True)
def _broadcast_to(ctx, node: fx.Node) -> Layout:
    """``broadcast_to(x, t.shape)`` (Falcon's key / value heads to the query's shape): the output has ``t``'s
    channels; each axis of ``x`` lies on the same dims of an axis of ``t`` and is coupled with it position by
    position, copies along broadcast sub-dims included (a KV head with the query heads it serves).
    Literal sizes are ``expand``."""
    other = shape_of(node.args[1])
    if other is None:
        return _expand(ctx, node)
    src = node.args[0]
    shape, out = ctx.shape(src), ctx.shape(node)
    off = len(out) - len(shape)
    target = ctx.layout(other)
    for ax in ctx.layout(src).axes:
        dims = tuple(d + off for d in ax.dims)
        mine = target.axis_of(dims[0])
        if mine is None or mine.dims != dims:
            ctx.coupling.freeze(ax.ids, f"{node.name}: broadcast onto dims of another channel layout")
            continue
        ctx.coupling.union(np.broadcast_to(ax.ids, mine.ids.shape).ravel(), mine.ids.ravel(), node.name)
    return target


@register("reshape_as", "view_as")
def _reshape_as(ctx, node: fx.Node) -> Layout:
    """``x.reshape_as(y)``: a reshape to ``y``'s shape, which moves with ``y``'s channels after pruning,
    so the output's channel dims are coupled with ``y``'s (where ``y`` has a fixed extent they freeze)."""
    return _follow_shape(ctx, node, ctx.layout(node.args[1]))


def _follow_shape(ctx, node: fx.Node, target: Layout) -> Layout:
    """``node`` reshapes its input to the shape of a tensor laid out as ``target`` (read at run time)."""
    src, shape = node.args[0], ctx.shape(node)
    ident = {d: d for d in range(len(shape))}
    out = reshape_layout(ctx, node, ctx.layout(src), ctx.shape(src), shape)
    operands = [Operand(out, shape, ident), Operand(target, shape, ident)]
    return to_layout(len(shape), merge(ctx.coupling, node.name, operands), ident)


@register("repeat", "tile", torch.tile)
def _repeat(ctx, node: fx.Node) -> Layout:
    """``x.repeat(*sizes)`` / ``tile``: copies along dims; channels pass on dims copied once (a literal 1),
    elsewhere the copies would interleave removed and kept channels, so they freeze."""
    lay = ctx.layout(node.args[0])
    reps = shape_args(node)
    nd = len(ctx.shape(node))
    reps = [1] * (nd - len(reps)) + reps  # tile pads missing leading repeats with 1
    off = nd - lay.ndim
    axes = []
    for ax in lay.axes:
        if all(reps[d + off] == 1 for d in ax.dims):  # a graph value is never known to be 1
            axes.append(ax.moved({d: d + off for d in range(lay.ndim)}))
        else:
            ctx.coupling.freeze(ax.ids, f"{node.name}: repeats a channel dim")
    return Layout(nd, tuple(axes))
