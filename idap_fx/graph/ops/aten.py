"""ATen ops, as ``torch.export`` graphs hold them: mapped onto the same semantics as the torch-level rules.

An exported graph reads every parameter with ``get_attr`` and calls ATen overloads
(``aten.conv2d.default``, ``aten.linear.default``, ``aten._native_batch_norm_legit_no_training``
...). Most share their argument order with the torch function whose rule they reuse;
the rest (functional convolution and normalisation, ``slice``/``select``, ops that
return tuples) get rules here. Both the export IR (``ep.run_decompositions({})``) and
core ATen (``ep.run_decompositions()``) are covered for the ops common in vision and
transformer models; anything else stays a boundary.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import fx

from idap_fx.graph.layout import Axis, Layout
from idap_fx.graph.ops import creation, elementwise, indexing, joins, layers, linalg, mixing, shape, sizes
from idap_fx.graph.ops.registry import Rewrite, register

aten = torch.ops.aten


def _all(*packets: Any) -> list[Any]:
    """Every overload of each op packet (their tensor arguments come first in all of them)."""
    return [
        getattr(p, name)
        for p in packets
        for name in p.overloads()
        if name not in ("out",) and "out" not in name
    ]


ELEMENTWISE = _all(
    aten.add, aten.sub, aten.mul, aten.div, aten.neg, aten.pow, aten.relu, aten.relu6, aten.gelu, aten.silu,
    aten.sigmoid, aten.tanh, aten.hardtanh, aten.hardswish, aten.hardsigmoid, aten.leaky_relu, aten.elu, aten.mish,
    aten.exp, aten.sqrt, aten.rsqrt, aten.abs, aten.erf, aten.clamp, aten.clamp_min, aten.clamp_max, aten.where,
    aten.maximum, aten.minimum, aten.clone, aten._to_copy, aten.alias, aten.detach, aten.dropout, aten.lift_fresh_copy,
    aten.masked_fill, aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.logical_not, aten.logical_and,
    aten.logical_or, aten.bitwise_not, aten.bitwise_and, aten.bitwise_or, aten.expand_as, aten.reciprocal,
    aten.square, aten.sign, aten.contiguous, aten.rsub, aten.type_as, aten.__and__, aten.__or__,
    aten.relu_, aten.add_, aten.mul_, aten.hardtanh_, aten.silu_, aten.hardswish_, aten.sigmoid_, aten.gelu_,
)  # fmt: skip
register(*ELEMENTWISE)(elementwise._elementwise)

register(
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, fix=sizes.fix_reshape_args, sizes=True
)(shape._reshape)
register(aten.expand.default, fix=sizes.fix_shape_args, sizes=True)(shape._expand)
register(*_all(aten.flatten, aten.unflatten, aten.squeeze, aten.unsqueeze))(shape._flatten)
register(aten.permute.default)(shape._permute)
register(aten.transpose.int)(shape._transpose)
register(aten.cat.default)(joins._cat)
register(aten.stack.default)(joins._stack)
register(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, fix=joins._fix_split)(
    joins._split
)
register(
    aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
    aten.std.correction,
)(mixing._reduce)  # fmt: skip
register(aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default)(
    mixing._softmax
)
register(aten.matmul.default, aten.bmm.default, aten.mm.default)(mixing._matmul)
register(aten.scaled_dot_product_attention.default)(mixing._sdpa)
register(aten.linear.default)(linalg._linear_fn)
register(aten.addmm.default)(linalg._addmm)
register(aten.layer_norm.default, aten.rms_norm.default, fix=layers._fix_layer_norm_fn)(layers._layer_norm_fn)

SPATIAL = {
    aten.adaptive_avg_pool2d.default: 2, aten._adaptive_avg_pool2d.default: 2, aten.adaptive_avg_pool1d.default: 1,
    aten.max_pool2d.default: 2, aten.avg_pool2d.default: 2, aten.max_pool1d.default: 1, aten.avg_pool1d.default: 1,
    aten.upsample_nearest2d.vec: 2, aten.upsample_bilinear2d.vec: 2, aten.upsample_nearest2d.default: 2,
    aten.upsample_bilinear2d.default: 2, aten.max_pool2d_with_indices.default: 2,
}  # fmt: skip


@register(*SPATIAL)
def _pool(ctx, node: fx.Node) -> Any:
    """Pooling and resizing: the trailing spatial dims mix, channel dims pass (with-indices: two outputs)."""
    out = mixing.spatial_axes(ctx, node, ctx.layout(node.args[0]), SPATIAL[node.target])
    return (out, out) if node.target is aten.max_pool2d_with_indices.default else out


@register(aten.constant_pad_nd.default, aten.pad.default)
def _pad(ctx, node: fx.Node) -> Layout:
    return mixing.padded_axes(ctx, node, ctx.layout(node.args[0]), node.args[1])


def _conv_args(node: fx.Node) -> tuple[fx.Node, fx.Node, Any, int]:
    """(input, weight, bias, groups) of ``aten.conv{1,2,3}d`` / ``aten.convolution``."""
    if node.target is aten.convolution.default:
        if node.args[6]:
            raise ValueError("transposed convolution")
        return node.args[0], node.args[1], node.args[2], node.args[8]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    return node.args[0], weight, bias, groups


def _fix_conv(rw: Rewrite, node: fx.Node) -> None:
    """A depthwise conv's ``groups`` follows its channel count."""
    x, weight, _, groups = _conv_args(node)
    old_in = int(x.meta["tensor_meta"].shape[1])
    if groups == 1 or old_in != groups:
        return
    new_groups = rw.shape(x)[1]
    if node.target is aten.convolution.default:
        node.args = (*node.args[:8], new_groups)
    elif len(node.args) > 6:
        node.args = (*node.args[:6], new_groups)
    else:
        node.kwargs = {**node.kwargs, "groups": new_groups}


# aten.convolution (transposed or not) is in ops.functional
CONV_FUNCTIONS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)


@register(*CONV_FUNCTIONS, fix=_fix_conv)
def _conv_fn(ctx, node: fx.Node) -> Layout:
    """Functional convolution with its weight as a tensor: the coupling of ``nn.Conv*`` on the weight's dims."""
    x, weight, bias, g = _conv_args(node)
    lay = ctx.layout(x)
    in_ids = layers._channel_axis(ctx, node, lay, 1)
    out_c, per_in = ctx.shape(weight)[:2]
    out_ids = ctx.coupling.new_space(node.name, out_c)
    tie(ctx, node, weight, 0, out_ids)
    tie(ctx, node, bias, 0, out_ids)
    columns = layers.couple_conv_groups(ctx, node, in_ids, out_ids, g, per_in)
    if columns is not None:
        tie(ctx, node, weight, 1, columns)
    if in_ids is not None and not (g > 1 and per_in == 1):
        ctx.coupling.input_mask(node.name, 0, (1,), in_ids)  # the mask oracle zeroes consumed channels
    return Layout(lay.ndim, (Axis((1,), out_ids),))


def tie(ctx, node: fx.Node, tensor: Any, dim: int, ids: np.ndarray | None) -> None:
    """Couple dim ``dim`` of a weight-like tensor argument with ``ids``.

    A tensor whose dim carries no channels (a weight computed by an opaque op, as weight
    standardisation's) cannot shrink there: ``ids`` are frozen. ``ids=None`` (channels the
    layer does not map) freezes the tensor's dim instead.
    """
    if not isinstance(tensor, fx.Node) or ctx.shape(tensor)[dim] <= 1:  # absent, or broadcast
        return
    t_ax = ctx.layout(tensor).axis_of(dim)
    if ids is None:
        if t_ax is not None:
            ctx.coupling.freeze(t_ax.ids, f"{node.name}: maps fixed channels")
    elif t_ax is None or t_ax.dims != (dim,):
        if t_ax is not None:
            ctx.coupling.freeze(t_ax.ids, f"{node.name}: weight dim {dim} is part of a multi-dim axis")
        ctx.coupling.freeze(ids, f"{node.name}: {tensor.name} has a fixed size on dim {dim}")
    else:
        ctx.coupling.union(ids, t_ax.ids, node.name)


def _per_channel(ctx, node: fx.Node, lay: Layout, tensors: list[Any]) -> None:
    """Couple channel dim 1 of ``lay`` with dim 0 of each per-channel tensor (weight, bias, running stats)."""
    ax = lay.axis_of(1)
    if ax is not None and ax.dims != (1,):
        raise ValueError("channel dim is part of a multi-dim axis")
    for t in tensors:
        tie(ctx, node, t, 0, None if ax is None else ax.ids)


def batch_statistics(ctx, node: fx.Node, lay: Layout, first: int) -> None:
    """Normalisation with statistics of the input itself (batch norm in training mode or without running
    stats: over every dim but 1; instance norm: over dims >= 2): channels on those dims move the
    statistics, as LayerNorm's do (nfnet's weight standardisation: a conv's input channels)."""
    dims = set(range(lay.ndim)) - {1} if first == 0 else set(range(first, lay.ndim))
    for ax in lay.axes:
        if set(ax.dims) & dims:
            ctx.coupling.inexact(ax.ids, f"{node.name}: normalisation statistics over channels")


def _stats(ctx, node: fx.Node, index: int) -> Layout:
    """A side output (saved mean / rstd): its channels are not followed."""
    meta = node.meta["tensor_meta"][index]
    return ctx.frozen_fresh(node, tuple(meta.shape), f"{node.name}: normalisation statistics")


@register(aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default)
def _batch_norm(ctx, node: fx.Node) -> Any:
    lay = ctx.layout(node.args[0])
    _per_channel(ctx, node, lay, list(node.args[1:5]))
    if node.target is aten.batch_norm.default:
        if node.args[5] or node.args[3] is None:
            batch_statistics(ctx, node, lay, 0)
        return lay
    return lay, _stats(ctx, node, 1), _stats(ctx, node, 2)


@register(aten._native_batch_norm_legit.default, aten._native_batch_norm_legit.no_stats)
def _batch_norm_training(ctx, node: fx.Node) -> Any:
    """Batch norm over the input's own statistics (training mode, or no running stats at all)."""
    lay = ctx.layout(node.args[0])
    stats = list(node.args[3:5]) if node.target is aten._native_batch_norm_legit.default else []
    _per_channel(ctx, node, lay, [*node.args[1:3], *stats])
    if node.target is aten._native_batch_norm_legit.no_stats or node.args[5]:
        batch_statistics(ctx, node, lay, 0)
    return lay, _stats(ctx, node, 1), _stats(ctx, node, 2)


def _fix_native_layer_norm(rw: Rewrite, node: fx.Node) -> None:
    k = len(node.args[1])
    node.args = (node.args[0], tuple(rw.shape(node, 0)[-k:]), *node.args[2:])


@register(aten.native_layer_norm.default, fix=_fix_native_layer_norm)
def _native_layer_norm(ctx, node: fx.Node) -> tuple[Layout, ...]:
    """LayerNorm with its affine tensors as arguments; the statistics outputs are not followed."""
    lay = ctx.layout(node.args[0])
    layers._norm_last(ctx, node, lay, len(node.args[1]), False)
    for t in node.args[2:4]:
        if not isinstance(t, fx.Node):
            continue
        t_lay = ctx.layout(t)
        for ax in t_lay.axes:
            x_ax = lay.axis_of(lay.ndim - t_lay.ndim + ax.dims[0])
            if x_ax is None or x_ax.dims != (lay.ndim - t_lay.ndim + ax.dims[0],):
                ctx.coupling.freeze(ax.ids, f"{node.name}: normalises fixed channels")
            else:
                ctx.coupling.union(x_ax.ids, ax.ids, node.name)
    return lay, _stats(ctx, node, 1), _stats(ctx, node, 2)


@register(aten.embedding.default)
def _embedding(ctx, node: fx.Node) -> Layout:
    """``embedding(weight, indices)``."""
    return embed(ctx, node, node.args[0], node.args[1])


def embed(ctx, node: fx.Node, weight: fx.Node, indices: fx.Node) -> Layout:
    """A lookup of ``indices`` in ``weight``: the output's last dim is the weight's dim 1."""
    lay_w, lay_i = ctx.layout(weight), ctx.layout(indices)
    rows = lay_w.axis_of(0)
    if rows is not None:
        ctx.coupling.freeze(rows.ids, f"{node.name}: vocabulary rows are looked up")
    out_ids = ctx.coupling.new_space(node.name, ctx.shape(node)[-1])
    if (cols := lay_w.axis_of(1)) is not None:
        ctx.coupling.union(out_ids, cols.ids, node.name)
    return Layout(lay_i.ndim + 1, (*lay_i.axes, Axis((lay_i.ndim,), out_ids)))


def _slice_args(node: fx.Node, ndim: int) -> tuple[int, Any, Any, Any]:
    """(dim, start, end, step) of ``aten.slice.Tensor``."""
    dim = shape.norm_dim(node.args[1] if len(node.args) > 1 else 0, ndim)
    start, end, step = (list(node.args[2:]) + [None, None, 1][len(node.args[2:]) :])[:3]
    return dim, start, end, step


def _fix_slice(rw: Rewrite, node: fx.Node) -> None:
    """Literal bounds on a dim that lost positions count only the positions kept before them."""
    src = node.args[0]
    size = src.meta["tensor_meta"].shape
    dim, start, end, step = _slice_args(node, len(size))
    if indexing.keeps_whole(start, end, step, size[dim]) or not indexing._literal(slice(start, end, step)):
        return
    keep = rw.kept(src, dim)
    if not keep.all():
        lo, hi, _ = slice(start, end).indices(keep.size)
        node.args = (src, dim, int(keep[:lo].sum()), int(keep[:hi].sum()), *node.args[5:])


@register(aten.slice.Tensor, fix=_fix_slice)
def _slice(ctx, node: fx.Node) -> Layout:
    """``x[..., start:end:step, ...]`` on one dim: the ``getitem`` rule for that one slice (literal bounds on
    a dim that shrinks are rewritten, any slice of a fixed sub-dim such as RoPE's halves stays)."""
    lay = ctx.layout(node.args[0])
    size = ctx.shape(node.args[0])
    dim, start, end, step = _slice_args(node, lay.ndim)
    if indexing.keeps_whole(start, end, step, size[dim]):
        return lay
    return indexing._index_tensor(ctx, node, lay, (*[slice(None)] * dim, slice(start, end, step)))


@register(aten.select.int)
def _select(ctx, node: fx.Node) -> Layout:
    """``x.select(dim, i)`` is ``x[..., i, ...]``: the ``getitem`` rule (an index into a fixed sub-dim, Bloom's
    q / k / v of a fused ``(heads, 3, head_dim)`` view, keeps the units; on a dim that shrinks it freezes)."""
    lay = ctx.layout(node.args[0])
    dim = shape.norm_dim(node.args[1], lay.ndim)
    return indexing._index_tensor(ctx, node, lay, (*[slice(None)] * dim, node.args[2]))


# one rule for x.unbind(dim) in both spellings: a fixed sub-dim keeps units, channels freeze otherwise
register(aten.unbind.int)(indexing._unbind)
register(aten.roll.default, aten.flip.default)(mixing._roll)
register(aten.repeat.default, aten.tile.default)(shape._repeat)


FACTORIES = _all(
    aten.arange, aten.zeros, aten.ones, aten.full, aten.empty, aten.scalar_tensor, aten.new_ones, aten.new_zeros,
    aten.new_full, aten.new_empty,
)  # fmt: skip
register(*FACTORIES)(creation._factory)
