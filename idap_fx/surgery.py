"""Applying a plan: ``prune`` slices channels out, ``mask`` zeroes what consumes them.

Both walk the same plan over the same dependency graph, on a deep copy of the input.
``prune`` slices every member parameter, re-derives module attributes that encode a
width (``out_channels``, ``num_features``, ``normalized_shape`` ...), and rewrites the
literal sizes baked into graph arguments (``view``/``reshape`` shapes, split sizes),
so nothing goes stale. ``mask`` keeps every shape and zeroes the consumer side of each
removed channel; it is the oracle ``prune`` is tested against.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from idap_fx.analysis import analyze
from idap_fx.dependency import DependencyGraph, Plan
from idap_fx.layout import Layout
from idap_fx.modules import PrunedMultiheadAttention
from idap_fx.ops.layers import BATCHNORMS, CONVS, INSTANCENORMS
from idap_fx.ops.registry import is_tensor_meta, lookup


def _split_name(qualname: str) -> tuple[str, str]:
    owner, _, attr = qualname.rpartition(".")
    return owner, attr


def _new_shape(layout: Any, shape: tuple[int, ...], removed: np.ndarray) -> list[int]:
    """The shape of a tensor with layout ``layout`` once ``removed`` elements are gone."""
    out = list(shape)
    if isinstance(layout, Layout):
        for ax in layout.axes:
            keep = ~removed[ax.ids]
            for k, d in enumerate(ax.dims):
                other = tuple(i for i in range(keep.ndim) if i != k)
                out[d] = int(keep.any(axis=other).sum()) if other else int(keep.sum())
    return out


class _Rewrite:
    """The shared state of one prune: new shapes per node, the module copy, the removal mask."""

    def __init__(self, gm: fx.GraphModule, dg: DependencyGraph, removed: np.ndarray) -> None:
        self.gm = gm
        self.dg = dg
        self.removed = removed

    def shape(self, node: fx.Node, index: int | None = None) -> list[int]:
        meta = node.meta["tensor_meta"]
        layout = self.dg.layouts.get(node.name)
        if index is not None:
            meta, layout = meta[index], layout[index]
        return _new_shape(layout, tuple(meta.shape), self.removed)

    def slice_parameters(self) -> None:
        cuts: dict[str, dict[int, np.ndarray]] = {}
        for m in self.dg.members:
            cuts.setdefault(m.param, {}).setdefault(m.dim, m.ids)
        replaced: dict[int, torch.Tensor] = {}  # one tensor under several names (tied weights) stays one
        for qualname, dims in cuts.items():
            owner_name, attr = _split_name(qualname)
            owner = self.gm.get_submodule(owner_name)
            tensor = getattr(owner, attr)
            if id(tensor) in replaced:
                if isinstance(tensor, nn.Parameter):
                    setattr(owner, attr, replaced[id(tensor)])
                else:
                    owner._buffers[attr] = replaced[id(tensor)]
                continue
            new, changed = tensor.detach(), False
            for dim, ids in dims.items():
                keep = ~self.removed[ids]
                if not keep.all():
                    new = new.index_select(dim, torch.as_tensor(np.nonzero(keep)[0], device=new.device))
                    changed = True
            if not changed:
                continue
            fresh = (
                nn.Parameter(new.clone(), requires_grad=tensor.requires_grad)
                if isinstance(tensor, nn.Parameter)
                else new.clone()
            )
            replaced[id(tensor)] = fresh
            if isinstance(tensor, nn.Parameter):
                setattr(owner, attr, fresh)
            else:
                owner._buffers[attr] = fresh

    def resync_modules(self) -> None:
        done: set[str] = set()
        for node in self.gm.graph.nodes:
            if node.op != "call_module" or node.target in done:
                continue
            done.add(node.target)
            mod = self.gm.get_submodule(node.target)
            if isinstance(mod, (nn.MultiheadAttention, PrunedMultiheadAttention)):
                head_dim = getattr(mod, "head_dim", None) or mod.embed_dim // mod.num_heads
                self.gm.set_submodule(node.target, PrunedMultiheadAttention.from_mha(mod, head_dim))
                continue
            for types, fix in _MODULE_FIXERS:
                if isinstance(mod, types):
                    fix(self, node, mod)
                    break

    def fix_arguments(self) -> None:
        for node in list(self.gm.graph.nodes):
            if node.op not in ("call_function", "call_method"):
                continue
            rule = lookup(node, self.gm)
            if rule is not None and rule.fix is not None:
                (rule.fix if callable(rule.fix) else _ARG_FIXERS[rule.fix])(self, node)

    def update_meta(self) -> None:
        """Keep node shapes current so the pruned graph can be analysed again without inputs."""
        for node in self.gm.graph.nodes:
            if node.op == "output":  # no layout of its own; its inputs carry the shapes
                continue
            meta = node.meta.get("tensor_meta")
            if is_tensor_meta(meta):
                node.meta["tensor_meta"] = meta._replace(shape=torch.Size(self.shape(node)))
            elif isinstance(meta, (tuple, list)) and any(is_tensor_meta(m) for m in meta):
                # tuples (max_pool with indices) and lists (ATen split / chunk) alike
                node.meta["tensor_meta"] = type(meta)(
                    m._replace(shape=torch.Size(self.shape(node, i))) if is_tensor_meta(m) else m
                    for i, m in enumerate(meta)
                )


def _fix_conv(rw: _Rewrite, node: fx.Node, mod: nn.Module) -> None:
    per_out = mod.out_channels // mod.groups
    depthwise = mod.groups > 1 and mod.in_channels == mod.groups
    mod.out_channels = mod.weight.shape[0]
    if depthwise:
        mod.groups = mod.out_channels // per_out
        mod.in_channels = mod.groups
    else:
        mod.in_channels = mod.weight.shape[1] * mod.groups


def _fix_linear(rw: _Rewrite, node: fx.Node, mod: nn.Linear) -> None:
    mod.out_features, mod.in_features = mod.weight.shape


def _fix_channel_norm(rw: _Rewrite, node: fx.Node, mod: nn.Module) -> None:
    mod.num_features = rw.shape(node)[1]


def _fix_layer_norm(rw: _Rewrite, node: fx.Node, mod: nn.LayerNorm | nn.RMSNorm) -> None:
    k = len(mod.normalized_shape)
    mod.normalized_shape = tuple(rw.shape(node)[-k:])


def _fix_group_norm(rw: _Rewrite, node: fx.Node, mod: nn.GroupNorm) -> None:
    """Whole groups go (the group size stays), unless there is only one group."""
    new_c = rw.shape(node)[1]
    if mod.num_groups > 1:
        mod.num_groups = new_c // (mod.num_channels // mod.num_groups)
    mod.num_channels = new_c


def _fix_prelu(rw: _Rewrite, node: fx.Node, mod: nn.PReLU) -> None:
    mod.num_parameters = mod.weight.numel()


def _fix_conv_transpose(rw: _Rewrite, node: fx.Node, mod: nn.Module) -> None:
    mod.in_channels = mod.weight.shape[0]
    mod.out_channels = mod.weight.shape[1] * mod.groups


def _fix_embedding(rw: _Rewrite, node: fx.Node, mod: nn.Embedding) -> None:
    mod.embedding_dim = mod.weight.shape[1]


_MODULE_FIXERS: list[tuple[tuple[type, ...], Callable[[_Rewrite, fx.Node, Any], None]]] = [
    (CONVS, _fix_conv),
    ((nn.Linear,), _fix_linear),
    ((*BATCHNORMS, *INSTANCENORMS), _fix_channel_norm),
    ((nn.LayerNorm, nn.RMSNorm), _fix_layer_norm),
    ((nn.GroupNorm,), _fix_group_norm),
    ((nn.PReLU,), _fix_prelu),
    ((nn.Embedding,), _fix_embedding),
    ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _fix_conv_transpose),
]


def _fix_shape_args(rw: _Rewrite, node: fx.Node) -> None:
    """Literal sizes in view/reshape/expand follow the new widths; -1 and graph values adapt."""
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


def _fix_split(rw: _Rewrite, node: fx.Node) -> None:
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


def _fix_layer_norm_fn(rw: _Rewrite, node: fx.Node) -> None:
    shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
    new = tuple(rw.shape(node)[-len(shape) :])
    if len(node.args) > 1:
        node.args = (node.args[0], new, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "normalized_shape": new}


_ARG_FIXERS: dict[str, Callable[[_Rewrite, fx.Node], None]] = {
    "shape_args": _fix_shape_args,
    "split": _fix_split,
    "layer_norm": _fix_layer_norm_fn,
}


def _sliced_tensors(gm: fx.GraphModule, dg: DependencyGraph, removed: np.ndarray) -> dict[int, Any]:
    """A deepcopy memo that skips cloning the tensors ``slice_parameters`` replaces anyway."""
    memo: dict[int, Any] = {}
    for m in dg.members:
        if removed[m.ids].any():
            owner_name, attr = _split_name(m.param)
            tensor = getattr(gm.get_submodule(owner_name), attr)
            memo[id(tensor)] = tensor
    return memo


def prune(gm: fx.GraphModule, plan: Plan, dg: DependencyGraph | None = None) -> fx.GraphModule:
    """A new GraphModule with the planned channels physically removed; ``gm`` is untouched.

    ``plan`` maps group ids (from ``analyze``) to the unit indices to remove.
    """
    dg = dg if dg is not None else analyze(gm)
    removed = dg.removed_elements(plan)
    new = copy.deepcopy(gm, memo=_sliced_tensors(gm, dg, removed))
    rw = _Rewrite(new, dg, removed)
    if removed.any():
        rw.slice_parameters()
        rw.resync_modules()
        rw.fix_arguments()
        rw.update_meta()
    new.graph.lint()
    new.recompile()
    return new


def mask(gm: fx.GraphModule, plan: Plan, dg: DependencyGraph | None = None) -> fx.GraphModule:
    """A new GraphModule of unchanged shapes where every consumer of a planned channel sees zero."""
    dg = dg if dg is not None else analyze(gm)
    removed = dg.removed_elements(plan)
    new = copy.deepcopy(gm)
    with torch.no_grad():
        for m in dg.members:
            if m.role != "in":
                continue
            cut = np.nonzero(removed[m.ids])[0]
            if cut.size:
                owner, attr = _split_name(m.param)
                tensor = getattr(new.get_submodule(owner), attr)
                tensor.index_fill_(m.dim, torch.as_tensor(cut, device=tensor.device), 0.0)
    nodes = {n.name: n for n in new.graph.nodes}
    for k, im in enumerate(dg.input_masks):
        keep = ~removed[im.ids]
        if keep.all():
            continue
        node = nodes[im.node]
        src = node.args[im.arg]
        nd = len(src.meta["tensor_meta"].shape)
        shape = [1] * nd
        for d, size in zip(im.dims, keep.shape, strict=True):
            shape[d] = size
        name = f"_idap_mask_{k}"
        new.register_buffer(name, torch.as_tensor(keep, dtype=src.meta["tensor_meta"].dtype).reshape(shape))
        with new.graph.inserting_before(node):
            factor = new.graph.get_attr(name)
            scaled = new.graph.call_function(torch.mul, (src, factor))
        args = list(node.args)
        args[im.arg] = scaled
        node.args = tuple(args)
    new.graph.lint()
    new.recompile()
    return new
