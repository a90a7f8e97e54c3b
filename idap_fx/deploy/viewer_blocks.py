"""Blocks of the dependency-graph viewer: module calls that can be drawn as one box.

Why a module of its own: finding them is a graph question (which module calls span a
convex set of fx nodes, which classes repeat) with no channel groups in it; the viewer
document (``idap_fx.deploy.viewer_document``) only places nodes in the blocks found here.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch import fx, nn

__all__ = ["module_blocks"]

_GENERIC = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_GENERIC_NAMES = {c.__name__ for c in _GENERIC}


def _module_path(entry: Any) -> tuple[str, str, bool]:
    """(path, class name, is a generic container) from one ``nn_module_stack`` value."""
    path, cls = entry if isinstance(entry, tuple) else (str(entry), "")
    if isinstance(cls, type):
        return path, cls.__name__, issubclass(cls, _GENERIC)
    name = str(cls).rsplit(".", 1)[-1]
    return path, name, name in _GENERIC_NAMES


def module_blocks(fx_nodes: list[fx.Node]) -> tuple[list[dict[str, Any]], list[list[int]]]:
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
