"""Indexing a tensor (``x[...]``): dims kept, dropped or sliced, and slices that follow pruning.

An integer index or a slice with bounds that would go stale freezes the channels it cuts;
a slice with literal bounds or a literal list of positions on a dim that shrinks keeps its
positions and is rewritten after pruning (``fix_slices``: Phi-3's fused qkv, multi-query
Falcon's ``qkv[..., [-2], :]``); a slice of a dim that never shrinks (head_dim
under RoPE) keeps its positions as they are.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from idap_fx.graph.layout import Axis, Dynamic, Layout
from idap_fx.graph.ops.merge import collapse
from idap_fx.graph.ops.registry import Rewrite, is_tensor_meta, register

QUERY_HEADS = "idap_fx_query_heads"
"""``node.meta`` key of an ``index_select`` that copies key / value heads to their query heads
(written by ``idap_fx.rewrite.repeat_kv``): its input is pinned and every copy is a unit."""


def _source_dims(items: list[Any], ndim: int) -> list[int | None]:
    """The source dim each index item reads (None for ``None`` and ``...``), as ``_index_tensor`` walks them."""
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    dims, i = [], 0
    for it in items:
        if it is None or it is Ellipsis:
            dims.append(None)
            i += ndim - consumed if it is Ellipsis else 0
        else:
            dims.append(i)
            i += 1
    return dims


def _renumber(positions: list[int], keep: np.ndarray) -> list[int]:
    """Listed positions of a dim that kept ``keep``, counted among the kept ones; removed ones leave."""
    before = np.cumsum(keep) - 1
    return [int(before[p]) for p in np.asarray(positions) % keep.size if keep[p]]


def fix_slices(rw: Rewrite, node: fx.Node) -> None:
    """Literal slice bounds and index lists on a dim that lost positions count only the positions kept before them.

    A listed position that was removed leaves the list (its element left the output with it)."""
    src, index = node.args
    meta = src.meta.get("tensor_meta") if isinstance(src, fx.Node) else None
    if not is_tensor_meta(meta) or isinstance(index, int):  # a tuple of tensors: plain item access
        return
    items = list(index) if isinstance(index, tuple) else [index]
    new = list(items)
    for k, (it, dim) in enumerate(zip(items, _source_dims(items, len(meta.shape)), strict=True)):
        if dim is not None and _literal_list(it, items):
            keep = rw.kept(src, dim)
            if not keep.all():
                new[k] = _renumber(it, keep)
            continue
        if (
            not isinstance(it, slice)
            or dim is None
            or not _literal(it)
            or keeps_whole(it.start, it.stop, it.step, meta.shape[dim])
        ):
            continue
        keep = rw.kept(src, dim)
        if not keep.all():
            start, stop, _ = slice(it.start, it.stop).indices(keep.size)
            new[k] = slice(int(keep[:start].sum()), int(keep[:stop].sum()), it.step)
    if new != items:
        node.args = (src, tuple(new) if isinstance(index, tuple) else new[0])


@register(operator.getitem, fix=fix_slices)
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


def _constant_positions(ctx, it: Any) -> Any:
    """A constant 1-D integer index tensor (``get_attr``) as its list of positions; anything else as it is."""
    source = it
    while (
        isinstance(source, fx.Node) and source.target is torch.ops.aten.clone.default
    ):  # export copies constants
        source = source.args[0]
    if not (isinstance(source, fx.Node) and source.op == "get_attr"):
        return it
    value = ctx.gm
    for part in source.target.split("."):
        value = getattr(value, part)
    if (
        isinstance(value, torch.Tensor)
        and value.ndim == 1
        and not value.is_floating_point()
        and value.dtype != torch.bool
    ):
        return [int(k) for k in value.tolist()]
    return it


def _constant(rw: Rewrite, node: fx.Node, name: str, positions: list[int]) -> fx.Node:
    """A new int64 buffer of ``rw.gm`` holding ``positions``, read by a ``get_attr`` before ``node``."""
    value = torch.tensor(positions, dtype=torch.int64)
    rw.gm.register_buffer(name, value)
    with rw.gm.graph.inserting_before(node):
        read = rw.gm.graph.get_attr(name)
    read.meta["tensor_meta"] = _extract_tensor_metadata(value)
    return read


def _drop_unused(rw: Rewrite, old: Any) -> None:
    """Erase the replaced index (its copies and ``get_attr``, and the buffer no node reads any more)."""
    while isinstance(old, fx.Node) and not old.users:
        source = old.args[0] if old.op != "get_attr" and old.args else None
        rw.gm.graph.erase_node(old)
        if old.op == "get_attr" and not any(
            n.op == "get_attr" and n.target == old.target for n in rw.gm.graph.nodes
        ):
            owner, _, attr = old.target.rpartition(".")
            module = rw.gm.get_submodule(owner)
            if attr in module._buffers:
                del module._buffers[attr]
        old = source


def fix_index_positions(rw: Rewrite, node: fx.Node) -> None:
    """``aten.index.Tensor`` with a constant position tensor on a dim that lost positions reads a new
    constant holding the kept positions renumbered (as ``fix_slices`` does for a literal list)."""
    src, indices = node.args
    new = list(indices)
    for dim, it in enumerate(indices):
        positions = _constant_positions(rw, it) if isinstance(it, fx.Node) else None
        if not isinstance(positions, list) or sum(x is not None for x in indices) != 1:
            continue
        keep = rw.kept(src, dim)
        if keep.all():
            continue
        new[dim] = _constant(rw, node, f"_idap_index_{node.name}_{dim}", _renumber(positions, keep))
    if new != list(indices):
        node.args = (src, new)
        for old in indices:
            _drop_unused(rw, old)


@register(torch.ops.aten.index.Tensor, fix=fix_index_positions)
def _aten_index(ctx, node: fx.Node) -> Layout:
    """``aten.index.Tensor(x, [None, ..., idx])``: ``None`` keeps a dim whole; a constant index tensor is
    the literal list it was written as (Falcon's ``qkv[:, :, :, [-2]]`` once exported)."""
    src, indices = node.args
    items = tuple(slice(None) if it is None else _constant_positions(ctx, it) for it in indices)
    return _index_tensor(ctx, node, ctx.layout(src), items)


def keeps_whole(start: Any, stop: Any, step: Any, size: int) -> bool:
    """Whether ``[start:stop:step]`` keeps a dim of ``size`` whole (and stays whole when it shrinks)."""
    return (
        start in (None, 0) and (stop is None or isinstance(stop, int) and stop >= size) and step in (None, 1)
    )


def stays_empty(start: Any, size: int) -> bool:
    """Whether a slice from ``start`` is empty on a dim of ``size`` (and stays empty when it shrinks)."""
    return isinstance(start, int) and start >= size


def _index_tensor(ctx, node: fx.Node, lay: Layout, index: Any) -> Layout:
    items = list(index) if isinstance(index, tuple) else [index]
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    mapping: dict[int, int] = {}
    dropped: list[int] = []
    empty: list[int] = []
    within: dict[int, np.ndarray] = {}
    picked: dict[int, int] = {}
    i = o = 0
    for it in items:
        if it is None:
            o += 1
        elif it is Ellipsis:
            for _ in range(lay.ndim - consumed):
                mapping[i] = o
                i, o = i + 1, o + 1
        elif isinstance(it, int):
            ax = lay.axis_of(i)
            if ax is not None and len(ax.dims) > 1 and ax.free not in (None, i):  # Bloom's q|k|v index
                picked[i] = it % ctx.shape(node.args[0])[i]  # a dim that never shrinks: the index stays right
            else:
                dropped.append(i)
            i += 1
        elif isinstance(it, slice):
            size = ctx.shape(node.args[0])[i]
            if not keeps_whole(it.start, it.stop, it.step, size):
                kept = _slice_positions(lay, i, it, size, ctx.shape(node)[o])
                if kept is not None:  # literal bounds (rewritten after pruning) or a dim that never shrinks
                    within[i] = kept
                else:  # absolute bounds go stale when the dim shrinks; an empty slice stays empty
                    (empty if stays_empty(it.start, size) else dropped).append(i)
            mapping[i] = o
            i, o = i + 1, o + 1
        elif _literal_list(it, items):  # Falcon's fused qkv[..., [-2], :]: positions on one dim
            if lay.axis_of(i) is not None:  # on a dim that shrinks, ``fix_slices`` renumbers the positions
                within[i] = np.asarray(it) % ctx.shape(node.args[0])[i]
            mapping[i] = o
            i, o = i + 1, o + 1
        elif _gather_index(it, items):  # a table read by an index tensor (relative position bias)
            dropped.append(i)  # channels on the gathered dim freeze; the dims after it shift
            i, o = i + 1, o + len(it.meta["tensor_meta"].shape)
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
            dims = ax.dims
            for d in sorted(set(picked) & set(ax.dims), reverse=True):
                ids = np.take(ids, picked[d], axis=dims.index(d))
                dims = tuple(x for x in dims if x != d)
            free = ax.free if len(dims) > 1 else None
            axes.append(Axis(dims, ids, free).moved(mapping))
    return Layout(len(ctx.shape(node)), tuple(axes))


def _literal_list(it: Any, items: list[Any]) -> bool:
    """``it`` is a list of integers and the only advanced index in ``items`` (its dim stays in place)."""
    advanced = [x for x in items if isinstance(x, (list, fx.Node))]
    return isinstance(it, list) and bool(it) and all(isinstance(k, int) for k in it) and len(advanced) == 1


def _gather_index(it: Any, items: list[Any]) -> bool:
    """``it`` is the only tensor in ``items`` and holds integer positions (its dims replace the one it reads)."""
    meta = it.meta.get("tensor_meta") if isinstance(it, fx.Node) else None
    tensors = [x for x in items if isinstance(x, fx.Node)]
    return (
        is_tensor_meta(meta)
        and not meta.dtype.is_floating_point
        and meta.dtype != torch.bool
        and len(tensors) == 1
    )


def _literal(it: slice) -> bool:
    return all(b is None or isinstance(b, int) for b in (it.start, it.stop)) and it.step in (None, 1)


def _slice_positions(lay: Layout, dim: int, it: slice, size: int, out: int) -> np.ndarray | None:
    """Positions of ``dim`` a slice keeps, where they stay right after pruning; else None.

    Literal bounds on a dim that shrinks (a fused qkv projection cut at ``[:q]``, ``[q:q + k]``,
    ``[q + k:]``) are rewritten by ``fix_slices`` to count the kept positions before them. On a fixed
    sub-dim of a multi-dim axis (RoPE's halves of head_dim, GPT-J's even / odd positions), which never
    shrinks, any literal slice stays valid; bounds computed in the graph are read off the output size: ``[:k]`` keeps the first
    ``out`` positions, ``[k:]`` the last."""
    ax = lay.axis_of(dim)
    if ax is None:
        return None
    shrinks = len(ax.dims) == 1 or ax.free == dim
    if shrinks and _literal(it):
        start, stop, _ = slice(it.start, it.stop).indices(size)
        return np.arange(start, stop) if stop > start else None
    if shrinks or ax.free is None:
        return None
    if all(isinstance(b, int) or b is None for b in (it.start, it.stop, it.step)):  # GPT-J's x[..., ::2]
        positions = np.arange(*it.indices(size))
        return positions if positions.size else None
    if it.step not in (None, 1):
        return None
    if it.start in (None, 0):
        return np.arange(out)
    if it.stop is None or isinstance(it.stop, int) and it.stop >= size:
        return np.arange(size - out, size)
    return None


def _select_args(node: fx.Node) -> tuple[fx.Node, int, Any]:
    src = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
    index = node.args[2] if len(node.args) > 2 else node.kwargs["index"]
    return src, dim, index


def fix_select_positions(rw: Rewrite, node: fx.Node) -> None:
    """A constant index of ``index_select`` keeps the positions that stay, renumbered: of the input
    (a removed input position leaves the index), or of the output for a ``QUERY_HEADS`` gather (its
    input is pinned; a removed query head leaves its copy out)."""
    src, dim, index = _select_args(node)
    positions = _constant_positions(rw, index)
    if not isinstance(positions, list):
        return
    dim = dim % len(src.meta["tensor_meta"].shape)
    if node.meta.get(QUERY_HEADS):
        kept = [p for p, k in zip(positions, rw.kept(node, dim), strict=True) if k]
    else:
        kept = _renumber(positions, rw.kept(src, dim))
    if kept == positions:
        return
    new = _constant(rw, node, f"_idap_index_{node.name}", kept)
    node.args = (src, node.args[1] if len(node.args) > 1 else dim, new)
    node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("dim", "index")}
    _drop_unused(rw, index)


@register(torch.index_select, "index_select", torch.ops.aten.index_select.default, fix=fix_select_positions)
def _index_select(ctx, node: fx.Node) -> Layout:
    """``index_select(x, dim, index)`` with a constant index: the positions it reads, as a literal list
    index (renumbered after pruning). A ``QUERY_HEADS`` gather (``rewrite.repeat_kv``: a key / value head
    copied to each of its query heads) pins its input and gives every copy a unit of its own."""
    src, dim, index = _select_args(node)
    lay = ctx.layout(src)
    dim = dim % lay.ndim
    positions = _constant_positions(ctx, index)
    if not isinstance(positions, list):
        for ax in lay.axes:
            if dim in ax.dims:
                ctx.coupling.freeze(ax.ids, f"{node.name}: gathers channels by a computed index")
        return Layout(lay.ndim, tuple(ax for ax in lay.axes if dim not in ax.dims))
    if not node.meta.get(QUERY_HEADS):
        return _index_tensor(ctx, node, lay, tuple([slice(None)] * dim + [positions]))
    # the heads' axis (kv heads x head_dim); with one key / value head only head_dim carries channels
    ax = lay.axis_of(dim) or lay.axis_of(lay.ndim - 1)
    axes = [a for a in lay.axes if a is not ax and dim not in a.dims]
    if ax is None:
        axes.append(Axis((dim,), ctx.coupling.new_space(node.name, len(positions), "copies")))
    else:
        ctx.coupling.pin(ax.ids, f"{node.name}: key / value heads copied to their query heads")
        dims = tuple(sorted(set(ax.dims) | {dim}))
        shape = [len(positions) if d == dim else ax.ids.shape[ax.dims.index(d)] for d in dims]
        ids = ctx.coupling.new_space(node.name, int(np.prod(shape)), "copies").reshape(shape)
        collapse(ctx.coupling, ids, [k for k, d in enumerate(dims) if d != dim], node.name)
        axes.append(Axis(dims, ids, dim if len(dims) > 1 else None))
    return Layout(lay.ndim, tuple(axes))


@register("unbind", torch.unbind)
def _unbind(ctx, node: fx.Node) -> tuple[Layout, ...]:
    """``x.unbind(dim)``: output k is ``x`` indexed by k along ``dim``. On a fixed sub-dim of a multi-dim
    axis (timm's fused ``qkv.reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)``) every
    output keeps whole units; channels on any other ``dim`` freeze."""
    lay = ctx.layout(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim = dim + lay.ndim if dim < 0 else dim
    mapping = {d: d - (d > dim) for d in range(lay.ndim) if d != dim}
    outs: list[list[Axis]] = [[] for _ in range(ctx.shape(node.args[0])[dim])]
    for ax in lay.axes:
        if dim not in ax.dims:
            for axes in outs:
                axes.append(ax.moved(mapping))
        elif len(ax.dims) > 1 and ax.free not in (None, dim):
            dims = tuple(x for x in ax.dims if x != dim)
            for k, axes in enumerate(outs):
                ids = np.take(ax.ids, k, axis=ax.dims.index(dim))
                axes.append(Axis(dims, ids, ax.free if len(dims) > 1 else None).moved(mapping))
        else:
            ctx.coupling.freeze(ax.ids, f"{node.name}: unbinds channels")
    return tuple(Layout(lay.ndim - 1, tuple(axes)) for axes in outs)
