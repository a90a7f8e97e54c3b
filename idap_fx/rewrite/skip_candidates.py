"""Stage-2 candidates and the rewrite that removes one (method notes §3); scores: ``layer_stats``.

A *candidate* is a sub-graph whose removal leaves a well-formed graph:

* ``residual`` — the branch F of ``y = x + F(x)``: an ``add`` one of whose inputs (the skip x)
  is an ancestor of the other (the branch output, after any layer_scale multiplication or
  stochastic depth). Removing it leaves ``y = x``, which is the original with the branch
  output multiplied by zero. The branch must feed nothing but its ``add`` (dead-end uses
  such as an unused attention-weights output aside), so removing it erases its nodes.
* ``identity`` — a chain of one to ``max_units`` layer units (a conv / linear / attention
  layer with the norm and activation ops that follow it) on a path without fan-out, whose
  output shape equals its input shape: replaced by its input.
* ``projection`` (opt-in) — such a chain that changes the channel count only: replaced by a
  1×1 conv (channel dim 1) or a linear layer (channel dim last) fitted by least squares on
  calibration activations; offered only where that layer costs fewer MACs than the chain.

A chain in which any tensor's spatial or token dims differ from its input's is never a
candidate: only the channel dim may change.

Layer divergence is streamed over calibration batches by ``layer_stats.LayerStats`` (an
``fx.Interpreter``, like ``idap_fx.method.channel_stats.ChannelStats``): residual ``E_x ‖F(x)‖/(‖x‖+ε)``;
identity ``E_x ‖T_out − T_in‖/(‖T_in‖+ε)`` (the relative first difference); projection
``‖Y − P(X)‖/‖Y‖`` over the calibration set (the relative least-squares residual), from the
running normal equations ``XᵀX``, ``XᵀY`` and ``ΣY²``. Norms are per sample over every
non-batch element (dim 0 is the batch). Nothing is stored across batches.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from idap_fx.capture.trace import record_shapes
from idap_fx.graph.modules import PrunedMultiheadAttention

EPS = 1e-6
KINDS = ("residual", "identity", "projection")

_LAYER_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention, PrunedMultiheadAttention)
_CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d)
_INPLACE_OPERATORS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


@dataclass(frozen=True)
class Candidate:
    """One removable sub-graph. Node names refer to the graph it was found in.

    ``entry`` is the node whose value replaces the sub-graph (the skip x of a residual, the
    chain's input); ``exit`` the node whose uses are redirected (the ``add``, the chain's last
    node); ``nodes`` the removed nodes in graph order (for a residual the branch, ending with
    the branch output). ``channel_dim`` is the dim a projection maps (1 or -1).
    """

    kind: str
    name: str
    entry: str
    exit: str
    nodes: tuple[str, ...]
    channel_dim: int = -1

    @property
    def key(self) -> tuple[str, str, str]:
        """Identity across rewrites (node names survive the removal of other candidates)."""
        return (self.kind, self.entry, self.exit)


def _meta(n: fx.Node) -> TensorMetadata | None:
    tm = n.meta.get("tensor_meta")
    return tm if isinstance(tm, TensorMetadata) else None


def _attr(gm: fx.GraphModule, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), gm)


def _parameters(gm: fx.GraphModule, n: fx.Node) -> list[torch.Tensor]:
    """Parameters a node reads: its module's, or the tensors of its get_attr inputs."""
    found = list(gm.get_submodule(n.target).parameters()) if n.op == "call_module" else []
    return found + [_attr(gm, p.target) for p in n.all_input_nodes if p.op == "get_attr"]


def _is_layer(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), _LAYER_MODULES)
    return n.op == "call_function" and n.target in (F.linear, *_CONV_FUNCTIONS)


def _is_conv(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), nn.modules.conv._ConvNd)
    return n.op == "call_function" and n.target in _CONV_FUNCTIONS


def _layer_macs(gm: fx.GraphModule, n: fx.Node, channel_dim: int) -> int:
    """Weight elements × output positions: the MACs of a conv / linear / attention node (estimate)."""
    tm = n.meta.get("tensor_meta")
    tm = tm if isinstance(tm, TensorMetadata) else next((t for t in tm or () if t is not None), None)
    if tm is None or len(tm.shape) < 2:
        return 0
    shape = tuple(tm.shape)
    positions = math.prod(shape[1:]) // max(1, shape[channel_dim])
    return positions * sum(t.numel() for t in _parameters(gm, n) if t.dim() >= 2)


def _is_add(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target in (operator.add, operator.iadd):
        return len(n.args) == 2 and not n.kwargs
    if (n.op == "call_function" and n.target is torch.add) or (
        n.op == "call_method" and n.target in ("add", "add_")
    ):
        return len(n.args) == 2 and not n.kwargs
    return False


def _mutates_first_arg(n: fx.Node) -> bool:
    return n.target is operator.iadd or n.target == "add_"


def _live(roots: list[fx.Node], cut: tuple[fx.Node, fx.Node] | None = None) -> set[fx.Node]:
    """Nodes the roots (outputs, side effects) depend on; ``cut=(node, input)`` ignores that one edge."""
    live: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack.extend(p for p in n.all_input_nodes if cut is None or n is not cut[0] or p is not cut[1])
    return live


def _name(nodes: list[fx.Node]) -> str:
    """A readable name: the common module path of the nodes' modules and parameters, first..last."""
    paths = []
    for m in nodes:
        if m.op == "call_module":
            paths.append(m.target)
        paths += [p.target for p in m.all_input_nodes if p.op == "get_attr"]
    if not paths:
        return nodes[0].name if len(nodes) == 1 else f"{nodes[0].name}..{nodes[-1].name}"
    split = [p.split(".") for p in paths]
    k = 0
    while all(len(s) > k + 1 and s[k] == split[0][k] for s in split):
        k += 1
    heads = list(dict.fromkeys(s[k] for s in split))
    base = ".".join(split[0][:k])
    if len(heads) == 1:
        return f"{base}.{heads[0]}" if base else heads[0]
    return f"{base}[{heads[0]}..{heads[-1]}]" if base else f"{heads[0]}..{heads[-1]}"


class _GraphIndex:
    """Topological order, ancestor bitsets and liveness of one graph."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.idx = {n: i for i, n in enumerate(self.nodes)}
        self.anc: dict[fx.Node, int] = {}
        for n in self.nodes:
            bits = 0
            for p in n.all_input_nodes:
                bits |= self.anc[p] | (1 << self.idx[p])
            self.anc[n] = bits
        self.roots = [n for n in self.nodes if n.op == "output" or n.is_impure()]
        self.live = _live(self.roots)

    def is_ancestor(self, a: fx.Node, b: fx.Node) -> bool:
        return bool(self.anc[b] >> self.idx[a] & 1)

    def users(self, n: fx.Node) -> list[fx.Node]:
        return [u for u in n.users if u in self.live]

    def tensor_inputs(self, n: fx.Node) -> list[fx.Node]:
        return list(
            dict.fromkeys(p for p in n.all_input_nodes if p.op != "get_attr" and "tensor_meta" in p.meta)
        )


def _residuals(ix: _GraphIndex) -> list[Candidate]:
    found = []
    for n in ix.nodes:
        if n not in ix.live or not _is_add(n) or _meta(n) is None:
            continue
        a, b = n.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
            continue
        for skip, out in ((a, b), (b, a)):
            if not ix.is_ancestor(skip, out) or (_mutates_first_arg(n) and skip is a):
                continue
            sm, nm = _meta(skip), _meta(n)
            if sm is None or tuple(sm.shape) != tuple(nm.shape) or sm.dtype != nm.dtype:
                break
            data = _data_descendants(ix, skip)
            branch = [
                m for m in ix.nodes if m in data and m is not skip and (m is out or ix.is_ancestor(m, out))
            ]
            still_live = _live(ix.roots, cut=(n, out))
            if any(m in still_live for m in branch):
                break  # part of the branch is used elsewhere: removing it would not erase it
            if not any(_parameters(ix.gm, m) for m in branch):
                break
            found.append(
                Candidate("residual", _name(branch), skip.name, n.name, tuple(m.name for m in branch))
            )
            break
    return found


_METADATA_ATTRS = frozenset({"dtype", "shape", "device", "ndim", "is_cuda"})
_METADATA_METHODS = frozenset({"size", "dim", "type", "get_device"})


def _reads_metadata(n: fx.Node) -> bool:
    """``x.dtype``, ``x.shape``, ``x.size()``, ...: what such a node returns does not change when the values of
    ``x`` do (a skipped branch leaves the stream's dtype and shape as they are)."""
    if n.op == "call_function" and n.target is getattr and len(n.args) > 1:
        return n.args[1] in _METADATA_ATTRS
    return (
        n.op == "call_method"
        and n.target in _METADATA_METHODS
        and not (n.target == "type" and len(n.args) > 1)
    )


def _data_descendants(ix: _GraphIndex, start: fx.Node) -> set[fx.Node]:
    """Nodes whose values depend on ``start``'s values (not merely its dtype or shape: BERT builds its attention
    mask from ``embedding_output.dtype``, which must not put the mask into layer 0's branch)."""
    seen, stack = {start}, [start]
    while stack:
        for user in stack.pop().users:
            if user not in seen and not _reads_metadata(user):
                seen.add(user)
                stack.append(user)
    return seen


def _segments(ix: _GraphIndex) -> list[list[fx.Node]]:
    """Maximal paths of compute nodes with one tensor input each and no fan-out inside."""
    segments: list[list[fx.Node]] = []
    seen: set[fx.Node] = set()
    for n in ix.nodes:
        if n in seen or n not in ix.live or not n.op.startswith("call") or n.is_impure():
            continue
        ins = ix.tensor_inputs(n)
        if len(ins) != 1:
            continue
        seg = [n]
        seen.add(n)
        while True:
            users = ix.users(seg[-1])
            if len(users) != 1:
                break
            u = users[0]
            if not u.op.startswith("call") or u.is_impure() or ix.tensor_inputs(u) != [seg[-1]]:
                break
            seg.append(u)
            seen.add(u)
        segments.append(seg)
    return segments


def _units(gm: fx.GraphModule, segment: list[fx.Node]) -> list[list[fx.Node]]:
    """Split a segment before every layer but the first; leading non-layer ops join the first unit."""
    units: list[list[fx.Node]] = [[]]
    has_layer = False
    for n in segment:
        if _is_layer(gm, n) and has_layer:
            units.append([])
        has_layer = has_layer or _is_layer(gm, n)
        units[-1].append(n)
    return units if has_layer else []


def _chain(
    ix: _GraphIndex, nodes: list[fx.Node], min_len: int, kinds: tuple[str, ...], branches: set[frozenset[str]]
) -> Candidate | None:
    """The candidate for ``nodes`` (cut short before a spatial change after its first ``min_len`` nodes)."""
    gm = ix.gm
    entry = ix.tensor_inputs(nodes[0])[0]
    em = _meta(entry)
    if em is None or len(em.shape) < 2:
        return None
    e = tuple(em.shape)
    first_layer = next(m for m in nodes if _is_layer(gm, m))
    cd = 1 if _is_conv(gm, first_layer) else -1
    c = cd % len(e)
    for i, m in enumerate(nodes):  # no spatial / token change anywhere inside the chain
        mm = m.meta.get("tensor_meta")
        if isinstance(mm, TensorMetadata):
            s = tuple(mm.shape)
            if len(s) != len(e) or any(s[d] != e[d] for d in range(len(e)) if d != c):
                if i < min_len:
                    return None
                nodes = nodes[:i]  # e.g. the pooling that follows the chain's last layer
                break
    exit_ = nodes[-1]
    xm = _meta(exit_)
    if xm is None or frozenset(m.name for m in nodes) in branches:
        return None
    x = tuple(xm.shape)
    names = tuple(m.name for m in nodes)
    if e == x and em.dtype == xm.dtype:
        return (
            Candidate("identity", _name(nodes), entry.name, exit_.name, names)
            if "identity" in kinds
            else None
        )
    if "projection" not in kinds or not xm.dtype.is_floating_point:
        return None
    positions = math.prod(e[1:]) // e[c]
    chain_macs = sum(_layer_macs(gm, m, cd) for m in nodes if _is_layer(gm, m))
    if e[c] * x[c] * positions >= chain_macs:
        return None
    return Candidate("projection", _name(nodes), entry.name, exit_.name, names, cd)


def find_candidates(
    gm: fx.GraphModule, *, kinds: Iterable[str] = ("residual", "identity"), max_units: int = 2
) -> list[Candidate]:
    """Every candidate of the requested ``kinds`` in ``gm`` (which needs shapes: ``idap_fx.trace``)."""
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown candidate kind(s) {unknown}; available: {list(KINDS)}")
    ix = _GraphIndex(gm)
    residuals = _residuals(ix)
    found = [c for c in residuals if "residual" in kinds]
    if "identity" not in kinds and "projection" not in kinds:
        return found
    branches = {frozenset(c.nodes) for c in residuals}
    for seg in _segments(ix):
        units = _units(gm, seg)
        for i in range(len(units)):
            for j in range(i + 1, min(len(units), i + max_units) + 1):
                nodes = [m for u in units[i:j] for m in u]
                last_layer = next(k for k, m in enumerate(units[j - 1]) if _is_layer(gm, m))
                min_len = len(nodes) - len(units[j - 1]) + last_layer + 1
                cand = _chain(ix, nodes, min_len, kinds, branches)
                if cand is not None:
                    found.append(cand)
    return found


def _projection_module(
    w: torch.Tensor, rank: int, channel_dim: int, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    c_in, c_out = w.shape[0] - 1, w.shape[1]
    if channel_dim == 1 and rank > 2:
        mod: nn.Module = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 3](c_in, c_out, 1)
        weight = w[:-1].T.reshape(c_out, c_in, *([1] * (rank - 2)))
    else:
        mod = nn.Linear(c_in, c_out)
        weight = w[:-1].T
    with torch.no_grad():
        mod.weight.copy_(weight)
        mod.bias.copy_(w[-1])
    return mod.to(dtype=dtype, device=device)


def _out_of_place(gm: fx.GraphModule, n: fx.Node) -> None:
    """Make ``n`` stop writing into its input (that input may now be a tensor other nodes still read)."""
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        if getattr(mod, "inplace", False):
            mod.inplace = False
    elif n.kwargs.get("inplace") is True:
        n.update_kwarg("inplace", False)
    elif n.op == "call_method" and n.target.endswith("_") and not n.target.endswith("__"):
        if hasattr(torch.Tensor, n.target[:-1]):
            n.target = n.target[:-1]
    elif n.op == "call_function" and n.target in _INPLACE_OPERATORS:
        n.target = _INPLACE_OPERATORS[n.target]


def remove(
    gm: fx.GraphModule,
    candidate: Candidate,
    example_inputs: Any,
    fit: torch.Tensor | None = None,
) -> fx.GraphModule:
    """A copy of ``gm`` with ``candidate`` replaced (by its skip / input / the fitted projection).

    The removed nodes are erased (dead-code elimination), unused submodules deleted, and
    shapes re-recorded on ``example_inputs`` so later passes can analyze the result.
    """
    new = copy.deepcopy(gm)
    graph = new.graph
    by_name = {n.name: n for n in graph.nodes}
    entry, exit_ = by_name[candidate.entry], by_name[candidate.exit]
    replacement = entry
    if candidate.kind == "projection":
        if fit is None:
            raise ValueError(
                f"projection candidate {candidate.name!r} needs its fitted weights (layer_scores)"
            )
        em = _meta(entry)
        device = next((t.device for t in new.parameters()), torch.device("cpu"))
        target = f"skip_proj_{exit_.name}"
        mod = _projection_module(fit, len(em.shape), candidate.channel_dim, em.dtype, device)
        new.add_submodule(target, mod)
        with graph.inserting_after(exit_):
            replacement = graph.call_module(target, (entry,))
    users = list(exit_.users)
    exit_.replace_all_uses_with(replacement)
    for u in users:
        _out_of_place(new, u)
    graph.eliminate_dead_code()
    new.delete_all_unused_submodules()
    graph.lint()
    new.recompile()
    record_shapes(new, example_inputs)
    return new


__all__ = ["EPS", "KINDS", "Candidate", "find_candidates", "remove"]
