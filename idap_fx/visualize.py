"""Dependency-graph viewer: a self-contained HTML page, and a Graphviz export.

Users debug "why can't this channel be pruned / why did pruning here change that layer"
by looking at the graph. ``visualize`` writes one HTML file that draws the fx graph with
every node coloured by the channel group of its output, and shows on hover/click the
node's shapes, its groups, which ops coupled them, frozen groups with their reason,
boundaries and, given a plan or scores, what each group loses. The data travel as JSON
inside the page; layout and drawing are done by the small script in
``idap_fx.viewer_assets`` (no library, no network at view time). Repeated blocks
(modules of one class used several times, e.g. ``layer1.0`` Bottleneck) can be collapsed
into one box each, so ViT-B/16 or DenseNet-121 stay readable.
"""

from __future__ import annotations

import colorsys
import html
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import fx, nn

from idap_fx.analysis import analyze
from idap_fx.dependency import DependencyGraph, Plan
from idap_fx.errors import PlanError
from idap_fx.files import write_text
from idap_fx.layout import Layout, layouts_in
from idap_fx.ops.registry import is_tensor_meta
from idap_fx.viewer_assets import PAGE

GraphLike = fx.GraphModule | DependencyGraph | tuple[fx.GraphModule, DependencyGraph]
Scores = Mapping[str, Sequence[float]]

# Above this many fx nodes the page opens with repeated blocks collapsed.
COLLAPSE_ABOVE = 120
_GENERIC = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_GENERIC_NAMES = {c.__name__ for c in _GENERIC}


def visualize(
    graph: GraphLike,
    path: str | os.PathLike[str],
    *,
    plan: Plan | None = None,
    scores: Scores | None = None,
    title: str | None = None,
) -> str:
    """Write the viewer for ``graph`` to ``path`` (atomically) and return the path.

    ``graph`` is a traced ``GraphModule`` (analysed here), a ``(gm, dg)`` pair, or a
    ``DependencyGraph`` alone: without the GraphModule the page shows the coupling view
    (nodes that open channel spaces, joined by the ops that coupled them) instead of the
    data flow. ``plan`` (group id -> unit indices) is validated like ``prune`` does;
    ``scores`` maps group ids to one score per unit (``idap_fx.score`` returns that).
    """
    data = viewer_data(graph, plan=plan, scores=scores, title=title)
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    page = PAGE.replace("__TITLE__", html.escape(data["title"])).replace("__DATA__", payload)
    return write_text(path, page)


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

    if gm is not None:
        fx_nodes = list(gm.graph.nodes)
        names = [n.name for n in fx_nodes]
        blocks, chains = _blocks(fx_nodes)
        index = {n: i for i, n in enumerate(fx_nodes)}
        edges: list[list[Any]] = [
            [index[a], i, None] for i, n in enumerate(fx_nodes) for a in n.all_input_nodes
        ]
        mode = "dataflow"
    else:
        names = _coupling_view_names(dg)
        blocks, chains = [], [[] for _ in names]
        edges = _coupling_edges(dg, names)
        fx_nodes = []
        mode = "coupling"
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


def to_dot(graph: GraphLike, *, plan: Plan | None = None) -> str:
    """Graphviz DOT text of the same picture: nodes filled with their group colour, blocks as clusters.

    Frozen groups are dashed, boundaries drawn red; with ``plan`` each label says how many
    units the node's group loses. Render with ``dot -Tsvg graph.dot`` (Graphviz is optional).
    """
    data = viewer_data(graph, plan=plan)
    groups = {g["id"]: g for g in data["groups"]}
    nodes = data["nodes"]
    lines = [
        "digraph idap_fx {",
        "  rankdir=TB;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, fillcolor="#ffffff"];',
        '  edge [color="#8a93a3", arrowsize=0.6];',
    ]

    def node_line(i: int, indent: str) -> str:
        n = nodes[i]
        g = groups.get(n["group"]) if n["group"] else None
        label = [n["name"], f"{n['kind']} {' '.join(n['shape'])}".strip()]
        attrs = []
        if g is not None:
            label.append(f"group {g['id']} ({g['size']})")
            attrs.append(f"fillcolor={_dot_str(g['colour'])}")
            if not g["prunable"]:
                attrs.append('style="rounded,filled,dashed"')
            if g["removed"]:
                label.append(f"-{len(g['removed'])}/{g['size']} units")
        if n["boundary"]:
            attrs += ['color="#d0021b"', "penwidth=2", "peripheries=2"]
        attrs.insert(0, f"label={_dot_str(chr(10).join(label))}")
        return f"{indent}{_dot_str(n['name'])} [{', '.join(attrs)}];"

    children: dict[int | None, list[int]] = {}
    for bi, b in enumerate(data["blocks"]):
        children.setdefault(b["parent"], []).append(bi)
    loose = [i for i, n in enumerate(nodes) if not n["chain"]]
    inner: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        if n["chain"]:
            inner.setdefault(n["chain"][-1], []).append(i)

    def cluster(bi: int, indent: str) -> None:
        b = data["blocks"][bi]
        lines.append(f"{indent}subgraph {_dot_str(f'cluster_{bi}')} {{")
        title = _dot_str(f"{b['path']} ({b['type']})")
        lines.append(f'{indent}  label={title}; style=dashed; color="#9aa3b2";')
        for i in inner.get(bi, []):
            lines.append(node_line(i, indent + "  "))
        for child in children.get(bi, []):
            cluster(child, indent + "  ")
        lines.append(f"{indent}}}")

    for bi in children.get(None, []):
        cluster(bi, "  ")
    lines += [node_line(i, "  ") for i in loose]
    for s, t, label in data["edges"]:
        extra = f" [label={_dot_str(label)}, fontsize=8]" if label else ""
        lines.append(f"  {_dot_str(nodes[s]['name'])} -> {_dot_str(nodes[t]['name'])}{extra};")
    lines.append("}")
    return "\n".join(lines) + "\n"


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


def _module_path(entry: Any) -> tuple[str, str, bool]:
    """(path, class name, is a generic container) from one ``nn_module_stack`` value."""
    path, cls = entry if isinstance(entry, tuple) else (str(entry), "")
    if isinstance(cls, type):
        return path, cls.__name__, issubclass(cls, _GENERIC)
    name = str(cls).rsplit(".", 1)[-1]
    return path, name, name in _GENERIC_NAMES


def _blocks(fx_nodes: list[fx.Node]) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """Modules that can be drawn as one box, and each node's chain of them (outermost first).

    A block is a non-leaf module whose call spans at least two nodes and is convex (no path
    leaves it and comes back). ``repeated`` marks module classes used more than once that are
    not plain containers (Sequential/ModuleList/ModuleDict): Bottleneck, EncoderBlock,
    _DenseLayer. ``collapse`` marks the outermost repeated ones: the page's default view.
    """
    leaves = {n.target for n in fx_nodes if n.op == "call_module"}
    found: dict[str, dict[str, Any]] = {}
    stacks: list[list[str]] = []
    for i, n in enumerate(fx_nodes):
        stack = []
        for entry in (n.meta.get("nn_module_stack") or {}).values():
            path, cls, generic = _module_path(entry)
            if path in leaves or not path:
                continue
            info = found.setdefault(path, {"path": path, "type": cls, "generic": generic, "nodes": []})
            info["nodes"].append(i)
            stack.append(path)
        stacks.append(stack)
    index = {n: i for i, n in enumerate(fx_nodes)}
    kept = [b for b in found.values() if len(b["nodes"]) >= 2 and _convex(b["nodes"], fx_nodes, index)]
    counts = Counter(b["type"] for b in kept if not b["generic"])
    order = {b["path"]: k for k, b in enumerate(kept)}
    chains = [[order[p] for p in stack if p in order] for stack in stacks]
    blocks = []
    for b in kept:
        chain = chains[b["nodes"][0]]
        pos = chain.index(order[b["path"]])
        parent = chain[pos - 1] if pos else None
        blocks.append(
            {
                "path": b["path"],
                "type": b["type"],
                "depth": b["path"].count(".") + 1,
                "parent": parent,
                "nodes": b["nodes"],
                "repeated": not b["generic"] and counts[b["type"]] >= 2,
            }
        )
    for b in blocks:
        ancestors, p = [], b["parent"]
        while p is not None:
            ancestors.append(blocks[p])
            p = blocks[p]["parent"]
        b["collapse"] = b["repeated"] and not any(a["repeated"] for a in ancestors)
    return blocks, chains


def _convex(members: list[int], fx_nodes: list[fx.Node], index: dict[fx.Node, int]) -> bool:
    """No node outside ``members`` lies on a path between two members (so a box keeps the graph acyclic)."""
    inside = set(members)
    lo, hi = min(members), max(members)
    reach = set(inside)  # nodes in [lo, hi] reachable from a member
    for i in range(lo, hi + 1):
        if i not in reach and any(index[a] in reach for a in fx_nodes[i].all_input_nodes):
            reach.add(i)
    # an outside node reachable from the block that feeds a member breaks convexity
    return not any(
        i in inside and any(index[a] in reach and index[a] not in inside for a in fx_nodes[i].all_input_nodes)
        for i in range(lo, hi + 1)
    )


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


def _dot_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
