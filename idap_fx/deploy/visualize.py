"""Dependency-graph viewer: a self-contained HTML page, and a Graphviz export.

Users debug "why can't this channel be pruned / why did pruning here change that layer"
by looking at the graph. ``visualize`` writes one HTML file that draws the fx graph with
every node coloured by the channel group of its output, and shows on hover/click the
node's shapes, its groups, which ops coupled them, frozen groups with their reason,
boundaries and, given a plan or scores, what each group loses. The data travel as JSON
inside the page; layout and drawing are done by the small script in
``idap_fx.deploy.viewer_assets`` (no library, no network at view time). Repeated blocks
(modules of one class used several times, e.g. ``layer1.0`` Bottleneck) can be collapsed
into one box each, so ViT-B/16 or DenseNet-121 stay readable.

The data are built in ``idap_fx.deploy.viewer_document`` (``viewer_data``); this module writes
them out, as the page or as Graphviz DOT text.
"""

from __future__ import annotations

import html
import json
import os

from idap_fx.deploy.files import write_text
from idap_fx.deploy.viewer_assets import PAGE
from idap_fx.deploy.viewer_document import COLLAPSE_ABOVE, GraphLike, Scores, group_colours, viewer_data
from idap_fx.graph.dependency import Plan

# viewer_data, group_colours, COLLAPSE_ABOVE and the types live in idap_fx.deploy.viewer_document; re-exported for callers
__all__ = ["COLLAPSE_ABOVE", "GraphLike", "Scores", "group_colours", "to_dot", "viewer_data", "visualize"]


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


def _dot_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
