"""Applying a plan: ``prune`` slices channels out, ``mask`` zeroes what consumes them.

Both walk the same plan over the same dependency graph, on a deep copy of the input.
``prune`` slices every member parameter, re-derives module attributes that encode a
width (``out_channels``, ``num_features``, ``normalized_shape`` ...), and rewrites the
literal sizes baked into graph arguments (``view``/``reshape`` shapes, split sizes),
so nothing goes stale; those fixers are declared with each op's rule in ``idap_fx.graph.ops``
and only run here, on a ``_Rewrite`` (the ``ops.registry.Rewrite`` protocol). ``mask`` keeps every shape and zeroes the consumer side of each
removed channel; it is the oracle ``prune`` is tested against. ``masked_call`` is the same
oracle without the copy, for the allocator that measures many masks.
"""

from __future__ import annotations

import copy
import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.func import functional_call

from idap_fx.graph.analysis import analyze
from idap_fx.graph.dependency import DependencyGraph, Plan
from idap_fx.graph.layout import Layout
from idap_fx.graph.ops.registry import is_tensor_meta, lookup, module_fixer


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
        if index is not None:  # an output with no layout of its own (a size value) keeps its shape
            meta, layout = meta[index], layout[index] if isinstance(layout, (tuple, list)) else None
        return _new_shape(layout, tuple(meta.shape), self.removed)

    def value(self, arg: Any) -> Any:
        return self.dg.layouts.get(arg.name) if isinstance(arg, fx.Node) else arg

    def kept(self, node: fx.Node, dim: int) -> np.ndarray:
        layout = self.dg.layouts.get(node.name)
        ax = layout.axis_of(dim) if isinstance(layout, Layout) else None
        if ax is None:
            return np.ones(node.meta["tensor_meta"].shape[dim], dtype=bool)
        keep = ~self.removed[ax.ids]
        other = tuple(i for i in range(keep.ndim) if i != ax.dims.index(dim))
        return keep.any(axis=other) if other else keep

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
            fix = module_fixer(self.gm.get_submodule(node.target))
            if fix is not None:
                fix(self, node)

    def fix_arguments(self) -> None:
        for node in list(self.gm.graph.nodes):
            if node.op not in ("call_function", "call_method"):
                continue
            rule = lookup(node, self.gm)
            if rule is not None and rule.fix is not None:
                rule.fix(self, node)

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


def discard(gm: fx.GraphModule) -> None:
    """Let a model no one will run again free its weights now.

    A GraphModule and its Graph refer to each other (``graph.owning_module``), so a dropped model
    is otherwise freed only by Python's cycle collector, which runs on object counts, not memory:
    a ViT-B/16 run held four pruned copies at once. Only for models this process built (never the
    caller's, nor one whose modules another model shares and still runs).
    """
    gm.graph._owning_module = None


def return_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Each step frees a model and its statistics; glibc keeps freed chunks below its mmap threshold
    (which grows to 32 MiB) in the heap, so without this the resident size creeps up step by step.
    """
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def zeroed_tensors(gm: fx.GraphModule, plan: Plan, dg: DependencyGraph) -> dict[str, torch.Tensor]:
    """Copies of the consumer tensors of ``plan``'s channels with those channels zeroed, one entry
    (under its first name) per tensor: tied names share it, as ``functional_call`` expects."""
    removed = dg.removed_elements(plan)
    copies: dict[int, tuple[str, torch.Tensor]] = {}  # id of gm's tensor -> (first name, zeroed copy)
    with torch.no_grad():
        for m in dg.members:
            cut = np.nonzero(removed[m.ids])[0] if m.role == "in" else ()
            if len(cut):
                owner, attr = _split_name(m.param)
                original = getattr(gm.get_submodule(owner), attr)
                _, tensor = copies.setdefault(id(original), (m.param, original.detach().clone()))
                tensor.index_fill_(m.dim, torch.as_tensor(cut, device=tensor.device), 0.0)
    return dict(copies.values())


def masked_call(gm: fx.GraphModule, plan: Plan, dg: DependencyGraph) -> Callable[..., Any]:
    """``mask(gm, plan, dg)`` as a function of the inputs, without copying ``gm`` where the plan
    needs no input masks (the zeroed tensors are passed to ``functional_call``): what the
    ``sensitivity`` allocator evaluates a few hundred times per step."""
    removed = dg.removed_elements(plan)
    if any(not (~removed[im.ids]).all() for im in dg.input_masks):
        return mask(gm, plan, dg)
    zeroed = zeroed_tensors(gm, plan, dg)
    return lambda *args: functional_call(gm, zeroed, args)


def mask(gm: fx.GraphModule, plan: Plan, dg: DependencyGraph | None = None) -> fx.GraphModule:
    """A new GraphModule of unchanged shapes where every consumer of a planned channel sees zero."""
    dg = dg if dg is not None else analyze(gm)
    removed = dg.removed_elements(plan)
    new = copy.deepcopy(gm)
    with torch.no_grad():
        for name, tensor in zeroed_tensors(gm, plan, dg).items():
            owner, attr = _split_name(name)
            getattr(new.get_submodule(owner), attr).copy_(tensor)
    nodes = {n.name: n for n in new.graph.nodes}
    for k, im in enumerate(dg.input_masks):
        keep = ~removed[im.ids]
        if keep.all():
            continue
        node = nodes[im.node]
        src = node.kwargs[im.arg] if isinstance(im.arg, str) else node.args[im.arg]
        nd = len(src.meta["tensor_meta"].shape)
        shape = [1] * nd
        for d, size in zip(im.dims, keep.shape, strict=True):
            shape[d] = size
        name = f"_idap_mask_{k}"
        new.register_buffer(name, torch.as_tensor(keep, dtype=src.meta["tensor_meta"].dtype).reshape(shape))
        with new.graph.inserting_before(node):
            factor = new.graph.get_attr(name)
            scaled = new.graph.call_function(torch.mul, (src, factor))
        if isinstance(im.arg, str):
            node.kwargs = {**node.kwargs, im.arg: scaled}
        else:
            node.args = tuple(scaled if i == im.arg else a for i, a in enumerate(node.args))
    new.graph.lint()
    new.recompile()
    return new
