"""Ops that move, split or join dims: reshape family, permute, cat, split, indexing.

A reshape maps index blocks (runs of input dims whose sizes multiply to runs of output
dims); a channel dim that becomes two dims (heads x head_dim, groups x per-group) gets
one dim that may shrink and is made uniform along the others. Literal sizes in the
node's arguments are rewritten after pruning (fixers here, run by surgery). Ops that combine
values along dims (reductions, pooling, softmax, matmul) are in ``mixing``.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from idap_fx.graph.layout import Axis, Dynamic, Layout, all_ids
from idap_fx.graph.ops.merge import Operand, collapse, merge, to_layout
from idap_fx.graph.ops.registry import Rewrite, register


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of ``node``, else its keyword ``name``, else ``default``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


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


def _reshape_spread(ctx, node: fx.Node, ax: Axis, hit: list, src: tuple[int, ...], dst: tuple[int, ...]):
    """A multi-dim axis whose dims lie in several index blocks, each block becoming one output dim (GQA's
    repeat_kv: (kv_heads, n_rep) -> kv_heads * n_rep beside head_dim). The free dim's block may merge
    broadcast dims into it: its ids repeat, so removing a KV head removes every query head it serves.
    None where a block splits into several dims or the other axes share the blocks."""
    if ax.free is None or any(len([d for d in outs if dst[d] > 1]) != 1 for _, outs in hit):
        return None
    lo, hi = min(hit[0][0]), max(hit[-1][0])
    olo, ohi = min(hit[0][1]), max(hit[-1][1])
    placed = ax.ids.reshape([src[d] if d in ax.dims else 1 for d in range(lo, hi + 1)])
    full = np.broadcast_to(placed, [src[d] for d in range(lo, hi + 1)])
    ids = np.ascontiguousarray(full).reshape([dst[d] for d in range(olo, ohi + 1)])
    out_dims = [next(d for d in outs if dst[d] > 1) for _, outs in hit]
    ids = ids[tuple(slice(None) if d in out_dims else 0 for d in range(olo, ohi + 1))]
    free = next(next(d for d in outs if dst[d] > 1) for ins, outs in hit if ax.free in ins)
    collapse(ctx.coupling, ids, [k for k, d in enumerate(out_dims) if d != free], node.name)
    return Axis(tuple(out_dims), ids, free)


def _shape_args(node: fx.Node) -> list[Any]:
    rest = list(node.args[1:]) if node.op == "call_method" else [arg(node, 1, "shape")]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    return rest


def _free_by_args(node: fx.Node):
    """Prefer the output dim whose size is computed in the graph (it adapts), else the outermost."""
    args = _shape_args(node)
    aligned = len(args) == len(node.meta["tensor_meta"].shape)

    def pick(dims: list[int]) -> int:
        dynamic = [d for d in dims if aligned and isinstance(args[d], fx.Node)]
        return dynamic[0] if len(dynamic) == 1 else dims[0]

    return pick


def check_size_args(ctx, node: fx.Node, src: Layout, out: Layout) -> None:
    """Sizes read off another tensor must not change under pruning unless they follow this one.

    ``y.view(b, x.size(1), -1)`` ties ``x``'s channels to ``y``'s: if they are not the
    same channels, both are frozen rather than letting the two drift apart.
    """
    own = set(all_ids(src).tolist())
    args = _shape_args(node)
    for d, arg in enumerate(args):
        value = ctx.value(arg)
        if not isinstance(value, Dynamic) or not value.taint.size:
            continue
        own_shape = value.shape_of is src
        own_size = value.shape_of is None and set(value.taint.tolist()) <= own
        if own_shape or own_size:
            continue
        ctx.coupling.freeze(value.taint, f"{node.name}: takes a size from another tensor")
        if len(args) == len(ctx.shape(node)) and (ax := out.axis_of(d)) is not None:
            ctx.coupling.freeze(ax.ids, f"{node.name}: size set from another tensor")
        elif len(args) != len(ctx.shape(node)):
            ctx.coupling.freeze(all_ids(out), f"{node.name}: shape set from another tensor")


def fix_shape_args(rw: Rewrite, node: fx.Node) -> None:
    """Literal sizes in view/reshape/expand follow the new widths; -1 and graph values adapt.

    The analysis lets ops with this fixer take sizes that pruning changes.
    """
    new = rw.shape(node)
    nested = node.op == "call_method" and len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    if node.op == "call_method" and not nested:
        sizes, rebuild = list(node.args[1:]), lambda s: (node.args[0], *s)
    elif node.op == "call_method":
        sizes, rebuild = list(node.args[1]), lambda s: (node.args[0], type(node.args[1])(s))
    else:
        sizes, rebuild = list(node.args[1]), lambda s: (node.args[0], type(node.args[1])(s), *node.args[2:])
    if len(sizes) != len(new):
        return
    changed = [new[d] if isinstance(s, int) and s > 0 and s != new[d] else s for d, s in enumerate(sizes)]
    if changed != sizes:
        node.args = rebuild(changed)


@register("view", "reshape", torch.reshape, fix=fix_shape_args)
def _reshape(ctx, node: fx.Node) -> Layout:
    src = node.args[0]
    lay = ctx.layout(src)
    out = reshape_layout(ctx, node, lay, ctx.shape(src), ctx.shape(node), _free_by_args(node))
    check_size_args(ctx, node, lay, out)
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


@register("transpose", "swapaxes", torch.transpose, torch.swapaxes)
def _transpose(ctx, node: fx.Node) -> Layout:
    lay = ctx.layout(node.args[0])
    d0 = norm_dim(arg(node, 1, "dim0"), lay.ndim)
    d1 = norm_dim(arg(node, 2, "dim1"), lay.ndim)
    mapping = {d: d for d in range(lay.ndim)}
    mapping[d0], mapping[d1] = d1, d0
    return lay.moved(mapping, lay.ndim)


@register("expand", fix=fix_shape_args)
def _expand(ctx, node: fx.Node) -> Layout:
    src = node.args[0]
    lay, shape, out = ctx.layout(src), ctx.shape(src), ctx.shape(node)
    off = len(out) - len(shape)
    op = Operand(lay, shape, {d: d + off for d in range(len(shape))})
    result = to_layout(len(out), merge(ctx.coupling, node.name, [op]), {d: d for d in range(len(out))})
    check_size_args(ctx, node, lay, result)
    return result


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
        if within is not None:
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
    if ax is not None and len(ax.dims) > 1:
        ctx.coupling.freeze(ax.ids, f"{node.name}: splits a multi-dim channel axis")
    rest = tuple(a for a in lay.axes if a is not ax)
    outs, off = [], 0
    for size in sizes:
        axes = rest
        if ax is not None and len(ax.dims) == 1:
            axes = (*rest, Axis((dim,), ax.ids[off : off + size]))
        outs.append(Layout(lay.ndim, axes))
        off += size
    return tuple(outs)


@register(operator.getitem)
def _getitem(ctx, node: fx.Node) -> Any:
    src, index = node.args
    value = ctx.value(src)
    if isinstance(value, (tuple, list)):
        if not isinstance(index, int):
            raise ValueError("dynamic index into a tuple of tensors")
        return value[index]
    if isinstance(value, Dynamic):
        return Dynamic(node)
    return _index_tensor(ctx, node, value, index)


def _whole(start: Any, stop: Any, step: Any, size: int) -> bool:
    """Whether ``[start:stop:step]`` keeps a dim of ``size`` whole (and stays whole when it shrinks)."""
    return (
        start in (None, 0) and (stop is None or isinstance(stop, int) and stop >= size) and step in (None, 1)
    )


def _empty(start: Any, size: int) -> bool:
    """Whether a slice from ``start`` is empty on a dim of ``size`` (and stays empty when it shrinks)."""
    return isinstance(start, int) and start >= size


def _index_tensor(ctx, node: fx.Node, lay: Layout, index: Any) -> Layout:
    items = list(index) if isinstance(index, tuple) else [index]
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    mapping: dict[int, int] = {}
    dropped: list[int] = []
    empty: list[int] = []
    within: dict[int, np.ndarray] = {}
    i = o = 0
    for it in items:
        if it is None:
            o += 1
        elif it is Ellipsis:
            for _ in range(lay.ndim - consumed):
                mapping[i] = o
                i, o = i + 1, o + 1
        elif isinstance(it, int):
            dropped.append(i)
            i += 1
        elif isinstance(it, slice):
            size = ctx.shape(node.args[0])[i]
            if not _whole(it.start, it.stop, it.step, size):
                kept = _within_unit_slice(lay, i, it, size, ctx.shape(node)[o])
                if kept is not None:  # a dim that never shrinks (head_dim): the positions stay valid
                    within[i] = kept
                else:  # absolute bounds go stale when the dim shrinks; an empty slice stays empty
                    (empty if _empty(it.start, size) else dropped).append(i)
            mapping[i] = o
            i, o = i + 1, o + 1
        else:
            raise ValueError(f"unsupported index {type(it).__name__}")
    while i < lay.ndim:
        mapping[i] = o
        i, o = i + 1, o + 1
    axes = []
    for ax in lay.axes:
        if set(ax.dims) & set(dropped):
            ctx.coupling.freeze(ax.ids, f"{node.name}: indexes into channels")
        elif not set(ax.dims) & set(empty):
            ids = ax.ids
            for d, positions in within.items():
                if d in ax.dims:
                    ids = np.take(ids, positions, axis=ax.dims.index(d))
            axes.append(Axis(ax.dims, ids, ax.free).moved(mapping))
    return Layout(len(ctx.shape(node)), tuple(axes))


def _within_unit_slice(lay: Layout, dim: int, it: slice, size: int, out: int) -> np.ndarray | None:
    """Positions kept by slicing ``dim`` where it is a fixed sub-dim of a multi-dim axis (RoPE's halves of
    head_dim), else None. Bounds computed in the graph are read off the output size: ``[:k]`` keeps the
    first ``out`` positions, ``[k:]`` the last."""
    ax = lay.axis_of(dim)
    if ax is None or len(ax.dims) < 2 or ax.free is None or ax.free == dim or it.step not in (None, 1):
        return None
    if it.start in (None, 0):
        return np.arange(out)
    if it.stop is None or isinstance(it.stop, int) and it.stop >= size:
        return np.arange(size - out, size)
    return None
