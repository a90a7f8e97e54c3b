"""Functional layer forms: ``F.conv*``, ``F.batch_norm``, ``F.group_norm``, ``F.embedding`` ...

Code that calls the functional API with its own parameters (timm's ``BatchNormAct2d``
calling ``F.batch_norm``, a ``Conv3d`` subclass that fx traces through to ``torch.conv3d``)
reads every weight through a ``get_attr`` node. The rules here are the module rules with
the weight's dims taken from that node's layout instead of from the module: the weight's
spaces are unioned with the channels the layer maps, and the slicing follows from the
``get_attr`` members. The ATen spellings (``torch.export`` graphs) share the same code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from idap_fx.graph.layout import Axis, Layout
from idap_fx.graph.ops import aten as aten_rules
from idap_fx.graph.ops import layers
from idap_fx.graph.ops.merge import collapse
from idap_fx.graph.ops.registry import Rewrite, register

aten = torch.ops.aten


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of ``node`` given positionally or as keyword ``name``."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


# --- convolution: torch.conv1d/2d/3d share aten.conv*d's argument order and rule
register(torch.conv1d, torch.conv2d, torch.conv3d, fix=aten_rules._fix_conv)(aten_rules._conv_fn)


def transpose_conv_units(ctx, node: fx.Node, lay: Layout, out_c: int, groups: int) -> tuple[Any, np.ndarray]:
    """(input ids on dim 1, output ids) of a transposed conv; grouped ones are not mapped."""
    if groups != 1:
        raise ValueError("grouped transposed convolution")
    in_ids = layers._channel_axis(ctx, node, lay, 1)
    return in_ids, ctx.coupling.new_space(node.name, out_c)


def _fix_conv_transpose(rw: Rewrite, node: fx.Node) -> None:
    mod = rw.gm.get_submodule(node.target)
    mod.in_channels = mod.weight.shape[0]
    mod.out_channels = mod.weight.shape[1] * mod.groups


@register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, fix=_fix_conv_transpose)
def _conv_transpose(ctx, node: fx.Node) -> Layout:
    """``nn.ConvTranspose*``: the weight is in x out/groups x kernel."""
    mod = ctx.module(node)
    lay = ctx.layout(node.args[0])
    in_ids, out_ids = transpose_conv_units(ctx, node, lay, mod.out_channels, mod.groups)
    ctx.param(node, "weight", 1, "out", out_ids)
    ctx.param(node, "bias", 0, "out", out_ids)
    if in_ids is not None:
        ctx.param(node, "weight", 0, "in", in_ids)
    return Layout(lay.ndim, (Axis((1,), out_ids),))


def _transpose_args(node: fx.Node) -> tuple[Any, Any, Any, int]:
    """(input, weight, bias, groups) of ``conv_transpose*`` / ``aten.convolution(transposed=True)``."""
    if node.target is aten.convolution.default:
        return node.args[0], node.args[1], node.args[2], node.args[8]
    return arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias"), arg(node, 6, "groups", 1)


TRANSPOSE_FUNCTIONS = (
    torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
    *aten_rules._all(aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d),
)  # fmt: skip


@register(*TRANSPOSE_FUNCTIONS)
def _conv_transpose_fn(ctx, node: fx.Node) -> Layout:
    """Functional transposed convolution with its weight (in x out x kernel) as a tensor argument."""
    x, weight, bias, groups = _transpose_args(node)
    lay = ctx.layout(x)
    in_ids, out_ids = transpose_conv_units(ctx, node, lay, ctx.shape(node)[1], groups)
    aten_rules.tie(ctx, node, weight, 1, out_ids)
    aten_rules.tie(ctx, node, bias, 0, out_ids)
    aten_rules.tie(ctx, node, weight, 0, in_ids)
    if in_ids is not None:
        ctx.coupling.input_mask(node.name, 0, (1,), in_ids)  # the mask oracle zeroes consumed channels
    return Layout(lay.ndim, (Axis((1,), out_ids),))


def _fix_convolution(rw: Rewrite, node: fx.Node) -> None:
    if not node.args[6]:  # transposed ones are not grouped (see transpose_conv_units)
        aten_rules._fix_conv(rw, node)


@register(aten.convolution.default, fix=_fix_convolution)
def _convolution(ctx, node: fx.Node) -> Layout:
    """Core ATen's one convolution op: transposed or not."""
    if node.args[6]:
        return _conv_transpose_fn(ctx, node)
    return aten_rules._conv_fn(ctx, node)


# --- per-channel normalisation
@register(F.batch_norm, F.instance_norm)
def _batch_norm_fn(ctx, node: fx.Node) -> Layout:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, ...)`` (``instance_norm`` alike)."""
    lay = ctx.layout(node.args[0])
    names = ("running_mean", "running_var", "weight", "bias")
    aten_rules._per_channel(ctx, node, lay, [arg(node, i + 1, n) for i, n in enumerate(names)])
    if node.target is F.instance_norm:
        if arg(node, 5, "use_input_stats", True):
            aten_rules.batch_statistics(ctx, node, lay, 2)
    elif arg(node, 5, "training", False) or arg(node, 1, "running_mean") is None:
        aten_rules.batch_statistics(ctx, node, lay, 0)
    return lay


@register(torch.batch_norm, torch.instance_norm)
def _torch_batch_norm(ctx, node: fx.Node) -> Layout:
    """``torch.batch_norm(x, weight, bias, running_mean, running_var, ...)``: ATen's argument order."""
    lay = ctx.layout(node.args[0])
    aten_rules._per_channel(ctx, node, lay, list(node.args[1:5]))
    if node.args[5] or (node.target is torch.batch_norm and node.args[3] is None):
        aten_rules.batch_statistics(ctx, node, lay, 0 if node.target is torch.batch_norm else 2)
    return lay


def group_norm_units(ctx, node: fx.Node, ids: np.ndarray, num_groups: int) -> None:
    """GroupNorm over ``ids``: a unit is one whole group (exact); with one group, the channels (inexact).

    Each group is normalised on its own, so removing a whole group leaves the others'
    statistics unchanged. A single group spans every channel: its statistics change
    whatever is removed.
    """
    if num_groups > 1:
        collapse(ctx.coupling, ids.reshape(num_groups, -1), [1], node.name)
    else:
        ctx.coupling.inexact(ids, f"{node.name}: GroupNorm with one group: statistics span the channels")


def _channel_ids(lay: Layout) -> np.ndarray | None:
    ax = lay.axis_of(1)
    if ax is not None and ax.dims != (1,):
        raise ValueError("channel dim is part of a multi-dim axis")
    return None if ax is None else ax.ids


def _fix_group_norm(rw: Rewrite, node: fx.Node) -> None:
    """Whole groups go (the group size stays), unless there is only one group."""
    mod = rw.gm.get_submodule(node.target)
    new_c = rw.shape(node)[1]
    if mod.num_groups > 1:
        mod.num_groups = new_c // (mod.num_channels // mod.num_groups)
    mod.num_channels = new_c


@register(nn.GroupNorm, fix=_fix_group_norm)
def _group_norm(ctx, node: fx.Node) -> Layout:
    mod = ctx.module(node)
    lay = ctx.layout(node.args[0])
    ids = _channel_ids(lay)
    if ids is not None:
        group_norm_units(ctx, node, ids, mod.num_groups)
        ctx.param(node, "weight", 0, "chan", ids)
        ctx.param(node, "bias", 0, "chan", ids)
    return lay


def _group_norm_args(node: fx.Node) -> tuple[int, Any, Any]:
    """(num_groups, weight, bias) of ``F.group_norm`` / ``aten.group_norm`` / ``aten.native_group_norm``."""
    if node.target is aten.native_group_norm.default:
        return node.args[6], node.args[1], node.args[2]
    return arg(node, 1, "num_groups"), arg(node, 2, "weight"), arg(node, 3, "bias")


def _fix_group_norm_fn(rw: Rewrite, node: fx.Node) -> None:
    """``num_groups`` (and core ATen's ``C``) follow the removed groups; the group size stays."""
    groups = _group_norm_args(node)[0]
    old_c = int(node.args[0].meta["tensor_meta"].shape[1])
    new_c = rw.shape(node.args[0])[1]
    new_groups = groups if groups == 1 else new_c // (old_c // groups)
    args = list(node.args)
    if node.target is aten.native_group_norm.default:
        args[4], args[6] = new_c, new_groups
    elif len(args) > 1:
        args[1] = new_groups
    else:
        node.kwargs = {**node.kwargs, "num_groups": new_groups}
    node.args = tuple(args)


@register(F.group_norm, aten.group_norm.default, aten.native_group_norm.default, fix=_fix_group_norm_fn)
def _group_norm_fn(ctx, node: fx.Node) -> Any:
    """Functional GroupNorm with its affine tensors as arguments (core ATen: two statistics outputs)."""
    lay = ctx.layout(node.args[0])
    groups, weight, bias = _group_norm_args(node)
    ids = _channel_ids(lay)
    if ids is not None:
        group_norm_units(ctx, node, ids, groups)
    aten_rules.tie(ctx, node, weight, 0, ids)
    aten_rules.tie(ctx, node, bias, 0, ids)
    if node.target is aten.native_group_norm.default:
        return lay, aten_rules._stats(ctx, node, 1), aten_rules._stats(ctx, node, 2)
    return lay


# --- embedding
@register(F.embedding)
def _embedding_fn(ctx, node: fx.Node) -> Layout:
    """``F.embedding(indices, weight)``: the ATen rule with the arguments swapped."""
    return aten_rules.embed(ctx, node, arg(node, 1, "weight"), arg(node, 0, "input"))
