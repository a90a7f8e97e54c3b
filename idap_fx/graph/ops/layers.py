"""Parametric layers: where channel spaces open (conv/linear outputs) and are consumed.

Grouped convolutions keep their groups balanced: a unit is one in-group position in
every group (or, for depthwise convs, one whole group: input channel + its outputs).
Normalisation layers slice their per-channel parameters; LayerNorm over
channels (and RMSNorm) also marks the group inexact (its statistics change when channels go); GroupNorm
is in ``functional`` (whole groups are its units). Each rule's fixer re-derives the
layer's width attributes from its sliced parameters after pruning.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import stochastic_depth

from idap_fx.graph.layout import Axis, Layout
from idap_fx.graph.modules import PrunedMultiheadAttention
from idap_fx.graph.ops.merge import collapse
from idap_fx.graph.ops.registry import Rewrite, register

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
INSTANCENORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _channel_axis(ctx, node: fx.Node, lay: Layout, dim: int) -> np.ndarray | None:
    """The 1-D ids on ``dim``; other carried dims are frozen (this layer does not map them)."""
    ids = None
    for ax in lay.axes:
        if ax.dims == (dim,):
            ids = ax.ids
        else:
            ctx.coupling.freeze(ax.ids, f"{node.name}: channels on a dim the layer does not map")
    return ids


def _fix_conv(rw: Rewrite, node: fx.Node) -> None:
    """Widths follow the sliced weight; a depthwise conv keeps its multiplier (groups = channels)."""
    mod = rw.gm.get_submodule(node.target)
    per_out = mod.out_channels // mod.groups
    depthwise = mod.groups > 1 and mod.in_channels == mod.groups
    mod.out_channels = mod.weight.shape[0]
    if depthwise:
        mod.groups = mod.out_channels // per_out
        mod.in_channels = mod.groups
    else:
        mod.in_channels = mod.weight.shape[1] * mod.groups


@register(*CONVS, fix=_fix_conv)
def _conv(ctx, node: fx.Node) -> Layout:
    mod = ctx.module(node)
    lay = ctx.layout(node.args[0])
    in_ids = _channel_axis(ctx, node, lay, 1)
    g = mod.groups
    per_in = mod.in_channels // g
    out_ids = ctx.coupling.new_space(node.name, mod.out_channels)
    ctx.param(node, "weight", 0, "out", out_ids)
    ctx.param(node, "bias", 0, "out", out_ids)
    columns = couple_conv_groups(ctx, node, in_ids, out_ids, g, per_in)
    if columns is not None:
        ctx.param(node, "weight", 1, "in", columns)
    return Layout(lay.ndim, (Axis((1,), out_ids),))


def couple_conv_groups(
    ctx, node: fx.Node, in_ids: np.ndarray | None, out_ids: np.ndarray, groups: int, per_in: int
) -> np.ndarray | None:
    """Units of a grouped / depthwise conv; return the input ids along the weight's dim 1 (None if none).

    Depthwise (x multiplier): a unit is one group, its input channel and its outputs (the
    weight's dim 1 has size 1 and holds no channel). Grouped: a unit is one in-group position
    across all groups, so groups stay balanced.
    """
    per_out = out_ids.size // groups
    if groups > 1 and per_in == 1:
        collapse(ctx.coupling, out_ids.reshape(groups, per_out), [1], node.name)
        if in_ids is None:
            ctx.coupling.freeze(out_ids, f"{node.name}: depthwise conv over fixed input channels")
        else:
            ctx.coupling.union(np.repeat(in_ids, per_out), out_ids, node.name)
        return None
    if groups > 1:
        collapse(ctx.coupling, out_ids.reshape(groups, per_out), [0], node.name)
        if in_ids is None:
            return None
        return collapse(ctx.coupling, in_ids.reshape(groups, per_in), [0], node.name)
    return in_ids


def _fix_linear(rw: Rewrite, node: fx.Node) -> None:
    mod = rw.gm.get_submodule(node.target)
    mod.out_features, mod.in_features = mod.weight.shape


@register(nn.Linear, fix=_fix_linear)
def _linear(ctx, node: fx.Node) -> Layout:
    mod = ctx.module(node)
    lay = ctx.layout(node.args[0])
    last = lay.ndim - 1
    keep = []
    for ax in lay.axes:
        if ax.dims == (last,):
            ctx.param(node, "weight", 1, "in", ax.ids)
        elif last in ax.dims:
            ctx.coupling.freeze(ax.ids, f"{node.name}: linear over a multi-dim channel axis")
        else:
            keep.append(ax)
    out_ids = ctx.coupling.new_space(node.name, mod.out_features)
    ctx.param(node, "weight", 0, "out", out_ids)
    ctx.param(node, "bias", 0, "out", out_ids)
    return Layout(lay.ndim, (*keep, Axis((last,), out_ids)))


def _fix_channel_norm(rw: Rewrite, node: fx.Node) -> None:
    rw.gm.get_submodule(node.target).num_features = rw.shape(node)[1]


@register(*BATCHNORMS, *INSTANCENORMS, fix=_fix_channel_norm)
def _channel_norm(ctx, node: fx.Node) -> Layout:
    lay = ctx.layout(node.args[0])
    ax = lay.axis_of(1)
    if ax is not None and ax.dims != (1,):
        raise ValueError("channel dim is part of a multi-dim axis")
    if ax is not None:
        for attr in ("weight", "bias", "running_mean", "running_var"):
            ctx.param(node, attr, 0, "chan", ax.ids)
    return lay


def _norm_last(ctx, node: fx.Node, lay: Layout, k: int, weight_attrs: bool) -> Layout:
    """LayerNorm over the last ``k`` dims: slice its affine params, mark the channels inexact."""
    first = lay.ndim - k
    for ax in lay.axes:
        inside = [d for d in ax.dims if d >= first]
        if not inside:
            continue
        if len(ax.dims) > 1:
            raise ValueError("normalised dims hold a multi-dim channel axis")
        ctx.coupling.inexact(ax.ids, f"{node.name}: LayerNorm statistics span the channels")
        if weight_attrs:
            ctx.param(node, "weight", ax.dims[0] - first, "chan", ax.ids)
            ctx.param(node, "bias", ax.dims[0] - first, "chan", ax.ids)
    return lay


def _fix_layer_norm(rw: Rewrite, node: fx.Node) -> None:
    mod = rw.gm.get_submodule(node.target)
    mod.normalized_shape = tuple(rw.shape(node)[-len(mod.normalized_shape) :])


@register(nn.LayerNorm, nn.RMSNorm, fix=_fix_layer_norm)
def _layer_norm(ctx, node: fx.Node) -> Layout:
    mod = ctx.module(node)
    return _norm_last(ctx, node, ctx.layout(node.args[0]), len(mod.normalized_shape), True)


def _fix_layer_norm_fn(rw: Rewrite, node: fx.Node) -> None:
    """The ``normalized_shape`` argument of ``F.layer_norm`` / ``F.rms_norm`` (and ATen's) follows the widths."""
    shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
    new = tuple(rw.shape(node)[-len(shape) :])
    if len(node.args) > 1:
        node.args = (node.args[0], new, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "normalized_shape": new}


@register(F.layer_norm, F.rms_norm, fix=_fix_layer_norm_fn)
def _layer_norm_fn(ctx, node: fx.Node) -> Layout:
    """``F.layer_norm(x, shape, weight, bias)`` / ``F.rms_norm(x, shape, weight)`` with weight/bias from get_attr nodes."""
    from idap_fx.graph.ops.elementwise import _elementwise

    shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
    _norm_last(ctx, node, ctx.layout(node.args[0]), len(shape), False)
    return _elementwise(ctx, node)  # couples the weight/bias get_attr tensors with the channels


def _fix_prelu(rw: Rewrite, node: fx.Node) -> None:
    mod = rw.gm.get_submodule(node.target)
    mod.num_parameters = mod.weight.numel()


@register(nn.PReLU, fix=_fix_prelu)
def _prelu(ctx, node: fx.Node) -> Layout:
    mod = ctx.module(node)
    lay = ctx.layout(node.args[0])
    if mod.num_parameters > 1:
        ax = lay.axis_of(1)
        if ax is None or ax.dims != (1,):
            raise ValueError("per-channel PReLU over non-channel dim")
        ctx.param(node, "weight", 0, "chan", ax.ids)
    return lay


@register(stochastic_depth)
def _stochastic_depth(ctx, node: fx.Node) -> Layout:
    """Identity in eval, a per-sample scale in training: channels pass through."""
    return ctx.layout(node.args[0])


def _fix_embedding(rw: Rewrite, node: fx.Node) -> None:
    mod = rw.gm.get_submodule(node.target)
    mod.embedding_dim = mod.weight.shape[1]


@register(nn.Embedding, fix=_fix_embedding)
def _embedding(ctx, node: fx.Node) -> Layout:
    mod = ctx.module(node)
    lay = ctx.layout(node.args[0])
    out_ids = ctx.coupling.new_space(node.name, mod.embedding_dim)
    ctx.param(node, "weight", 1, "out", out_ids)
    return Layout(lay.ndim + 1, (*lay.axes, Axis((lay.ndim,), out_ids)))


def _fix_attention(rw: Rewrite, node: fx.Node) -> None:
    """``nn.MultiheadAttention`` cannot hold independent widths: swap in ``PrunedMultiheadAttention``."""
    mod = rw.gm.get_submodule(node.target)
    head_dim = getattr(mod, "head_dim", None) or mod.embed_dim // mod.num_heads
    rw.gm.set_submodule(node.target, PrunedMultiheadAttention.from_mha(mod, head_dim))


@register(nn.MultiheadAttention, PrunedMultiheadAttention, fix=_fix_attention)
def _attention(ctx, node: fx.Node) -> tuple[Layout, Any]:
    """Self-attention: units are whole heads (q, k, v rows and out_proj columns); input and output widths too."""
    mod = ctx.module(node)
    args = list(node.args[:3]) + [node.kwargs.get(k) for k in ("query", "key", "value")[len(node.args) :]]
    if not (args[0] is args[1] is args[2]):
        raise ValueError("query, key and value are different tensors")
    if getattr(mod, "bias_k", None) is not None or getattr(mod, "add_zero_attn", False):
        raise ValueError("bias_k / add_zero_attn")
    if not getattr(mod, "_qkv_same_embed_dim", True):
        raise ValueError("separate q/k/v projection weights")
    lay = ctx.layout(args[0])
    in_ids = _channel_axis(ctx, node, lay, lay.ndim - 1)
    head_dim = getattr(mod, "head_dim", None) or mod.embed_dim // mod.num_heads
    width = mod.in_proj_weight.shape[0] // 3
    heads = ctx.coupling.new_space(node.name, width, "heads")
    collapse(ctx.coupling, heads.reshape(width // head_dim, head_dim), [1], node.name)
    qkv = np.concatenate([heads, heads, heads])
    ctx.param(node, "in_proj_weight", 0, "out", qkv)
    ctx.param(node, "in_proj_bias", 0, "out", qkv)
    if in_ids is not None:
        ctx.param(node, "in_proj_weight", 1, "in", in_ids)
    ctx.param(node, "out_proj.weight", 1, "in", heads)
    out_ids = ctx.coupling.new_space(node.name, mod.out_proj.weight.shape[0])
    ctx.param(node, "out_proj.weight", 0, "out", out_ids)
    ctx.param(node, "out_proj.bias", 0, "out", out_ids)
    out = Layout(lay.ndim, (Axis((lay.ndim - 1,), out_ids),))
    weights_meta = node.meta["tensor_meta"][1]
    weights = None
    if weights_meta is not None:
        weights = ctx.frozen_fresh(node, tuple(weights_meta.shape), f"{node.name}: attention weights")
    return out, weights
