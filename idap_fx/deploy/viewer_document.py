"""The viewer's document: the JSON facts the dependency-graph page draws.

Why a module of its own: this is what the viewer knows (nodes with their shapes
before and after a plan, edges, channel groups with their colours, couplings,
frozen reasons, scores and the removed units of a plan, blocks, boundaries),
apart from how it is written out (``idap_fx.visualize``: the HTML page and the
Graphviz text, both rendered from ``viewer_data``).
"""

from __future__ import annotations

import colorsys
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import fx

from idap_fx.deploy.viewer_blocks import module_blocks
from idap_fx.errors import PlanError
from idap_fx.graph.analysis import analyze
from idap_fx.graph.dependency import DependencyGraph, Plan
from idap_fx.graph.layout import Layout, layouts_in
from idap_fx.graph.ops.registry import is_tensor_meta

__all__ = ["COLLAPSE_ABOVE", "GraphLike", "Scores", "group_colours", "viewer_data"]

GraphLike = fx.GraphModule | DependencyGraph | tuple[fx.GraphModule, DependencyGraph]
Scores = Mapping[str, Sequence[float]]

# Above this many fx nodes the page opens with repeated blocks collapsed.
COLLAPSE_ABOVE = 120


def _group_entry(
    g: Any,
    plan: Plan | None,
    planned: bool,
    colours: dict[str, str],
    couplings: dict[str, Any],
    couplers: dict[str, set[str]],
    score_lists: dict[str, Any],
) -> dict[str, Any]:
    """One group of the viewer document: what it is, why (not) prunable, its couplings, plan and scores."""
    gone = sorted(int(i) for i in (plan or {}).get(g.id, []))
    return {
        "id": g.id,
        "colour": colours[g.id],
        "size": g.size,
        "channels": g.channels,
        "prunable": g.prunable,
        "frozen_reason": g.frozen_reason,
        "exact": g.exact,
        "inexact_reason": g.inexact_reason,
        "pinned_reason": g.pinned_reason,
        "members": [[m.node, m.param, m.dim, m.role, m.offset, m.count] for m in g.members],
        "parts": list(g.part_names),
        "couplings": couplings.get(g.id, []),
        "couplers": sorted(couplers.get(g.id, set())),
        "removed": gone if planned else None,
        "removed_channels": int(sum(len(g.units[i]) for i in gone)) if planned else None,
        "scores": score_lists.get(g.id),
    }


def _roles(dg: DependencyGraph) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(groups each node owns as producer, groups each node reads) by node name."""
    owns: dict[str, list[str]] = {}
    reads: dict[str, list[str]] = {}
    for g in dg.groups:
        for m in g.members:
            target = reads if m.role == "in" else owns
            if g.id not in target.setdefault(m.node, []):
                target[m.node].append(g.id)
    return owns, reads


def _view(gm: fx.GraphModule | None, dg: DependencyGraph) -> tuple[list, list[str], list, list, list, str]:
    """(fx nodes, node names, module blocks, chains, edges, mode): the data-flow view of a GraphModule, else
    the coupling view of a bare DependencyGraph (one node per parameter space)."""
    if gm is not None:
        fx_nodes = list(gm.graph.nodes)
        blocks, chains = module_blocks(fx_nodes)
        index = {n: i for i, n in enumerate(fx_nodes)}
        edges: list[list[Any]] = [
            [index[a], i, None] for i, n in enumerate(fx_nodes) for a in n.all_input_nodes
        ]
        return fx_nodes, [n.name for n in fx_nodes], blocks, chains, edges, "dataflow"
    names = _coupling_view_names(dg)
    return [], names, [], [[] for _ in names], _coupling_edges(dg, names), "coupling"


def viewer_data(
    graph: GraphLike,
    *,
    plan: Plan | None = None,
    scores: Scores | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """The JSON document the page renders: nodes, edges, groups, blocks, boundaries, plan and scores."""
    gm, dg = _resolve(graph)
    removed = dg.removed_elements(plan) if plan else None
    score_lists = {gid: _group_scores(dg, gid, values) for gid, values in (scores or {}).items()}
    colours = group_colours(dg)
    elem_group = np.full(dg.n_elements, -1, dtype=np.int64)
    for gi, g in enumerate(dg.groups):
        for s in g.spaces:
            elem_group[s.base : s.base + s.size] = gi

    fx_nodes, names, blocks, chains, edges, mode = _view(gm, dg)
    spaces: dict[str, list[str]] = {}
    for g in dg.groups:
        for sp in g.spaces:
            spaces.setdefault(sp.node, []).append(f"{sp.label} {sp.size}")

    name_set = set(names)
    couplings, couplers, node_couples = _couplings(dg, name_set)
    owns, reads = _roles(dg)
    nodes = []
    for i, name in enumerate(names):
        value = dg.layouts.get(name)
        out_groups = _value_groups(value, elem_group, dg)
        primary = _primary(out_groups, dg)
        entry: dict[str, Any] = {
            "name": name,
            "group": primary,
            "groups": [[gid, list(dims)] for gid, dims in out_groups],
            "owns": owns.get(name, []),
            "reads": reads.get(name, []),
            "couples": node_couples.get(name, []),
            "boundary": dg.boundaries.get(name),
            "chain": chains[i],
        }
        if fx_nodes:
            node = fx_nodes[i]
            entry.update(_describe(node, gm))
            entry["shape"] = _shapes(node.meta.get("tensor_meta"))
            if removed is not None:
                entry["after"] = _shapes_after(node.meta.get("tensor_meta"), value, removed)
        else:
            entry.update(
                op="space", target="", kind=", ".join(spaces.get(name, ["params"])), module="", shape=[]
            )
        nodes.append(entry)

    groups = [
        _group_entry(g, plan, removed is not None, colours, couplings, couplers, score_lists)
        for g in dg.groups
    ]
    default_title = f"{type(gm).__name__ if gm is not None else 'DependencyGraph'}: {len(names)} nodes"
    return {
        "title": title or default_title,
        "mode": mode,
        "nodes": nodes,
        "edges": edges,
        "groups": groups,
        "blocks": blocks,
        "boundaries": dict(dg.boundaries),
        "has_plan": removed is not None,
        "has_scores": bool(score_lists),
        "collapse_default": "blocks"
        if len(names) > COLLAPSE_ABOVE and any(b["repeated"] for b in blocks)
        else "none",
    }


def group_colours(dg: DependencyGraph) -> dict[str, str]:
    """One distinct ``#rrggbb`` per group: saturated for prunable groups, greyish for frozen ones."""
    used: set[str] = set()
    out: dict[str, str] = {}
    for i, g in enumerate(dg.groups):
        hue = (i * 0.618033988749895) % 1.0
        light, sat = ((0.66, 0.58, 0.74)[i % 3], 0.62) if g.prunable else (0.84, 0.16)
        colour = _hex(hue, light, sat)
        while colour in used:
            hue = (hue + 0.0071) % 1.0
            colour = _hex(hue, light, sat)
        used.add(colour)
        out[g.id] = colour
    return out


def _hex(hue: float, light: float, sat: float) -> str:
    r, g, b = colorsys.hls_to_rgb(hue, light, sat)
    return "#{:02x}{:02x}{:02x}".format(*(round(c * 255) for c in (r, g, b)))


def _resolve(graph: GraphLike) -> tuple[fx.GraphModule | None, DependencyGraph]:
    if isinstance(graph, fx.GraphModule):
        return graph, analyze(graph)
    if isinstance(graph, DependencyGraph):
        return None, graph
    if (
        isinstance(graph, tuple)
        and len(graph) == 2
        and isinstance(graph[0], fx.GraphModule)
        and isinstance(graph[1], DependencyGraph)
    ):
        return graph[0], graph[1]
    raise TypeError(
        "visualize() takes a GraphModule (idap_fx.trace), a (GraphModule, DependencyGraph) pair "
        f"or a DependencyGraph, got {type(graph).__name__}"
    )


def _value_groups(
    value: Any, elem_group: np.ndarray, dg: DependencyGraph
) -> list[tuple[str, tuple[int, ...]]]:
    """The groups whose channels a node's output carries, with the tensor dims they sit on."""
    found: list[tuple[str, tuple[int, ...]]] = []
    for lay in layouts_in(value):
        for ax in lay.axes:
            for gi in np.unique(elem_group[ax.ids.ravel()]).tolist():
                if gi >= 0 and (entry := (dg.groups[gi].id, ax.dims)) not in found:
                    found.append(entry)
    return found


def _primary(out_groups: list[tuple[str, tuple[int, ...]]], dg: DependencyGraph) -> str | None:
    """The group a node is coloured by: a prunable one first, then the one on the innermost dim."""
    if not out_groups:
        return None
    return max(out_groups, key=lambda e: (dg.group(e[0]).prunable, max(e[1])))[0]


def _describe(node: fx.Node, gm: fx.GraphModule) -> dict[str, str]:
    """op / target / a short kind (module class, function or method name) / module class."""
    module = ""
    if node.op == "call_module":
        module = type(gm.get_submodule(node.target)).__name__
        kind = module
    elif node.op == "call_method":
        kind = f".{node.target}()"
    elif node.op == "call_function":
        kind = getattr(node.target, "__name__", str(node.target))
    else:
        kind = node.op
    target = (
        node.target
        if isinstance(node.target, str)
        else getattr(node.target, "__qualname__", str(node.target))
    )
    return {"op": node.op, "target": str(target), "kind": kind, "module": module}


def _shapes(meta: Any) -> list[str]:
    """``tensor_meta`` as strings like ``1×64×56×56`` (one per tensor of a tuple output)."""
    if is_tensor_meta(meta):
        return ["×".join(str(int(s)) for s in meta.shape)]
    if isinstance(meta, (list, tuple)):
        return [s for m in meta for s in _shapes(m)]
    if isinstance(meta, dict):
        return [s for m in meta.values() for s in _shapes(m)]
    return []


def _shapes_after(meta: Any, value: Any, removed: np.ndarray) -> list[str]:
    """The shapes once the plan's elements are gone (each channel dim keeps its surviving slices)."""
    if is_tensor_meta(meta):
        shape = [int(s) for s in meta.shape]
        if isinstance(value, Layout):
            for ax in value.axes:
                for j, d in enumerate(ax.dims):
                    slices = np.moveaxis(ax.ids, j, 0).reshape(ax.ids.shape[j], -1)
                    if slices.shape[0] == shape[d]:
                        shape[d] = int((~removed[slices]).any(axis=1).sum())
        return ["×".join(map(str, shape))]
    if isinstance(meta, (list, tuple)):
        values = value if isinstance(value, (list, tuple)) and len(value) == len(meta) else [None] * len(meta)
        return [s for m, v in zip(meta, values, strict=True) for s in _shapes_after(m, v, removed)]
    return _shapes(meta)


def _couplings(
    dg: DependencyGraph, names: set[str]
) -> tuple[dict[str, list[list[Any]]], dict[str, set[str]], dict[str, list[str]]]:
    """Per group, which spaces were joined and by what; the fx nodes that did the joining."""
    cg = dg.to_networkx()
    listed = {g.id for g in dg.groups}
    per_group: dict[str, list[list[Any]]] = {}
    couplers: dict[str, set[str]] = {}
    node_couples: dict[str, list[str]] = {}

    def space(k: int) -> str:
        d = cg.nodes[k]
        return f"{d['node']} ({d['label']}, {d['size']})"

    for a, b, attrs in cg.edges(data=True):
        gid = cg.nodes[a].get("group")
        if gid not in listed:
            continue
        reasons = sorted(attrs.get("reasons", ()))
        per_group.setdefault(gid, []).append([space(a), space(b), reasons])
        for reason in reasons:
            head = re.split(r"[:\s]", reason, maxsplit=1)[0]
            if head in names:
                couplers.setdefault(gid, set()).add(head)
                if gid not in node_couples.setdefault(head, []):
                    node_couples[head].append(gid)
    return per_group, couplers, node_couples


def _coupling_view_names(dg: DependencyGraph) -> list[str]:
    """Without a GraphModule: the nodes that open a listed group's space or hold its parameters."""
    wanted = {s.node for g in dg.groups for s in g.spaces} | {m.node for g in dg.groups for m in g.members}
    ordered = [n for n in dg.layouts if n in wanted]
    return ordered + sorted(wanted - set(ordered))


def _coupling_edges(dg: DependencyGraph, names: list[str]) -> list[list[Any]]:
    """Coupling view edges: one per pair of nodes whose spaces were joined, labelled with the ops."""
    pos = {n: i for i, n in enumerate(names)}
    cg = dg.to_networkx()
    joined: dict[tuple[int, int], set[str]] = {}
    for a, b, attrs in cg.edges(data=True):
        na, nb = cg.nodes[a]["node"], cg.nodes[b]["node"]
        if na == nb or na not in pos or nb not in pos:
            continue
        key = tuple(sorted((pos[na], pos[nb])))
        joined.setdefault(key, set()).update(attrs.get("reasons", ()))
    return [[s, t, ", ".join(sorted(r))] for (s, t), r in sorted(joined.items())]


def _group_scores(dg: DependencyGraph, gid: str, scores: Sequence[float]) -> list[float | None]:
    """One JSON-safe score per unit (non-finite -> None); unknown groups and wrong lengths raise PlanError."""
    size = dg.group(gid).size
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size != size:
        raise PlanError(f"scores for group {gid!r} hold {values.size} values; the group has {size} units")
    return [float(v) if math.isfinite(v) else None for v in values.tolist()]
