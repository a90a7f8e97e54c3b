"""Which intermediate features distillation matches, and the adapters that map student widths to the teacher's.

``distill`` adds an L1 loss on up to three intermediate feature maps present in both graphs
(``feature_nodes``); where pruning narrowed the channel dim a learned 1×1 ``adapter`` maps
the student's width to the teacher's. Only features that differ in the channel dim alone
can be matched that way (``_adaptable``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn


def tap(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s modules that also returns the outputs of nodes ``names``."""
    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    out = next(n for n in graph.nodes if n.op == "output")
    out.args = ((out.args[0], tuple(by_name[n] for n in names)),)
    graph.lint()
    return fx.GraphModule(gm, graph)


def node_shape(n: fx.Node) -> tuple[int, ...] | None:
    """The recorded output shape of ``n`` (None when it is not one tensor)."""
    meta = n.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _adaptable(s: tuple[int, ...] | None, t: tuple[int, ...] | None) -> bool:
    """Whether ``adapter`` maps a student feature of shape ``s`` to the teacher's ``t``: 3-D/4-D, equal
    except in the channel dim (dim 1 of 4-D, the last of 3-D). A head-pruned ``(b, t, heads, head_dim)``
    view differs in dim 2 and is not a feature to match."""
    if s is None or t is None or len(s) != len(t) or len(s) not in (3, 4):
        return False
    k = 1 if len(s) == 4 else 2
    return all(a == b for i, (a, b) in enumerate(zip(s, t, strict=True)) if i != k)


def feature_nodes(student: fx.GraphModule, teacher: fx.GraphModule, count: int = 3) -> list[str]:
    """Up to ``count`` intermediate nodes (at 1/4, 1/2, 3/4 depth) present in both graphs whose 3-D/4-D
    floating-point outputs differ at most in their channel dim (``_adaptable``)."""
    teacher_nodes = {n.name: n for n in teacher.graph.nodes}
    shared = [
        n.name
        for n in student.graph.nodes
        if n.op in ("call_module", "call_function", "call_method")
        and n.name in teacher_nodes
        and getattr(n.meta.get("tensor_meta"), "dtype", torch.bool).is_floating_point  # a mask is no feature
        and _adaptable(node_shape(n), node_shape(teacher_nodes[n.name]))
    ]
    if not shared:
        return []
    picks = sorted(
        {shared[int(len(shared) * q / (count + 1))] for q in range(1, count + 1)}, key=shared.index
    )
    return picks


def adapter(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> nn.Module:
    """A learned 1×1 map from the student's channel width to the teacher's (identity when equal)."""
    cs, ct = (
        (student_shape[1], teacher_shape[1])
        if len(student_shape) == 4
        else (student_shape[-1], teacher_shape[-1])
    )
    if cs == ct:
        return nn.Identity()
    return nn.Conv2d(cs, ct, 1) if len(student_shape) == 4 else nn.Linear(cs, ct)


class StudentWithAdapters(nn.Module):
    """The tapped student and its feature adapters as one module (one DDP wrapper for both)."""

    def __init__(self, student: fx.GraphModule, adapters: nn.ModuleList) -> None:
        super().__init__()
        self.student, self.adapters = student, adapters

    def forward(self, *inputs: Any) -> tuple[Any, list[torch.Tensor]]:
        out, feats = self.student(*inputs)
        return out, [ad(f) for ad, f in zip(self.adapters, feats, strict=True)]
