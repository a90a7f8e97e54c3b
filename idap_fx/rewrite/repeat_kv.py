"""Query heads as units under grouped-query attention: ``repeat_kv`` becomes a gather.

``repeat_kv`` copies every key / value head to the query heads it serves with
``x[:, :, None].expand(b, kv, n_rep, t, d).reshape(b, kv * n_rep, t, d)``; analysed as it is, a
unit is a key / value head with its ``n_rep`` query heads. To remove query heads one by one while
every key / value head stays (what tensor-parallel serving wants), the copy has to be able to skip
any query head, which an ``expand`` cannot: ``gather_repeated_heads`` rewrites each such pattern into
``index_select(x, 1, [0, 0, 1, 1, ...])`` marked ``QUERY_HEADS``. Its rule pins the key / value heads
and gives every copied head a unit of its own (coupled with its query head by the attention); after
pruning, its fixer keeps the positions of the query heads that stay. ``single_kv_only`` rewrites only
the copies of one key / value head (multi-query attention), where the default unit would be every
head of the layer at once, so no head could go at all.
"""

from __future__ import annotations

import copy

import torch
from torch import fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from idap_fx.graph.ops.indexing import QUERY_HEADS

_ATEN = torch.ops.aten
_EXPANDS = ("expand", _ATEN.expand.default)
_RESHAPES = (
    "reshape",
    "view",
    torch.reshape,
    _ATEN.view.default,
    _ATEN.reshape.default,
    _ATEN._unsafe_view.default,
)
_COPIES = ("contiguous", "clone", _ATEN.clone.default, _ATEN.contiguous.default)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is(node: fx.Node, targets: tuple) -> bool:
    return node.op in ("call_function", "call_method") and node.target in targets


def _repeat(reshape: fx.Node) -> tuple[fx.Node, int, int, int] | None:
    """``(source, dim, kv, n_rep)`` where ``reshape`` merges a ``(kv, n_rep)`` pair of dims whose second
    is an ``expand`` of a size-1 dim of ``source`` (through copies), else None."""
    expand = reshape.args[0] if isinstance(reshape.args[0], fx.Node) else None
    while expand is not None and _is(expand, _COPIES) and len(expand.users) == 1:
        expand = expand.args[0]
    if expand is None or not _is(expand, _EXPANDS) or len(expand.users) != 1:
        return None
    source = expand.args[0]
    before, after, out = _shape(source), _shape(expand), _shape(reshape)
    if (
        before is None
        or after is None
        or out is None
        or len(before) != len(after)
        or len(out) != len(after) - 1
    ):
        return None
    wide = [d for d in range(len(before)) if before[d] == 1 and after[d] > 1]
    if len(wide) != 1 or wide[0] < 2:  # the copies join a heads dim, never the batch dim
        return None
    d = wide[0]
    kv, n_rep = after[d - 1], after[d]
    merged = after[: d - 1] + (kv * n_rep,) + after[d + 1 :]
    if out != merged or kv < 1 or n_rep < 2:
        return None
    return source, d - 1, kv, n_rep


def _copies(gm: fx.GraphModule, single_kv_only: bool) -> list[tuple[fx.Node, tuple[fx.Node, int, int, int]]]:
    """The ``repeat_kv`` reshapes of ``gm`` with what ``_repeat`` found (one key / value head only if asked)."""
    found = [(n, r) for n in gm.graph.nodes if _is(n, _RESHAPES) and (r := _repeat(n)) is not None]
    return [(n, r) for n, r in found if not single_kv_only or r[2] == 1]


def gather_repeated_heads(gm: fx.GraphModule, single_kv_only: bool = False) -> int:
    """Rewrite the ``repeat_kv`` copies in ``gm`` (in place) into marked gathers; return how many."""
    count = 0
    for node, (source, dim, kv, n_rep) in _copies(gm, single_kv_only):
        name = f"_idap_repeat_{count}"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, torch.arange(kv).repeat_interleave(n_rep))
        aten = source.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
        with gm.graph.inserting_before(node):
            index = gm.graph.get_attr(name)
            squeezed = gm.graph.call_function(_ATEN.squeeze.dim if aten else torch.squeeze, (source, dim + 1))
            gather = gm.graph.call_function(
                _ATEN.index_select.default if aten else torch.index_select, (squeezed, dim, index)
            )
        meta = node.meta["tensor_meta"]
        index.meta["tensor_meta"] = _extract_tensor_metadata(getattr(gm, name))
        squeezed.meta["tensor_meta"] = _extract_tensor_metadata(
            torch.empty(
                _shape(source)[: dim + 1] + _shape(source)[dim + 2 :], dtype=meta.dtype, device="meta"
            )
        )
        gather.meta["tensor_meta"] = meta
        if "val" in node.meta:
            gather.meta["val"] = node.meta["val"]
        gather.meta[QUERY_HEADS] = True
        node.replace_all_uses_with(gather)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count


def with_query_heads(gm: fx.GraphModule, single_kv_only: bool = False) -> fx.GraphModule:
    """``gm`` with its ``repeat_kv`` copies as gathers: a new GraphModule sharing ``gm``'s parameters
    (``gm`` is left as it is), or ``gm`` itself where it has none."""
    if not _copies(gm, single_kv_only):
        return gm
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
    gather_repeated_heads(out, single_kv_only)
    return out


__all__ = ["QUERY_HEADS", "gather_repeated_heads", "with_query_heads"]
