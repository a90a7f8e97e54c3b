"""Swin's window attention (torchvision): heads as units, relative position bias sliced with them.

torchvision calls ``shifted_window_attention(x, qkv_weight, proj_weight, bias, window,
num_heads, shift, ...)`` with the block's parameters read as attributes. Its units are
whole heads: head ``h``'s q, k and v rows of ``qkv_weight``/``qkv_bias``, its columns
of ``proj_weight``, its column of the relative position bias table and its logit scale
(v2). torchvision derives the head width from the *input* width (``C // num_heads``),
so a pruned block cannot run through it; the rewrite calls ``window_attention`` (same
arguments, head width from ``qkv_weight``) and updates ``num_heads``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx
from torchvision.models import swin_transformer as tv_swin

from idap_fx.graph.layout import Axis, Layout
from idap_fx.graph.ops.merge import collapse
from idap_fx.graph.ops.registry import Rewrite, register

_ARGS = (
    "input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads", "shift_size",
    "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training",
)  # fmt: skip


def _shift_mask(
    hp: int, wp: int, window: list[int], shift: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """(windows, N, N) additive mask: -100 between tokens that came from different regions before the roll."""

    def regions(n: int, win: int, s: int) -> torch.Tensor:
        idx = torch.arange(n, device=device)
        return (idx >= n - win).long() + (idx >= n - s).long()

    label = regions(hp, window[0], shift[0])[:, None] * 3 + regions(wp, window[1], shift[1])[None, :]
    label = label.view(hp // window[0], window[0], wp // window[1], window[1]).permute(0, 2, 1, 3)
    label = label.reshape(-1, window[0] * window[1])
    differs = label[:, :, None] != label[:, None, :]
    return differs.to(dtype) * -100.0


def window_attention(
    input: torch.Tensor,
    qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    relative_position_bias: torch.Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
    training: bool = True,
) -> torch.Tensor:
    """Shifted-window multi-head attention on (B, H, W, C) whose head width comes from ``qkv_weight``.

    Computes what torchvision's ``shifted_window_attention`` computes, but the input,
    attention (``num_heads`` x head width) and output widths may all differ.
    """
    b, h, w, _ = input.shape
    wh, ww = window_size
    x = F.pad(input, (0, 0, 0, (-w) % ww, 0, (-h) % wh))
    hp, wp = x.shape[1], x.shape[2]
    shift = (0 if wh >= hp else shift_size[0], 0 if ww >= wp else shift_size[1])
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    n, nh, nw = wh * ww, hp // wh, wp // ww
    tokens = x.view(b, nh, wh, nw, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, n, -1)
    if logit_scale is not None and qkv_bias is not None:
        third = qkv_bias.numel() // 3  # Swin v2 has no key bias
        qkv_bias = torch.cat([qkv_bias[:third], torch.zeros_like(qkv_bias[:third]), qkv_bias[2 * third :]])
    head_dim = qkv_weight.shape[0] // (3 * num_heads)
    qkv = F.linear(tokens, qkv_weight, qkv_bias).reshape(tokens.shape[0], n, 3, num_heads, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim**-0.5) @ k.transpose(-2, -1)
    attn = attn + relative_position_bias
    if any(shift):
        mask = _shift_mask(hp, wp, window_size, shift, x.device, attn.dtype)
        attn = (attn.view(b, nh * nw, num_heads, n, n) + mask[None, :, None]).view(-1, num_heads, n, n)
    attn = F.dropout(attn.softmax(-1), p=attention_dropout, training=training)
    out = (attn @ v).transpose(1, 2).reshape(tokens.shape[0], n, num_heads * head_dim)
    out = F.dropout(F.linear(out, proj_weight, proj_bias), p=dropout, training=training)
    out = out.view(b, nh, nw, wh, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if any(shift):
        out = torch.roll(out, shifts=shift, dims=(1, 2))
    return out[:, :h, :w, :].contiguous()


def _bound(node: fx.Node) -> dict[str, Any]:
    return dict(zip(_ARGS, node.args, strict=False)) | dict(node.kwargs)


def _axis_ids(lay: Layout, dim: int, size: int, what: str) -> np.ndarray | None:
    """The ids on ``dim`` (None for a size-1 dim, which carries none: one head left)."""
    ax = lay.axis_of(dim)
    if ax is None and size == 1:
        return None
    if ax is None or ax.dims != (dim,) or ax.ids.size != size:
        raise ValueError(f"{what} carries no plain channel axis on dim {dim}")
    return ax.ids


def _fix_window_attention(rw: Rewrite, node: fx.Node) -> None:
    """Call ``window_attention`` with the number of heads left after pruning."""
    args = _bound(node)
    old_rows = int(args["qkv_weight"].meta["tensor_meta"].shape[0])
    head_dim = old_rows // (3 * args["num_heads"])
    heads = rw.shape(args["qkv_weight"])[0] // (3 * head_dim)
    args["num_heads"] = heads
    defaults = {k: p.default for k, p in inspect.signature(window_attention).parameters.items()}
    node.target = window_attention
    node.args, node.kwargs = (
        tuple(args.get(k, defaults[k]) for k in _ARGS),
        {},
    )  # positional: input masks index args


@register(tv_swin.shifted_window_attention, window_attention, fix=_fix_window_attention)
def _window_attention(ctx, node: fx.Node) -> Layout:
    """Heads of q, k, v, proj columns, bias and logit scale go together; input and output widths are groups."""
    args = _bound(node)
    x, qkv_w, proj_w = args["input"], args["qkv_weight"], args["proj_weight"]
    heads = args["num_heads"]
    if not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in (qkv_w, proj_w)):
        raise ValueError("attention weights are not parameters of the model")
    rows, c_in = ctx.shape(qkv_w)
    c_out, width = ctx.shape(proj_w)
    if rows != 3 * width or width % heads:
        raise ValueError("qkv / proj widths do not match the head count")
    head_dim = width // heads
    lay_x = ctx.layout(x)
    lay_qkv, lay_proj = ctx.layout(qkv_w), ctx.layout(proj_w)

    # every per-head tensor, as ids of shape (heads, head_dim) or (heads,)
    q, k, v = _axis_ids(lay_qkv, 0, rows, "qkv_weight").reshape(3, heads, head_dim)
    per_head = [q, k, v, _axis_ids(lay_proj, 1, width, "proj_weight").reshape(heads, head_dim)]
    if isinstance(args.get("qkv_bias"), fx.Node):
        per_head.extend(
            _axis_ids(ctx.layout(args["qkv_bias"]), 0, rows, "qkv_bias").reshape(3, heads, head_dim)
        )
    for other in per_head[1:]:
        ctx.coupling.union(per_head[0], other, node.name)
    unit = collapse(ctx.coupling, per_head[0], [1], node.name)
    ctx.coupling.union(ctx.coupling.new_space(node.name, heads, "heads"), unit, node.name)  # opened here
    per_unit = [_axis_ids(ctx.layout(args["relative_position_bias"]), 1, heads, "relative_position_bias")]
    if isinstance(args.get("logit_scale"), fx.Node):
        per_unit.append(_axis_ids(ctx.layout(args["logit_scale"]), 0, heads, "logit_scale"))
    for ids in per_unit:
        if ids is not None:
            ctx.coupling.union(unit, ids, node.name)
    ctx.coupling.input_mask(
        node.name, 2, (1,), per_head[3].ravel()
    )  # the mask oracle zeroes removed heads' proj columns

    in_axis = lay_x.axis_of(3)
    if in_axis is not None:
        ctx.coupling.union(
            _axis_ids(lay_x, 3, c_in, "input"), _axis_ids(lay_qkv, 1, c_in, "qkv_weight"), node.name
        )
        ctx.coupling.input_mask(node.name, 0, (3,), in_axis.ids)
    for ax in lay_x.axes:
        if ax is not in_axis:
            ctx.coupling.freeze(ax.ids, f"{node.name}: channels on a windowed dim")
    out_ids = ctx.coupling.new_space(node.name, c_out)
    ctx.coupling.union(out_ids, _axis_ids(lay_proj, 0, c_out, "proj_weight"), node.name)
    if isinstance(args.get("proj_bias"), fx.Node):
        ctx.coupling.union(
            out_ids, _axis_ids(ctx.layout(args["proj_bias"]), 0, c_out, "proj_bias"), node.name
        )
    return Layout(lay_x.ndim, (Axis((3,), out_ids),))


@register(tv_swin._get_relative_position_bias)
def _relative_position_bias(ctx, node: fx.Node) -> Layout:
    """``table[index]`` viewed as (1, heads, N, N): the table's head column becomes dim 1."""
    table, index = node.args[0], node.args[1]
    lay = ctx.layout(table)
    heads = ctx.shape(table)[1]
    looked_up = [ax for ax in lay.axes if ax.dims != (1,)] + list(ctx.layout(index).axes)
    for ax in looked_up:
        ctx.coupling.freeze(ax.ids, f"{node.name}: relative positions are looked up, not pruned")
    ids = _axis_ids(lay, 1, heads, "relative position table")
    return Layout(4, () if ids is None else (Axis((1,), ids),))


@register(tv_swin._patch_merging_pad)
def _patch_merging(ctx, node: fx.Node) -> Layout:
    """2x2 neighbours concatenated on the channel dim: the output holds each input channel four times."""
    lay = ctx.layout(node.args[0])
    last = lay.ndim - 1
    axes = []
    for ax in lay.axes:
        if ax.dims == (last,):
            axes.append(Axis((last,), np.concatenate([ax.ids] * 4)))
        else:
            ctx.coupling.freeze(ax.ids, f"{node.name}: channels on a merged spatial dim")
    return Layout(lay.ndim, tuple(axes))
